"""benchmarks/small_screen.py: the rule replays on hand-made rounds, and a tiny recorded run with its JSON's shape.

The recorded run is the script's main path in this process (4 shops, 2 rounds, the pool engine with one worker),
with `server.strategies.screen` restored afterwards; `--replay` then reads its output back.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_harness import load_benchmark


@pytest.fixture(scope="module")
def small_screen():
    """The benchmark module."""
    return load_benchmark("small_screen")


def _round(cosines: list[float], pulls: list[float], kept: list[int] | None = None) -> dict:
    return {"cosines": cosines, "pulls": dict(enumerate(pulls)),
            "kept_before_direction": list(range(len(cosines))) if kept is None else kept}


def test_robust_z_is_zero_without_spread(small_screen) -> None:
    assert small_screen.robust_z(np.array([0.5, 0.5, 0.5])).tolist() == [0.0, 0.0, 0.0]
    z = small_screen.robust_z(np.array([0.0, 1.0, 2.0, 3.0, 100.0]))
    assert z[2] == 0.0 and z[0] == pytest.approx(-2 / 1.4826)


def test_replay_counts_what_each_rule_leaves_out(small_screen) -> None:
    # 20 updates near 0.8, two below min_cosine -0.1: a tiny one (pull 0.001) and an ordinary one (pull 0.2)
    cos = [0.8 + 0.01 * (i % 5) for i in range(20)] + [-0.5, -0.6]
    pulls = [0.05] * 20 + [0.001, 0.2]
    out = small_screen.replay([_round(cos, pulls), _round(cos, pulls, kept=list(range(21)))], -0.1)
    assert set(out) == {"absolute", "robust-z 3", "robust-z 4"} | {
        f"small-pull {p}/{t}" for p, t in small_screen.CANDIDATES}
    assert out["absolute"] == [2, 1]  # the second round's direction check never saw update 21
    assert out["robust-z 3"] == [2, 1] and out["robust-z 4"] == [2, 1]  # far below the round's spread
    assert out["small-pull 0.001/0.01"] == [1, 0]  # the tiny one exempted, the ordinary one not
    assert out["small-pull 0.01/0.25"] == [1, 0]


def test_sybil_replay_flips_a_share_and_counts_what_the_exemption_lets_through(small_screen) -> None:
    n = 40
    rounds = [_round([0.5] * n, [0.001] * (n // 2) + [0.1] * (n // 2)) for _ in range(3)]
    rows = small_screen.sybil_replay(rounds, -0.1, share=0.25, seed=0)
    assert len(rows) == 3
    for row in rows:
        assert row["sybils"] == 10 and row["sybils_flagged_by_threshold"] == 10  # every flip scores -0.5
        assert row["honest_flagged"] == 0 and row["honest_left_out_with_exemption"] == 0
        assert 0 <= row["sybils_left_out_with_exemption"] <= row["sybils"]
        assert row["pull_used"] <= 0.05 + 1e-9  # the default budget (robust-small-pull-total)
        assert row["sybil_pull_exempted"] <= row["sybil_pull_total"]
        tiny = row["sybil_pull_exempted"] / 0.001  # only tiny flips (pull 0.001 <= 0.01) can be exempted
        assert row["sybils"] - row["sybils_left_out_with_exemption"] == pytest.approx(tiny)


@pytest.fixture(scope="module")
def recorded(small_screen, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import server.strategies as strategies
    import simulations.console as console

    out = tmp_path_factory.mktemp("small-screen") / "small_screen.json"
    threads = torch.get_num_threads()  # main sets 1 thread, as in its own process
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategies, "screen", strategies.screen)  # main swaps in its recorder: restored on exit
        mp.setattr(console, "configure_logging", lambda _verbose: None)  # leave this process's logging alone
        mp.setattr(sys, "argv", ["small_screen.py", "--shops", "4", "--rounds", "2", "--workers", "1",
                                 "--out", str(out)])
        try:
            small_screen.main()
        finally:
            torch.set_num_threads(threads)
    return out, json.loads(out.read_text())


def test_a_recorded_run_has_a_summary_row_and_a_record_per_round(recorded) -> None:
    _, result = recorded
    assert {"argv", "shops", "overrides", "seconds", "uptime_before", "uptime_after", "cpus", "summary",
            "replay_left_out_per_round", "rounds"} <= set(result)
    assert result["shops"] == 4 and result["seconds"] > 0
    assert [row["round"] for row in result["summary"]] == [1, 2] and len(result["rounds"]) == 2
    for row, rec in zip(result["summary"], result["rounds"], strict=True):
        assert row["updates"] == rec["n"] == 4
        assert len(rec["norms"]) == len(rec["cosines"]) == len(rec["claims"]) == 4
        assert all(math.isfinite(x) and x >= 0 for x in rec["norms"]) and rec["median_norm"] > 0
        quantiles = row["cosine_quantiles_0_1_5_50_95"]
        assert len(quantiles) == 5 and quantiles == sorted(quantiles) and -1 <= quantiles[0] <= quantiles[-1] <= 1
        assert all(-1 <= c <= 1 for c in rec["loo"].values())
        assert 0 <= row["flagged_by_direction"] <= len(rec["kept_before_direction"]) <= 4
        assert row["left_out"] == len(rec["left_out"]) and row["exempt"] == len(rec["exempt"])
        assert 0 <= row["small_pull_used"] <= 0.05 + 1e-9 and row["pull_max"] >= row["pull_median"] > 0
        assert rec["min_cosine"] == -0.1 and rec["loo_min_cosine"] == -0.08  # the default screens
    assert all(len(v) == 2 for v in result["replay_left_out_per_round"].values())


def test_replay_reads_a_recorded_run_back(small_screen, recorded, capsys, monkeypatch) -> None:
    out, result = recorded
    monkeypatch.setattr(sys, "argv", ["small_screen.py", "--replay", str(out)])
    small_screen.main()
    printed = capsys.readouterr().out
    first = printed[:printed.index("sybils 5%:")]
    assert json.loads(first) == result["replay_left_out_per_round"]  # the same replay as the run wrote
    for share in ("5%", "20%"):
        line = next(x for x in printed.splitlines() if x.startswith(f"sybils {share}:"))
        rows = json.loads(line.split(":", 1)[1])
        assert len(rows) == 2 and all(r["sybils"] <= 4 for r in rows)
