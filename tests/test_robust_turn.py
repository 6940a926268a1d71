"""The sudden-turn check of the leave-one-out screen (server/robust.py): a shop that turns after honest rounds."""

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
from server.robust import LooEntry, RobustSettings, TurnLevel, judge_loo, reputation, screen, turn_level
from server.strategies import ShopStrategy

N = 8
FLIPPER = 3
LOO_ONLY = RobustSettings(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0, loo_turn_margin=0.1)
NO_TURN = RobustSettings(norm_factor=0.0, min_cosine=-1.0, examples_cap=0.0, weight_cap=0.0, loo_turn_margin=0.0)


def _honest(rnd: int, size: int = 400, strength: float = 0.4) -> list[np.ndarray]:
    """One round of honest updates: a common step (new each round) under large shop-specific noise."""
    rng = np.random.default_rng(100 + rnd)
    common = rng.normal(size=size)
    return [strength * common + rng.normal(size=size) for _ in range(N)]


class Rounds:
    """Feeds rounds through `screen` keeping history and turn levels as `ShopStrategy` does."""

    def __init__(self, settings: RobustSettings) -> None:
        self.settings = settings
        self.history: list[list[LooEntry]] = [[] for _ in range(N)]
        self.turns: list[TurnLevel | None] = [None] * N

    def run(self, deltas: list[np.ndarray]) -> dict[int, str]:
        out = screen(deltas, [1.0] * N, [None] * N, self.settings, loo_history=self.history, turns=self.turns)
        for i in out.loo:
            self.history[i] = [*self.history[i], [out.loo[i], out.round_weight]]
        for i, level in out.turns.items():
            self.turns[i] = level
        return out.left_out


def _flipped(rnd: int, flip: bool) -> list[np.ndarray]:
    deltas = _honest(rnd)
    if flip:
        deltas[FLIPPER] = -deltas[FLIPPER]
    return deltas


@pytest.mark.parametrize("turn", [4, 6, 10])
def test_a_late_flip_is_caught_the_round_it_turns_stays_out_and_comes_back_when_honest(turn):
    flips = set(range(turn, turn + 4))  # flipped for 4 rounds, honest again after
    screens, reputation_only = Rounds(LOO_ONLY), Rounds(NO_TURN)
    for rnd in range(1, turn + 7):
        left_out = screens.run(_flipped(rnd, rnd in flips))
        assert set(left_out) == ({FLIPPER} if rnd in flips else set()), (rnd, left_out)
        if rnd == turn:
            assert left_out[FLIPPER].startswith("sudden turn: leave-one-out cosine")
            assert "pre-turn level" in left_out[FLIPPER] and "robust-loo-turn-margin=0.1" in left_out[FLIPPER]
        elif rnd in flips:
            assert left_out[FLIPPER].startswith("sudden turn") and " still " in left_out[FLIPPER]
        assert (screens.turns[FLIPPER] is not None) == (rnd in flips)
        # the consensus-weighted reputation alone lets the turned shop in: its honest rounds outweigh the flips
        assert not reputation_only.run(_flipped(rnd, rnd in flips))
    level = turn_level(screens.history[FLIPPER][:turn - 1])
    assert level is not None and level[0] > 0.1  # its honest level before the turn


def test_a_shop_flipping_from_round_1_is_left_out_by_its_reputation_not_a_turn():
    screens = Rounds(LOO_ONLY)
    for rnd in range(1, 4):
        left_out = screens.run(_flipped(rnd, True))
        assert set(left_out) == {FLIPPER} and "leave-one-out cosine" in left_out[FLIPPER]
        assert not left_out[FLIPPER].startswith("sudden turn")


def test_a_consensus_wide_dip_is_no_turn_but_the_same_drop_alone_is():
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    every = {0: -0.12, 1: -0.05, 2: -0.02, 3: 0.0, 4: -0.04, 5: -0.1, 6: -0.03, 7: -0.06}  # every cosine drops
    verdict = judge_loo(every, list(range(N)), history, [None] * N, LOO_ONLY)
    assert not verdict.left_out and all(level is None for level in verdict.turns.values())
    alone = {i: 0.3 for i in range(N)} | {0: -0.12}  # the others stay where they were
    verdict = judge_loo(alone, list(range(N)), history, [None] * N, LOO_ONLY)
    assert set(verdict.left_out) == {0} and verdict.left_out[0].startswith("sudden turn")
    assert verdict.turns[0] == pytest.approx([0.3, 0.3])


def test_a_drop_above_the_bound_or_smaller_than_the_margin_is_no_turn():
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    others = {i: 0.3 for i in range(N)}
    assert not judge_loo(others | {0: -0.05}, list(range(N)), history, [None] * N, LOO_ONLY).left_out  # > -0.08
    low = [[[0.0, 0.3], [-0.04, 0.3]] for _ in range(N)]
    assert not judge_loo(others | {0: -0.09}, list(range(N)), low, [None] * N, LOO_ONLY).left_out  # 0.07 < 0.1
    assert set(judge_loo(others | {0: -0.13}, list(range(N)), low, [None] * N, LOO_ONLY).left_out) == {0}


def test_once_turned_a_shop_stays_out_while_far_below_its_level_and_below_the_median_even_above_the_bound():
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    late = {i: 0.03 for i in range(N)}  # late in training every cosine is small
    turned: list[TurnLevel | None] = [[0.3, 0.3]] + [None] * (N - 1)
    verdict = judge_loo(late | {0: -0.04}, list(range(N)), history, turned, LOO_ONLY)  # flipped, above -0.08
    assert set(verdict.left_out) == {0} and " still " in verdict.left_out[0] and verdict.turns[0] == [0.3, 0.3]
    verdict = judge_loo(late | {0: 0.05}, list(range(N)), history, turned, LOO_ONLY)  # honest again, above the median
    assert not verdict.left_out and verdict.turns[0] is None  # rejoins although 0.25 below its early level


def test_a_turn_an_earlier_screen_caught_keeps_the_honest_level_for_the_next_round():
    """Live, seed 0: shop_00 flipping from round 4 was left out by the direction check in round 5; without its turn
    level, round 6 compared its cosine with a level averaging that flipped round and let it in."""
    history = [[[0.2, 0.3], [0.2, 0.3], [0.04, 0.19], [-0.01, 0.21]] for _ in range(N)]  # a good reputation
    loo = {i: 0.2 for i in range(N)} | {0: -0.31}
    verdict = judge_loo(loo, list(range(1, N)), history, [None] * N, LOO_ONLY)  # 0 already out (direction check)
    assert 0 not in verdict.left_out and verdict.turns[0] == pytest.approx([0.015, 0.2])
    history = [[*h, [loo[i], 0.2]] for i, h in enumerate(history)]
    nxt = {i: 0.1 for i in range(N)} | {0: -0.17}
    kept = list(range(N))
    verdict = judge_loo(nxt, kept, history, [verdict.turns[0]] + [None] * (N - 1), LOO_ONLY)
    assert set(verdict.left_out) == {0} and " still " in verdict.left_out[0]
    assert not judge_loo(nxt, kept, history, [None] * N, LOO_ONLY).left_out  # without the level: in


# The first 20 rounds of a clean 30-round run (tests/test_robust_loo.py, benchmarks/results/byzantine_loo30.json): the
# honest largest shop's leave-one-out cosine drifts below -0.08 from round 9 on, one round at a time.
SHOP00_COSINES = [0.169, 0.048, 0.038, 0.004, -0.028, 0.019, -0.024, -0.027, -0.087, -0.123, -0.141, -0.152, -0.179,
                  -0.176, -0.187, -0.194, -0.176, -0.17, -0.19, -0.199]
SHOP00_CONSENSUS = [0.188, 0.344, 0.185, 0.203, 0.22, 0.226, 0.148, 0.139, 0.109, 0.051, 0.066, 0.061, 0.034, 0.066,
                    0.032, 0.037, 0.052, 0.045, 0.023, 0.022]


def test_the_honest_largest_shops_slow_drift_below_the_bound_is_no_turn():
    history: list[list[LooEntry]] = [[] for _ in range(N)]
    for cos, cons in zip(SHOP00_COSINES, SHOP00_CONSENSUS, strict=True):
        loo = {i: cons for i in range(1, N)} | {0: cos}  # the others at the round's consensus
        verdict = judge_loo(loo, list(range(N)), history, [None] * N, LOO_ONLY)
        assert not verdict.left_out, (len(history[0]) + 1, verdict.left_out)
        for i in range(N):
            history[i].append([loo[i], verdict.round_weight])


def test_margin_0_turns_the_check_off():
    screens = Rounds(NO_TURN)
    for rnd in range(1, 9):
        assert not screens.run(_flipped(rnd, rnd >= 5)), rnd
    assert screens.turns == [None] * N
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    verdict = judge_loo({i: 0.3 for i in range(N)} | {0: -0.5}, list(range(N)), history, [None] * N, NO_TURN)
    assert not verdict.left_out and not verdict.turns
    assert reputation(history[0], -0.5, 0.3) > -0.08  # what lets it in without the check


def test_the_majority_guard_and_the_minimum_count_still_hold():
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    turned = {i: (-0.4 if i < 4 else 0.3) for i in range(N)}  # half turn at once
    verdict = judge_loo(turned, list(range(N)), history, [None] * N, LOO_ONLY)
    assert len(verdict.left_out) == (N - 1) // 2 and all(verdict.turns[i] is not None for i in range(4))
    four = [d for d in _flipped(5, True)[:4]]
    out = screen(four, [1.0] * 4, [None] * 4, LOO_ONLY, loo_history=[[[0.3, 0.3]] * 2] * 4, turns=[[0.3, 0.3]] * 4)
    assert not out.left_out and not out.turns  # fewer than 5 updates: no leave-one-out check, levels untouched
    history = [[[0.3, 0.3], [0.3, 0.3]] for _ in range(N)]
    both = {i: 0.3 for i in range(N)} | {0: -0.4, 1: -0.3, 2: -0.6, 3: -0.5}
    history[2] = [[-0.6, 0.3], [-0.6, 0.3]]  # a bad reputation: goes first
    verdict = judge_loo(both, list(range(N)), history, [None] * N, LOO_ONLY)
    assert set(verdict.left_out) == {2, 3, 0}  # room for 3: the reputation, then the lowest turned cosines
    assert not verdict.left_out[2].startswith("sudden turn") and verdict.turns[1] is not None


# ---- through ShopStrategy and checkpoints --------------------------------------------------------------------------

SHAPES = {"a": (20, 3), "b": (15,)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _round(strategy: ShopStrategy, deltas: list[np.ndarray], rnd: int) -> dict[str, str]:
    """One round of N shops replying ``global + delta``; returns the round's left-out shops."""
    reports = []
    strategy.on_round_end = reports.append
    sent = strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(),
                                    LocalGrid(N, None))
    out = []
    for msg in sent:
        i = msg.metadata.dst_node_id - 1000
        record = ArrayRecord({"a": Array(deltas[i][:60].reshape(20, 3).astype(np.float32)),
                              "b": Array(deltas[i][60:].astype(np.float32))})
        out.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 100.0,
                                                                                  "shop-index": i})}),
                           reply_to=msg))
    strategy.aggregate_train(rnd, out)
    strategy.aggregate_evaluate(rnd, [])
    return reports[0].left_out


def _strategy(history: dict | None = None, turns: dict | None = None) -> ShopStrategy:
    inner = FedAvg(min_train_nodes=N, min_available_nodes=N, fraction_evaluate=0.0)
    return ShopStrategy(inner, min_shops=2, shop_name=lambda i: f"shop_{i:02d}", robust=LOO_ONLY,
                        loo_history=history, loo_turns=turns)


def _deltas(rnd: int, flip: bool) -> list[np.ndarray]:
    deltas = _honest(rnd, size=75)
    if flip:
        deltas[FLIPPER] = -deltas[FLIPPER]
    return deltas


def test_the_turn_survives_a_checkpoint_and_resume(tmp_path):
    strategy = _strategy()
    for rnd in range(1, 7):  # honest rounds 1-3, flipped 4-6
        left_out = _round(strategy, _deltas(rnd, rnd >= 4), rnd)
        assert set(left_out) == ({"shop_03"} if rnd >= 4 else set()), rnd
    assert set(strategy.loo_turns) == {"shop_03"}
    save_checkpoint(tmp_path, Checkpoint(6, {"w": np.zeros(2, dtype=np.float32)}, loo_history=strategy.loo_history,
                                         loo_turns=strategy.loo_turns))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.loo_turns == strategy.loo_turns
    resumed = _strategy(ckpt.loo_history, ckpt.loo_turns)
    assert set(_round(resumed, _deltas(7, True), 7)) == {"shop_03"}  # still out after --resume
    assert set(_round(strategy, _deltas(7, True), 7)) == {"shop_03"}  # as the uninterrupted run
    forgetful = _strategy(ckpt.loo_history)  # the history without the turn: its last rounds are flipped already
    assert "shop_03" not in _round(forgetful, _deltas(7, True), 7)
    assert not _round(resumed, _deltas(8, False), 8) and not resumed.loo_turns  # honest again: rejoins


def test_an_old_checkpoint_without_turns_loads_and_a_bad_one_is_refused(tmp_path):
    history = {"shop_00": [[0.2, 0.3], [0.25, 0.3]]}
    save_checkpoint(tmp_path, Checkpoint(2, {"w": np.zeros(2, dtype=np.float32)}, loo_history=history,
                                         loo_turns={"shop_00": [0.225, 0.3]}))
    path = list_checkpoints(tmp_path)[0]
    payload = torch.load(path, weights_only=True)
    assert payload["loo_turns"] == {"shop_00": [0.225, 0.3]}
    del payload["loo_turns"]  # written before the check existed
    torch.save(payload, path)
    old = latest_checkpoint(tmp_path)
    assert old.loo_turns == {} and old.loo_history == history
    assert _strategy(old.loo_history, old.loo_turns).loo_turns == {}
    for bad in ("x", {"shop_00": 0.2}, {"shop_00": [0.2]}, {"shop_00": ["a", 0.3]}, {1: [0.2, 0.3]}):
        payload["loo_turns"] = bad
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match="loo_turns.*Fix"):
            load_checkpoint(path)


# ---- settings ------------------------------------------------------------------------------------------------------

def test_the_run_config_key_reaches_the_screen_and_is_on_by_default():
    assert FederationSettings.from_config({}).robust_settings().loo_turn_margin == 0.0  # opt-in
    assert FederationSettings.from_config({"robust-loo-turn-margin": 0.0}).robust_settings().loo_turn_margin == 0.0
    assert FederationSettings.from_config({"robust-loo-turn-margin": 0.2}).robust_settings().loo_turn_margin == 0.2
    assert RobustSettings.off().loo_turn_margin == 0.0


@pytest.mark.parametrize("bad", [-0.1, 2.5])
def test_a_margin_outside_0_2_is_refused(bad):
    with pytest.raises(ValueError, match=r"robust-loo-turn-margin.*Fix"):
        RobustSettings(loo_turn_margin=bad)
    with pytest.raises(ValueError, match="robust.loo.turn.margin"):
        FederationSettings.from_config({"robust-loo-turn-margin": bad})
