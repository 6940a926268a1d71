"""The leave-one-out reputation screen (server/robust.py): each update against the mean of the others."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from server.federation_settings import FederationSettings
from server.robust import LOO_MIN_UPDATES, RobustSettings, consensus, leave_one_out, reputation, screen
from server.strategies import RoundReport, ShopStrategy

N = 8
LOO_ONLY = RobustSettings(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0)  # only this screen


def _barely_aligned(deltas: list[np.ndarray], i: int, cosine: float = 0.05) -> list[np.ndarray]:
    """``deltas`` with update i replaced by one of the same norm whose cosine with the others' mean is ``cosine``."""
    mean = np.mean([d for j, d in enumerate(deltas) if j != i], axis=0)
    unit = mean / np.linalg.norm(mean)
    ortho = np.random.default_rng(7).normal(size=mean.size)
    ortho -= (ortho @ unit) * unit
    ortho /= np.linalg.norm(ortho)
    out = list(deltas)
    out[i] = np.linalg.norm(deltas[i]) * (cosine * unit + np.sqrt(1 - cosine ** 2) * ortho)
    return out


def _heterogeneous(n: int, seed: int = 0, size: int = 400) -> list[np.ndarray]:
    """Honest updates that agree only weakly: a small common step under large shop-specific noise."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=size)
    return [0.4 * common + rng.normal(size=size) for _ in range(n)]


def test_a_sign_flipped_update_is_left_out_with_the_reason():
    deltas = _heterogeneous(N)
    deltas[2] = -deltas[2]
    out = screen(deltas, [1.0] * N, [None] * N, LOO_ONLY)
    assert set(out.left_out) == {2}
    assert "leave-one-out cosine" in out.left_out[2] and out.loo[2] < -0.08
    assert all(out.loo[i] > 0 for i in range(N) if i != 2)


def test_honest_heterogeneous_updates_are_all_kept():
    for seed in range(20):
        deltas = _heterogeneous(N, seed=seed)
        deltas[0] = 3.0 * deltas[0]  # one much larger shop
        out = screen(deltas, [1.0] * N, [None] * N, RobustSettings())
        assert not out.left_out, (seed, out.left_out)
        assert len(out.loo) == N


def test_fewer_than_five_updates_turn_the_screen_off():
    five = _heterogeneous(LOO_MIN_UPDATES)
    five[0] = -five[0]
    assert set(screen(five, [1.0] * 5, [None] * 5, LOO_ONLY).left_out) == {0}
    four = five[:LOO_MIN_UPDATES - 1]
    out = screen(four, [1.0] * 4, [None] * 4, LOO_ONLY)
    assert not out.left_out and not out.loo


def test_the_majority_guard_never_leaves_out_more_than_n_minus_1_over_2():
    rng = np.random.default_rng(4)
    deltas = [rng.normal(size=500) for _ in range(7)]  # nearly orthogonal: every score is ~0, below 0.5
    strict = RobustSettings(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0, loo_min_cosine=0.5)
    out = screen(deltas, [1.0] * 7, [None] * 7, strict)
    assert len(out.left_out) == (7 - 1) // 2
    lowest = sorted(out.loo, key=out.loo.get)[:3]
    assert set(out.left_out) == set(lowest)  # the lowest scores go first


def test_the_others_are_only_the_updates_kept_by_earlier_screens():
    deltas = _heterogeneous(N)
    deltas[1] = -1000.0 * deltas[1]  # left out by the norm bound: it must not drag the others' mean
    out = screen(deltas, [1.0] * N, [None] * N, RobustSettings(min_cosine=-1.0))
    assert set(out.left_out) == {1} and "norm" in out.left_out[1]
    assert out.loo[1] < 0 and all(out.loo[i] > 0 for i in range(N) if i != 1)
    kept = [i for i in range(N) if i != 1]
    mean_of_others = np.mean([deltas[j] for j in kept if j != 0], axis=0)
    expected = float(deltas[0] @ mean_of_others / np.linalg.norm(deltas[0]) / np.linalg.norm(mean_of_others))
    assert leave_one_out(deltas, kept)[0] == pytest.approx(expected)


def test_a_bad_reputation_keeps_a_shop_out_when_this_round_looks_harmless():
    assert reputation([], 0.05) == 0.05  # first round: this round's cosine alone
    assert reputation([-0.3, -0.2], 0.05) == pytest.approx(-0.15)
    assert reputation([0.4, 0.4], -0.2) == pytest.approx(0.2)  # once it has history, the mean decides
    deltas = _barely_aligned(_heterogeneous(N), 5)  # cosine 0.05 this round: alone, it passes
    history = [[0.3]] * N
    history[5] = [-0.4, -0.3]
    out = screen(deltas, [1.0] * N, [None] * N, LOO_ONLY, loo_history=history)
    assert set(out.left_out) == {5} and "mean over its rounds" in out.left_out[5]
    assert not screen(deltas, [1.0] * N, [None] * N, LOO_ONLY).left_out  # without that history it stays in


def test_an_honest_shop_with_one_bad_round_late_in_training_is_kept():
    """The 10-round false positive: honest shop_00 scored -0.087 in round 9 after eight rounds near +0.02."""
    deltas = _barely_aligned(_heterogeneous(N, seed=3), 0, cosine=-0.12)  # below -0.08 this round
    history = [[0.3] * 8 for _ in range(N)]
    history[0] = [0.05, 0.03, 0.02, 0.0, 0.01, 0.04, 0.0, 0.02]
    out = screen(deltas, [1.0] * N, [None] * N, LOO_ONLY, loo_history=history)
    assert out.loo[0] == pytest.approx(-0.12) and not out.left_out  # mean over its 9 rounds ~0.006: kept
    assert set(screen(deltas, [1.0] * N, [None] * N, LOO_ONLY).left_out) == {0}  # a first round alone: out


# The first 20 rounds of a clean 30-round run (benchmarks/results/byzantine_loo30.json, reduced world, seed 0): the
# honest largest shop's leave-one-out cosine per round and the round's consensus (median of the 8 shops' cosines).
SHOP00_COSINES = [0.169, 0.048, 0.038, 0.004, -0.028, 0.019, -0.024, -0.027, -0.087, -0.123, -0.141, -0.152, -0.179,
                  -0.176, -0.187, -0.194, -0.176, -0.17, -0.19, -0.199]
SHOP00_CONSENSUS = [0.188, 0.344, 0.185, 0.203, 0.22, 0.226, 0.148, 0.139, 0.109, 0.051, 0.066, 0.061, 0.034, 0.066,
                    0.032, 0.037, 0.052, 0.045, 0.023, 0.022]


def test_an_honest_large_shop_whose_late_cosines_drift_negative_is_kept_over_20_rounds():
    history: list = []
    for cos, weight in zip(SHOP00_COSINES, SHOP00_CONSENSUS, strict=True):
        assert reputation(history, cos, weight) > -0.08, len(history) + 1
        history.append([cos, weight])
    assert reputation(history[:-1], SHOP00_COSINES[-1], SHOP00_CONSENSUS[-1]) == pytest.approx(-0.019, abs=1e-3)
    # the plain mean (the rule until 2026-12-06) would have left it out in rounds 19-20
    assert reputation(history[:-1], SHOP00_COSINES[-1], rule="mean") < -0.08
    # and through the screen: round 21 with that history and a this-round cosine of -0.2 keeps it in
    deltas = _barely_aligned(_heterogeneous(N, seed=3), 0, cosine=-0.2)
    others = [[[0.2, w] for w in SHOP00_CONSENSUS] for _ in range(N - 1)]
    assert not screen(deltas, [1.0] * N, [None] * N, LOO_ONLY, loo_history=[history, *others]).left_out
    mean_rule = RobustSettings(**{**LOO_ONLY.__dict__, "loo_rule": "mean"})
    assert set(screen(deltas, [1.0] * N, [None] * N, mean_rule, loo_history=[history, *others]).left_out) == {0}


def test_the_consensus_is_the_median_leave_one_out_cosine_and_never_negative():
    assert consensus({0: 0.3, 1: -0.9, 2: 0.1, 3: 0.2}, [0, 1, 2]) == pytest.approx(0.1)
    assert consensus({0: -0.3, 1: -0.2, 2: 0.1}, [0, 1, 2]) == 0.0
    out = screen(_heterogeneous(N), [1.0] * N, [None] * N, LOO_ONLY)
    assert out.round_weight == out.consensus == pytest.approx(float(np.median(list(out.loo.values()))))
    assert 0.1 < out.consensus < 0.5  # honest updates that agree: an informative round
    by_agreement = screen(_heterogeneous(N), [1.0] * N, [None] * N, RobustSettings(**{**LOO_ONLY.__dict__,
                                                                                    "loo_rule": "agreement"}))
    assert by_agreement.round_weight == by_agreement.agreement and 0 < by_agreement.agreement < 1


@pytest.mark.parametrize(("honest_rounds", "early_weight", "delay"), [(1, 0.15, 0), (2, 0.15, 1), (2, 0.3, 2)])
def test_a_shop_that_turns_against_the_others_is_left_out_after_a_measured_delay(honest_rounds, early_weight, delay):
    """Honest (cosine 0.1) for a few rounds of consensus ``early_weight``, then flipping (cosine -0.3) in rounds of
    consensus 0.15-0.26: left out ``delay`` rounds after the turn. The more informative its honest rounds were, the
    longer its reputation carries it (the price of weighting; the plain mean gives the (2, 0.15) delay). The reputation
    alone: the sudden-turn check (on by default) catches these at once (tests/test_robust_turn.py)."""
    reputation_only = RobustSettings(**{**LOO_ONLY.__dict__, "loo_turn_margin": 0.0})
    history = [[[0.2, early_weight]] * honest_rounds for _ in range(N)]
    history[4] = [[0.1, early_weight]] * honest_rounds
    dropped = []
    for rnd in range(6):
        deltas = _barely_aligned(_heterogeneous(N, seed=10 + rnd), 4, cosine=-0.3)
        out = screen(deltas, [1.0] * N, [None] * N, reputation_only, loo_history=history)
        assert 0.1 < out.consensus < 0.3, out.consensus
        for i in range(N):
            history[i] = [*history[i], [out.loo[i], out.round_weight]]
        dropped.append(4 in out.left_out)
        assert set(out.left_out) <= {4}
    assert dropped == [False] * delay + [True] * (6 - delay)


# ---- through ShopStrategy: the left-out report and the history ----------------------------------------------

SHAPES = {"a": (20, 3), "b": (15,)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _round(strategy: ShopStrategy, deltas: list[np.ndarray], rnd: int = 1) -> RoundReport:
    """One round of N shops replying ``global + delta`` (flat deltas in sorted key order)."""
    reports: list[RoundReport] = []
    strategy.on_round_end = reports.append
    sent = strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(),
                                    LocalGrid(N, None))
    out = []
    for msg in sent:
        i = msg.metadata.dst_node_id - 1000
        a, b = deltas[i][:60].reshape(20, 3), deltas[i][60:]
        record = ArrayRecord({"a": Array(a.astype(np.float32)), "b": Array(b.astype(np.float32))})
        out.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 100.0,
                                                                                  "shop-index": i})}),
                           reply_to=msg))
    strategy.aggregate_train(rnd, out)
    strategy.aggregate_evaluate(rnd, [])
    return reports[0]


def _strategy(history: dict[str, list] | None = None) -> ShopStrategy:
    inner = FedAvg(min_train_nodes=N, min_available_nodes=N, fraction_evaluate=0.0)
    return ShopStrategy(inner, min_shops=2, shop_name=lambda i: f"shop_{i:02d}",
                        robust=RobustSettings(min_cosine=-1.0), loo_history=history)


def test_the_strategy_reports_the_flipped_shop_and_keeps_every_shops_history():
    deltas = _heterogeneous(N, size=75)
    strategy = _strategy()
    report = _round(strategy, [-deltas[0], *deltas[1:]])
    assert set(report.left_out) == {"shop_00"} and "leave-one-out" in report.left_out["shop_00"]
    assert "shop_00" not in report.train
    report = _round(strategy, deltas, rnd=2)  # shop_00 honest again: its flagged round 1 still counts
    history = strategy.loo_history
    assert set(history) == {f"shop_{i:02d}" for i in range(N)} and all(len(v) == 2 for v in history.values())
    assert history["shop_00"][0][0] < -0.08 < history["shop_00"][1][0]
    assert all(0 < w < 1 for _, w in history["shop_00"])  # each round's consensus is kept as its weight
    assert ("shop_00" in report.left_out) == (reputation(history["shop_00"][:1], *history["shop_00"][1]) < -0.08)
    history["shop_00"].append(9.0)  # a copy: the strategy's own history is untouched
    assert len(strategy.loo_history["shop_00"]) == 2


def test_a_persistent_attacker_is_left_out_from_its_first_round_on():
    strategy = _strategy()
    for rnd in range(1, 6):
        deltas = _heterogeneous(N, seed=20 + rnd, size=75)
        report = _round(strategy, [-deltas[0], *deltas[1:]], rnd=rnd)
        assert set(report.left_out) == {"shop_00"}, rnd
    history = strategy.loo_history["shop_00"]
    assert len(history) == 5 and reputation(history[:-1], *history[-1]) < -0.08


def test_a_resumed_run_keeps_an_honest_shop_with_one_bad_round(tmp_path):
    deltas = _barely_aligned(_heterogeneous(N, seed=5, size=75), 2, cosine=-0.12)
    history = {f"shop_{i:02d}": [0.2, 0.1, 0.15] for i in range(N)}
    save_checkpoint(tmp_path, Checkpoint(3, {"w": np.zeros(2, dtype=np.float32)}, loo_history=history))
    restored = latest_checkpoint(tmp_path).loo_history
    assert "shop_02" not in _round(_strategy(restored), deltas, rnd=4).left_out
    assert "shop_02" in _round(_strategy(), deltas, rnd=4).left_out  # without its history it would be out


def test_a_restored_history_is_used_in_the_next_round():
    deltas = _barely_aligned(_heterogeneous(N, size=75), 3)
    assert "shop_03" not in _round(_strategy(), deltas).left_out
    report = _round(_strategy({"shop_03": [-0.5, -0.4]}), deltas)
    assert "shop_03" in report.left_out


# ---- checkpoint and settings ------------------------------------------------------------------------------------

def test_the_history_survives_a_checkpoint_and_old_checkpoints_still_load(tmp_path):
    history = {"shop_00": [[0.17, 0.3], [-0.05, 0.02]], "shop_01": [[0.2, 0.3]]}
    save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2, dtype=np.float32)}, loo_history=history))
    assert latest_checkpoint(tmp_path).loo_history == history  # the round weights too
    path = list_checkpoints(tmp_path)[0]
    payload = torch.load(path, weights_only=True)
    payload["loo_history"] = {"shop_00": [0.17, -0.05]}  # written before rounds were weighted: bare cosines
    torch.save(payload, path)
    assert latest_checkpoint(tmp_path).loo_history == {"shop_00": [[0.17, 1.0], [-0.05, 1.0]]}  # each weighs 1
    del payload["loo_history"]  # written before the screen existed
    torch.save(payload, path)
    assert latest_checkpoint(tmp_path).loo_history == {}
    for bad in ("bad", [[0.1, 0.2, 0.3]], [["x", 1.0]]):
        payload["loo_history"] = {"shop_00": bad}
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match="loo_history"):
            load_checkpoint(path)


def test_a_resumed_run_keeps_the_round_weights(tmp_path):
    """Resuming from a checkpoint decides exactly as the uninterrupted run: the weights, not only the cosines."""
    strategy = _strategy()
    for rnd in range(1, 4):
        _round(strategy, _heterogeneous(N, seed=30 + rnd, size=75), rnd=rnd)
    save_checkpoint(tmp_path, Checkpoint(3, {"w": np.zeros(2, dtype=np.float32)}, loo_history=strategy.loo_history))
    restored = _strategy(latest_checkpoint(tmp_path).loo_history)
    assert restored.loo_history == strategy.loo_history
    assert any(w != 1.0 for v in restored.loo_history.values() for _, w in v)
    deltas = _barely_aligned(_heterogeneous(N, seed=40, size=75), 2, cosine=-0.3)
    assert _round(restored, deltas, rnd=4).left_out.keys() == _round(strategy, deltas, rnd=4).left_out.keys()
    assert restored.loo_history == strategy.loo_history


@pytest.mark.parametrize("bad", [1.5, -1.01])
def test_a_loo_threshold_outside_minus_1_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"robust-loo-min-cosine.*Fix"):
        RobustSettings(loo_min_cosine=bad)
    with pytest.raises(ValueError, match="robust.loo.min.cosine"):
        FederationSettings.from_config({"robust-loo-min-cosine": bad})


def test_the_run_config_key_reaches_the_screen_and_is_on_by_default():
    assert FederationSettings.from_config({}).robust_settings().loo_min_cosine == -0.08
    assert FederationSettings.from_config({"robust-loo-min-cosine": -1.0}).robust_settings().loo_min_cosine == -1.0
    assert RobustSettings.off().loo_min_cosine == -1.0
    assert RobustSettings().loo_rule == "consensus"
    with pytest.raises(ValueError, match="leave-one-out rule 'median'.*Fix"):
        RobustSettings(loo_rule="median")


def _dominant_against_the_others(seed: int = 0) -> list[np.ndarray]:
    """FedAvg's fixed point in miniature: shop 0 steps against the others' common step."""
    deltas = _heterogeneous(N, seed=seed)
    deltas[0] = -0.5 * np.mean(deltas[1:], axis=0) + 0.2 * np.random.default_rng(seed + 50).normal(size=deltas[0].size)
    return deltas


def test_a_dominant_shop_left_out_by_leave_one_out_gets_a_reason_that_says_it_may_be_honest():
    """The largest default shop (44% of the examples) is flagged in clean runs; the reason says so and how to act."""
    deltas = _dominant_against_the_others()
    dominant = screen(deltas, [44.0] + [8.0] * (N - 1), [None] * N, LOO_ONLY)
    assert "leave-one-out cosine" in dominant.left_out[0]
    assert "holds 44% of the round's weight" in dominant.left_out[0]
    assert "robust-loo-min-cosine = -1" in dominant.left_out[0]
    equal = screen(deltas, [8.0] * N, [None] * N, LOO_ONLY)  # the same update from a shop of equal weight
    assert "leave-one-out cosine" in equal.left_out[0] and "round's weight" not in equal.left_out[0]
