"""The local-throughput benchmark's pure helpers: mirrored arm order, ratios, child output, baseline export."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "benchmarks" / "local_throughput.py"
_spec = importlib.util.spec_from_file_location("local_throughput", _path)
lt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lt)


def test_mirrored_order_alternates_pairs() -> None:
    assert lt.mirrored_order(1) == ["baseline", "current"]
    assert lt.mirrored_order(2) == ["baseline", "current", "current", "baseline"]
    order = lt.mirrored_order(4)
    assert order[4:] == order[:4]
    assert order.count("baseline") == order.count("current") == 4


def test_mirrored_order_rejects_zero() -> None:
    with pytest.raises(ValueError, match="--repeats"):
        lt.mirrored_order(0)


def test_arm_ratios_mean_ratio_and_pairs() -> None:
    rows = [{"mix": "ctr", "threads": 1, "arm": a, "repeat": r, "examples_per_cpu_s": v}
            for a, r, v in [("baseline", 0, 100.0), ("current", 0, 300.0), ("current", 1, 200.0),
                            ("baseline", 1, 100.0)]]
    rows.append({"mix": "ctr+cvr", "threads": 1, "arm": "current", "repeat": 0, "examples_per_cpu_s": 5.0})
    out = lt.arm_ratios(rows)
    assert set(out) == {"ctr|1"}  # a mix measured on one arm only has no ratio
    r = out["ctr|1"]
    assert r["baseline_mean"] == 100.0 and r["current_mean"] == 250.0
    assert r["ratio"] == pytest.approx(2.5)
    assert r["pairs"] == [3.0, 2.0] and r["ratio_min"] == 2.0 and r["ratio_max"] == 3.0


def test_child_json_takes_last_json_line() -> None:
    assert lt.child_json('warming up\n{"a": 1}\n{"b": 2}\n') == {"b": 2}
    with pytest.raises(RuntimeError, match="no JSON"):
        lt.child_json("Traceback ...\n")


def test_exported_tree_holds_the_ref_and_is_removed() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=lt.ROOT, capture_output=True, text=True).stdout.strip()
    with lt.exported_tree("HEAD") as (tree, commit):
        assert commit == head
        assert (tree / "shared" / "train.py").is_file()
        assert not (tree / ".git").exists()
    assert not tree.exists()


def test_exported_tree_names_a_bad_ref() -> None:
    with pytest.raises(SystemExit, match="no-such-ref-xyz"), lt.exported_tree("no-such-ref-xyz"):
        pass


def test_rows_per_step_counts_each_source_once() -> None:
    import torch

    class _T:
        rows = {"train": {"user": torch.zeros(1000), "clicked": torch.tensor([1] * 300 + [0] * 700)}}
        sales = {"train": {"item": torch.zeros(100)}}

    assert lt.rows_per_step(_T(), ["ctr", "cvr"], 512) == 512
    assert lt.rows_per_step(_T(), ["ctr", "ranking"], 512) == 512 + 300
    assert lt.rows_per_step(_T(), ["ctr", "cvr", "ranking", "sales"], 512) == 512 + 300 + 100
