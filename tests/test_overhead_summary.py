"""The federation-overhead benchmark's pure helpers: mirrored order, per-round deltas, steady state, ratios."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "federation_overhead", Path(__file__).parents[1] / "benchmarks" / "federation_overhead.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _arm(arm: str, steady_cpu: float, whole_cpu: float, whole_wall: float, steady_wall: float = 1.0) -> dict:
    return {"arm": arm, "steady": {"cpu_s": steady_cpu, "wall_s": steady_wall},
            "whole": {"cpu_s": whole_cpu, "wall_s": whole_wall}}


def test_cache_ab_order_mirrors_both_federated_arms_and_pairs_each_with_a_central_run():
    order = bench.cache_ab_order("pool")
    assert order == ["central", "pool", "pool-nocache", "central", "central", "pool-nocache", "pool", "central"]
    runs = [{"arm": a, "steady": {"cpu_s": 2.0 if a == "pool" else 3.0 if a != "central" else 1.0, "wall_s": 1.0},
             "whole": {"cpu_s": 1.0, "wall_s": 1.0}} for a in order]
    on, off = bench.summarise(runs, "pool"), bench.summarise(runs, "pool-nocache")
    assert on["ratios"]["steady_cpu_s"] == 2.0 and off["ratios"]["steady_cpu_s"] == 3.0
    assert len(on["pairs"]) == len(off["pairs"]) == 2  # each federated run is paired with its neighbouring central


def test_val_only_ab_order_pairs_each_federated_arm_with_its_central_twin():
    order = bench.val_only_ab_order("pool")
    assert order == ["pool", "central", "central-valonly", "pool-valonly",
                     "pool-valonly", "central-valonly", "central", "pool"]
    cpu = {"pool": 3.0, "central": 2.0, "pool-valonly": 2.0, "central-valonly": 1.0}
    runs = [_arm(a, cpu[a], cpu[a], 1.0) for a in order]
    same = bench.summarise(runs, "pool")
    valonly = bench.summarise(runs, "pool-valonly", "central-valonly")
    assert same["ratios"]["steady_cpu_s"] == pytest.approx(1.5) and valonly["ratios"]["steady_cpu_s"] == 2.0
    assert len(same["pairs"]) == len(valonly["pairs"]) == 2 and valonly["central_arm"] == "central-valonly"


def test_cache_ab_order_can_start_with_the_federated_arm():
    order = bench.cache_ab_order("pool", central_first=False)
    assert order[0] == "pool" and order.count("central") == 4 and order == order[::-1]  # mirrored
    runs = [_arm(a, 2.0 if a == "pool" else 1.0, 1.0, 1.0) for a in order]
    assert len(bench.summarise(runs, "pool")["pairs"]) == 2
    assert len(bench.summarise(runs, "pool-nocache")["pairs"]) == 2


def test_test_plan_reads_a_federated_runs_test_rows_and_counts_passes(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("method,round,shop,task,split,metric,value\n"
                   "fedshop,1,shop_00,ctr,test,auc,0.7\n"
                   "fedshop,1,shop_00,ctr,test,logloss,0.4\n"
                   "fedshop,1,shop_00,cvr,test,auc,0.6\n"
                   "fedshop,1,shop_01,ctr,val,auc,0.7\n"
                   "fedshop,2,shop_01,sales,test,wape,0.3\n"
                   "fedshop,2,shop_01,all,train,loss,1.0\n"
                   "fedshop,2,coordinator,ctr,test,auc,0.7\n")
    plan = bench.test_plan(csv)
    assert plan == {"1": {"shop_00": ["ctr", "cvr"]}, "2": {"shop_01": ["sales"]}}
    assert bench.plan_passes(plan, 3) == [2, 1, 0]


def test_mirrored_order_is_abba():
    assert bench.mirrored_order("central", "ray") == ["central", "ray", "ray", "central"]
    assert bench.mirrored_order("a", "b", 2) == ["a", "b", "b", "a"] * 2


def test_ratio_guards_missing_and_zero():
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None and bench.ratio(1.0, 0.0) is None and bench.ratio(1.0, None) is None


def test_round_deltas_and_steady_state_skip_round_one():
    rounds = bench.round_deltas((0.0, 1.0), [(10.0, 21.0), (13.0, 25.0), (17.0, 31.0), (20.0, 35.0)])
    assert rounds == [{"wall_s": 10.0, "cpu_s": 20.0}, {"wall_s": 3.0, "cpu_s": 4.0},
                      {"wall_s": 4.0, "cpu_s": 6.0}, {"wall_s": 3.0, "cpu_s": 4.0}]
    assert bench.steady_state(rounds) == {"wall_s": 3.0, "cpu_s": 4.0}  # median of rounds 2..4
    assert bench.steady_state(rounds[:1]) == {"wall_s": None, "cpu_s": None}


def test_summarise_means_per_arm_and_ratios_per_mirrored_pair():
    runs = [_arm("central", 10, 100, 60), _arm("ray", 8, 130, 90), _arm("ray", 6, 110, 70),
            _arm("central", 10, 100, 40)]
    s = bench.summarise(runs, "ray")
    assert s["arms"]["central"]["whole_cpu_s"] == 100 and s["arms"]["ray"]["whole_cpu_s"] == 120
    assert s["ratios"]["steady_cpu_s"] == pytest.approx(0.7)
    assert s["ratios"]["whole_cpu_s"] == pytest.approx(1.2)
    assert s["ratios"]["whole_wall_s"] == pytest.approx(80 / 50)
    assert [p["whole_cpu"] for p in s["pairs"]] == [pytest.approx(1.3), pytest.approx(1.1)]
    assert s["target_met"] == {"steady_cpu_s": True, "whole_cpu_s": False}


def test_summarise_without_steady_rounds_gives_no_ratio():
    runs = [{"arm": "central", "steady": {"cpu_s": None, "wall_s": None}, "whole": {"cpu_s": 1.0, "wall_s": 1.0}},
            {"arm": "pool", "steady": {"cpu_s": None, "wall_s": None}, "whole": {"cpu_s": 2.0, "wall_s": 1.0}}]
    s = bench.summarise(runs, "pool")
    assert s["ratios"]["steady_cpu_s"] is None and s["target_met"]["steady_cpu_s"] is False
    assert s["ratios"]["whole_cpu_s"] == 2.0


BUSY = "import time\nt=time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"


def test_tree_cpu_counts_a_busy_grandchild():
    # The child only waits; its own child burns ~0.6 CPU s. The tree rooted at the child must see it.
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY!r}])"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline, cpu, count = time.monotonic() + 30, 0.0, 0
        while time.monotonic() < deadline:
            cpu, count = bench.tree_cpu(child.pid)
            if count == 2 and cpu >= 0.55:
                break
            time.sleep(0.2)
        assert count == 2 and cpu >= 0.55
    finally:
        for pid, (ppid, _) in bench._proc_stats().items():
            if ppid == child.pid:
                os.kill(pid, 9)
        child.kill()
        child.wait()
