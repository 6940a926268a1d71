"""Fused evaluation without a second restore (#15 review): the model evaluates as it is when it provably holds
what `save_local_part` just wrote, with metrics bit-identical to the evaluate message's, the model cache off."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from flower_harness import one_shop
from flwr.app import Context, MessageType

from client import client_app, local_state, shop_round
from simulations.pool_grid import ON_DISK_RECORDS


@pytest.fixture
def spied(monkeypatch):
    """Counts of state-file reads (`torch.load` of the local-part files) and of the restore calls."""
    monkeypatch.setenv("FEDSHOP_MODEL_CACHE", "0")
    counts: Counter = Counter()
    real_load = torch.load

    def load(path, *args, **kwargs):
        if Path(str(path)).name in (local_state.STATE_FILE, local_state.PREVIOUS_FILE):
            counts["state-file reads"] += 1
        return real_load(path, *args, **kwargs)

    def count(name, real):
        def spy(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return spy

    monkeypatch.setattr(local_state.torch, "load", load)
    monkeypatch.setattr(shop_round, "restore_local_part", count("restore_local_part", shop_round.restore_local_part))
    monkeypatch.setattr(shop_round, "restore_own_encoder", count("restore_own_encoder", shop_round.restore_own_encoder))
    return counts


def _setup(tmp_path: Path):
    return one_shop(tmp_path)


def _drop_disk_records(ctx: Context) -> None:
    for name in ON_DISK_RECORDS:  # as a pool worker does after every message: the next one reads the file
        ctx.state.pop(name, None)


def _rounds(message, ctx: Context, spied: Counter, rounds: int = 3) -> list[tuple[Counter, bool]]:
    """Per round: the fused train message's counts, and whether its metrics equal the evaluate message's."""
    out = []
    for rnd in range(1, rounds + 1):
        spied.clear()
        fused = client_app.train(message(MessageType.TRAIN, rnd, **{"evaluate-after-train": True}), ctx)
        counts = Counter(spied)
        _drop_disk_records(ctx)
        plain = client_app.evaluate(message(MessageType.EVALUATE, rnd), ctx).content["metrics"]
        _drop_disk_records(ctx)
        out.append((counts, dict(fused.content["evaluate-metrics"]) == dict(plain)))
    return out


def test_fused_evaluation_restores_nothing_again_and_matches_the_evaluate_message(tmp_path, spied):
    message, ctx = _setup(tmp_path)
    for rnd, (counts, same) in enumerate(_rounds(message, ctx, spied), 1):
        assert same, f"round {rnd}: fused metrics differ from the evaluate message's"
        # One restore of the saved state per message (the round start), read from the file from round 2 on;
        # the own encoder once, for the personal mix's start; nothing after training.
        assert counts["restore_local_part"] == 1 and counts["restore_own_encoder"] == 1, counts
        assert counts["state-file reads"] == (0 if rnd == 1 else 1), counts


def test_a_model_written_after_its_save_is_restored_first(tmp_path, spied, monkeypatch):
    # Any in-place write after the save (here a no-op add, which still bumps the tensor's version) voids the
    # proof: the evaluation then restores the saved state, as before, with the same metrics.
    real = shop_round.train_round

    def touched(shop, model, settings, context, received):
        result = real(shop, model, settings, context, received)
        with torch.no_grad():
            next(model.local.parameters()).add_(0.0)
        return result

    monkeypatch.setattr(client_app, "train_round", touched)
    message, ctx = _setup(tmp_path)
    for counts, same in _rounds(message, ctx, spied, rounds=2):
        assert same
        assert counts["restore_local_part"] == 2 and counts["restore_own_encoder"] == 3, counts
