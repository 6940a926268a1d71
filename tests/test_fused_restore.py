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
from shared.lazy_adam import DenseAdam
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


def test_an_optimiser_step_after_the_save_is_restored_first(tmp_path, spied, monkeypatch):
    # Adam's fused kernel (DenseAdam, the trainer's dense optimiser) writes without bumping tensor versions: a
    # step after the save changes no `_version`, yet the evaluation must restore the saved state.
    real = shop_round.train_round
    unbumped: list[bool] = []

    def stepped(shop, model, settings, context, received):
        result = real(shop, model, settings, context, received)
        params = list(model.local.parameters())
        before = [p._version for p in params]
        values = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        DenseAdam(params, lr=0.1).step()
        for p in params:
            p.grad = None
        assert any(not torch.equal(p, v) for p, v in zip(params, values, strict=True))  # it did write
        unbumped.append([p._version for p in params] == before)
        return result

    monkeypatch.setattr(client_app, "train_round", stepped)
    message, ctx = _setup(tmp_path)
    for counts, same in _rounds(message, ctx, spied, rounds=2):
        assert same, "the fused evaluation saw the stepped model, not the saved one"
        assert counts["restore_local_part"] == 2 and counts["restore_own_encoder"] == 3, counts
    assert unbumped == [True, True]  # versions alone would have missed the step


@pytest.mark.parametrize("make", [
    lambda ps: DenseAdam(ps, lr=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1),
], ids=["DenseAdam", "Adam-fused", "SGD"])
def test_any_optimiser_step_changes_the_state_versions(make):
    model = torch.nn.Linear(3, 2)
    other = torch.nn.Parameter(torch.zeros(2))  # a step of any optimiser in the process counts, even elsewhere
    saved = shop_round.state_versions(model)
    assert shop_round.state_versions(model) == saved  # nothing written: the proof holds
    other.grad = torch.ones(2)
    make([other]).step()
    assert shop_round.state_versions(model) != saved
