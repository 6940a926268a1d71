"""benchmarks/local_fallback.py: the fallback picks local-only's epoch only where it validates better."""

from __future__ import annotations

import pandas as pd
import pytest
from flower_harness import load_benchmark

from simulations.run_report import seeded_final_table


@pytest.fixture(scope="module")
def local_fallback():
    """The benchmark module."""
    return load_benchmark("local_fallback")


def _rows(method: str, shop: str, val: list[float], test: list[float]) -> list[dict]:
    out = []
    for r, (v, t) in enumerate(zip(val, test, strict=True), start=1):
        out.append({"method": method, "round": r, "shop": shop, "task": "ctr", "split": "val", "metric": "auc",
                    "value": v, "seed": 0})
        out.append({"method": method, "round": r, "shop": shop, "task": "ctr", "split": "test", "metric": "auc",
                    "value": t, "seed": 0})
    return out


def test_fallback_picks_on_validation_never_on_test(local_fallback):
    rows = pd.DataFrame(_rows("fedshop", "a", [0.70, 0.72], [0.60, 0.61])  # fedshop validates better at a
                        + _rows("local", "a", [0.71, 0.69], [0.90, 0.95])  # ... though local tests better
                        + _rows("fedshop", "b", [0.70, 0.71], [0.70, 0.71])
                        + _rows("local", "b", [0.73, 0.70], [0.65, 0.66]))  # local validates better at b
    both = pd.concat([rows, local_fallback.fallback_rows(rows)], ignore_index=True)
    final = seeded_final_table(both).set_index(["method", "shop"])
    assert final.loc[(local_fallback.FALLBACK, "a"), "value"] == 0.61  # fedshop's round 2, not local's better test
    assert final.loc[(local_fallback.FALLBACK, "a"), "round"] == 2
    assert final.loc[(local_fallback.FALLBACK, "b"), "value"] == 0.65  # local-only's epoch 1 (round -1)
    assert final.loc[(local_fallback.FALLBACK, "b"), "round"] == -1


def test_fallback_needs_local_and_fedshop_rows(local_fallback):
    rows = pd.DataFrame(_rows("fedshop", "a", [0.7], [0.6]))
    with pytest.raises(ValueError, match="no local rows"):
        local_fallback.fallback_rows(rows)
