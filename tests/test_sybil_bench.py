"""benchmarks/sybil.py on a tiny world: every arm's federation runs, and the JSON has the right shape and values.

The arms run in this process (a serial stand-in for the script's process pool): 6 shops, 2 of them Sybils, 2 rounds.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from flower_harness import load_benchmark


@pytest.fixture(scope="module")
def sybil():
    """The benchmark module."""
    return load_benchmark("sybil")


class _Serial:
    """`ProcessPoolExecutor` in this process: ``map`` runs each call in turn."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *_exc) -> None:
        return None

    def map(self, fn, *iterables):
        return list(map(fn, *iterables))


ARMS = ["fedavg-clean", "fedavg-absent", "fedshop-signflip"]


@pytest.fixture(scope="module")
def result(sybil, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sybil") / "sybil.json"
    threads = torch.get_num_threads()  # run_arm sets 1 thread, as in its own process
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sybil, "ProcessPoolExecutor", _Serial)
        mp.setattr(sys, "argv", ["sybil.py", "--shops", "6", "--share", "0.34", "--rounds", "2",
                                 "--arms", ",".join(ARMS), "--jobs", "1", "--out", str(out)])
        try:
            sybil.main()
        finally:
            torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_every_arm_reports_the_honest_auc_and_who_was_left_out(result: dict) -> None:
    assert set(result) == {"argv", "uptime_before", "uptime_after", "runs"}
    assert "load average" in result["uptime_before"]
    runs = result["runs"]
    assert [r["arm"] for r in runs] == ARMS
    for r in runs:
        assert (r["shops"], r["sybils"]) == (6, 2)  # every third shop (share 0.34): nodes 0 and 3
        assert 0.0 < r["honest_ctr_auc_last"] < 1.0 and math.isfinite(r["honest_ctr_auc_last"])
        assert len(r["honest_ctr_auc_by_round"]) == 2
        assert r["honest_ctr_auc_by_round"][-1] == pytest.approx(r["honest_ctr_auc_last"], abs=1e-4)
        assert len(r["rounds"]) == 2 and r["seconds"] > 0 and len(r["loadavg"]) == 3
        for rnd in r["rounds"]:
            assert set(rnd) == {"sybils_out", "honest_out", "exempt", "sybils_exempt"}
            assert 0 <= rnd["sybils_out"] <= 2 and 0 <= rnd["sybils_exempt"] <= rnd["exempt"]
    clean, absent, flipped = runs
    assert clean["cost_vs_fedavg_clean"] == 0.0
    for r in (absent, flipped):
        assert r["cost_vs_fedavg_clean"] == pytest.approx(clean["honest_ctr_auc_last"] - r["honest_ctr_auc_last"],
                                                          abs=1e-4)
    assert all(rnd == {"sybils_out": 0, "honest_out": 0, "exempt": 0, "sybils_exempt": 0} for rnd in clean["rounds"])
    assert all(rnd["sybils_out"] == 2 and rnd["honest_out"] == 0 for rnd in absent["rounds"])  # absent: no reply
    assert flipped["screens"] == {} and flipped["rule"] == "fedshop"
    assert any(rnd["sybils_out"] for rnd in flipped["rounds"])  # the default screens catch a 5x sign flip

