"""The per-process model cache (client/model_cache.py): reuse only what is provably the file's, evict by LRU."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client import best_val, local_state, model_cache
from client.local_state import (
    PREVIOUS_FILE,
    STATE_FILE,
    Shop,
    restore_local_part,
    restore_own_encoder,
    save_local_part,
)
from server.checkpoint import latest_checkpoint
from shared.features import build_shop_tensors
from simulations.federated import run_federated


@pytest.fixture(scope="module")
def scenario():
    return tiny_scenario()


@pytest.fixture()
def shops(scenario, tmp_path):
    model_cache.clear()
    made = [Shop(f"s{i}", i, scenario, build_shop_tensors(data, scenario.features), tmp_path / f"s{i}")
            for i, data in enumerate(scenario.training_shops())]
    yield made
    model_cache.clear()


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.fixture()
def reads(monkeypatch):
    """Counts the state-file reads (`torch.load` in client.local_state)."""
    count = [0]
    real = local_state._read_payload

    def counting(path, *args, **kwargs):
        count[0] += path.exists()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(local_state, "_read_payload", counting)
    return count


def _train(model) -> None:
    """Stands for a round of training: every local tensor changes in place (optimiser-style)."""
    with torch.no_grad():
        for tensor in model.local.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.add_(0.01)


def _round(shop, server_round: int, *, run: str = "run-a", own: bool = True, training: bool = True) -> tuple:
    """One message's life on the shop's cached model: restore, (train, save), and what it restored from."""
    model, context = shop.round_model(), _context()
    source = restore_local_part(model, context, shop.state_dir, server_round=server_round, run=run,
                                training=training)
    restored = (model.local_state(), restore_own_encoder(model, context))
    if training:
        _train(model)
        with torch.no_grad():
            model.encoder.price.bias.add_(float(server_round))  # the encoder the personal mix keeps
        save_local_part(model, context, shop.state_dir, shop=shop.name, server_round=server_round,
                        keep_own_encoder=own, run=run)
    return source, restored


def _file_local(path) -> dict:
    return torch.load(path, weights_only=True)["local"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_model_skips_the_read_only_while_it_holds_the_files_part(shops, reads):
    shop = shops[0]
    assert _round(shop, 1)[0] == "fresh"
    assert shop.round_model() is shop.round_model()  # reused
    source, (local, own) = _round(shop, 2)
    assert source == "disk" and reads[0] == 0  # the token proves the model holds round 1's file
    # ... and what it holds is the file's, own encoder included
    assert _equal(local, _file_local(shop.state_dir / PREVIOUS_FILE))
    saved_own = torch.load(shop.state_dir / PREVIOUS_FILE, weights_only=True)["own_encoder"]
    assert own is not None and _equal(own, saved_own)
    own["price.bias"].add_(100.0)  # a caller's copy: the cache's stays the file's
    source, (_, own_again) = _round(shop, 3, training=False)  # evaluation of round 3... of round 2's file
    assert source == "disk" and reads[0] == 0


def test_a_file_changed_behind_the_caches_back_is_read_again(shops, reads):
    shop = shops[0]
    _round(shop, 1)
    shutil.copy(shop.state_dir / STATE_FILE, shop.state_dir.parent / "backup.pt")  # round 1's part
    _round(shop, 2)
    _round(shop, 3)
    assert reads[0] == 0
    os.replace(shop.state_dir.parent / "backup.pt", shop.state_dir / STATE_FILE)  # an operator restores a backup
    source, (local, _) = _round(shop, 4, run="run-b")
    assert source == "disk" and reads[0] == 1
    assert _equal(local, _file_local(shop.state_dir / PREVIOUS_FILE))  # the backup's part, not the cached one
    # rewritten in place (same inode), same size: the mtime/ctime tell
    payload = torch.load(shop.state_dir / STATE_FILE, weights_only=True)
    payload["local"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["local"].items()}
    with open(shop.state_dir / STATE_FILE, "r+b") as fh:
        torch.save(payload, fh)
    source, (local, _) = _round(shop, 5, run="run-b")
    assert source == "disk" and reads[0] == 2 and _equal(local, payload["local"])


def test_a_model_changed_since_its_token_gets_the_files_part_back(shops, reads):
    shop = shops[0]
    _round(shop, 1)
    model = shop.round_model()
    restore_local_part(model, _context(), shop.state_dir, server_round=2, run="run-a")
    with torch.no_grad():  # fused Adam's way: writes that do not bump the tensors' version counters
        model.local.user_ids.weight.data.add_(1.0)
    source, (local, _) = _round(shop, 2)
    assert source == "disk" and reads[0] == 0  # the token's copy, not the model's tensors
    assert _equal(local, _file_local(shop.state_dir / PREVIOUS_FILE))


def test_resume_rules_hold_for_a_cached_model(shops, reads):
    shop = shops[0]
    for r in (1, 2, 3):
        _round(shop, r)
    # The coordinator resumes from round 2's checkpoint: round 3 is redone from round 2's part (rolled back),
    # even though the cached model holds the current (round 3) file.
    source, (local, _) = _round(shop, 3, training=False)
    assert source == "disk" and reads[0] == 0  # evaluating round 3 uses round 3's part
    source, (local, own) = _round(shop, 3)
    assert source == "disk-previous" and reads[0] >= 1
    kept_prev = torch.load(shop.state_dir / PREVIOUS_FILE, weights_only=True)
    assert kept_prev["round"] == 2 and _equal(local, kept_prev["local"]) and _equal(own, kept_prev["own_encoder"])
    with pytest.raises(local_state.LocalPartMismatch):  # round 2 redone: round 1's part is gone
        _round(shop, 2)
    # A part that started fresh in the redone round starts fresh again: the cached (trained) part is reset.
    fresh_shop = shops[1]
    _round(fresh_shop, 2)
    source, (local, own) = _round(fresh_shop, 2, training=False)
    assert source == "disk"
    source, (local, own) = _round(fresh_shop, 2)
    assert source == "fresh" and own is None
    assert _equal(local, fresh_shop.model().local_state())


def test_a_fresh_start_resets_a_used_cached_local_part(shops):
    shop = shops[0]
    _round(shop, 1)
    _round(shop, 2)
    shutil.rmtree(shop.state_dir)  # the operator deleted the shop's state
    source, (local, own) = _round(shop, 3)
    assert source == "fresh" and own is None
    assert _equal(local, shop.model().local_state())


def test_checkout_gives_a_fresh_builds_rng_state_and_flags(shops):
    shop = shops[0]
    model = shop.round_model()
    after_build = torch.get_rng_state()
    torch.rand(100)  # a message draws from the global RNG (dropout)
    model.eval()
    model.encoder.fields.sparse = True
    next(model.parameters()).requires_grad_(False)
    assert shop.round_model() is model
    assert torch.equal(torch.get_rng_state(), after_build)
    assert model.training and not model.encoder.fields.sparse and all(p.requires_grad for p in model.parameters())


def test_the_cache_evicts_the_least_recently_used_model_by_count_and_by_bytes(shops, monkeypatch):
    monkeypatch.setenv(model_cache.COUNT_ENV, "2")
    first = shops[0].round_model()
    shops[1].round_model()
    assert shops[0].round_model() is first  # used last now
    shops[2].round_model()  # evicts shops[1], the least recently used
    assert model_cache.stats()["models"] == 2
    assert shops[0].round_model() is first
    assert not model_cache.is_cached(shops[1].model())
    one = model_cache.stats()["bytes"] / 2
    monkeypatch.setenv(model_cache.COUNT_ENV, "0")
    monkeypatch.setenv(model_cache.BUDGET_ENV, str(1.5 * one / 2**20))  # room for one model
    shops[1].round_model()
    assert model_cache.stats()["models"] == 1
    assert shops[0].round_model() is not first  # evicted: built again


def test_the_cache_can_be_turned_off(shops, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, "0")
    assert shops[0].round_model() is not shops[0].round_model()
    assert model_cache.stats()["models"] == 0


def test_best_val_is_written_only_when_its_text_changes(tmp_path, monkeypatch):
    writes = []
    real = best_val.atomic_write_text
    monkeypatch.setattr(best_val, "atomic_write_text", lambda *a, **k: (writes.append(k), real(*a, **k))[1])
    context = _context()
    best_val.save_record(context, tmp_path, "run", {1: {"ctr": 0.7}})
    best_val.save_record(context, tmp_path, "run", {1: {"ctr": 0.7}})
    assert len(writes) == 1 and writes[0]["fsync"] is False
    (tmp_path / best_val.BEST_VAL_FILE).write_text("{}")  # changed behind its back: written again
    best_val.save_record(context, tmp_path, "run", {1: {"ctr": 0.7}})
    best_val.save_record(context, tmp_path, "run", {1: {"ctr": 0.7}, 2: {"ctr": 0.8}})
    assert len(writes) == 3
    assert best_val.load_record(_context(), tmp_path, "run") == {1: {"ctr": 0.7}, 2: {"ctr": 0.8}}


def _crash_once_after_saving(monkeypatch, flag, shop_name: str, at_round: int) -> None:
    """Shop ``shop_name``'s worker dies (kill -9 style) right after saving its round-``at_round`` local part."""
    import client.shop_round

    real = client.shop_round.save_local_part

    def save_then_die(model, context, state_dir, *, shop, server_round, **kwargs):
        real(model, context, state_dir, shop=shop, server_round=server_round, **kwargs)
        if shop == shop_name and server_round == at_round and not flag.exists():
            flag.touch()
            os._exit(9)

    monkeypatch.setattr(client.shop_round, "save_local_part", save_then_die)  # forked workers inherit it


@pytest.mark.slow
def test_cached_and_uncached_runs_are_identical_through_a_resume_and_a_worker_restart(tmp_path, monkeypatch):
    """The tiny federation on the pool (personal mix on): rounds 1-2, resumed to 5 with a worker dying after a
    save in round 3; cache on vs off give the same metrics.csv, checkpoints and local-part files, bit for bit."""
    scenario = tiny_scenario(**{"federation.personal_mix": 2000.0})
    runs = {}
    real_read = local_state._read_payload
    for mode in ("1", "0"):
        monkeypatch.setenv(model_cache.CACHE_ENV, mode)
        _crash_once_after_saving(monkeypatch, tmp_path / f"crashed-{mode}", "shop_01", 3)
        log = tmp_path / f"reads-{mode}.txt"

        def logged_read(path, *args, log=log, **kwargs):  # forked workers append a line per state-file read
            if path.exists():
                with open(log, "a") as fh:
                    fh.write(f"{path}\n")
            return real_read(path, *args, **kwargs)

        monkeypatch.setattr(local_state, "_read_payload", logged_read)
        run = run_federated(scenario, tmp_path / f"cache-{mode}", rounds=2, engine="pool", workers=2)
        reports = []
        run_federated(scenario, run, rounds=5, resume=True, engine="pool", workers=2,
                      progress=lambda report, total, reports=reports: reports.append(report))
        assert (tmp_path / f"crashed-{mode}").exists()
        assert "shop_01" in reports[0].left_out  # round 3: its worker died after its save
        runs[mode] = run
    on, off = runs["1"], runs["0"]
    reads = {mode: len((tmp_path / f"reads-{mode}.txt").read_text().splitlines()) for mode in runs}
    # Uncached: every message after a shop's first reads its file (one fused train+evaluate message per shop and
    # round since fused evaluation; 13 reads measured, 27 with two messages a round).
    # Cached: the first message of each worker process (2 runs, 1 restart) per shop, and the round-3 rollback.
    assert reads["0"] >= 12 and reads["1"] <= 8 and reads["0"] >= 2 * reads["1"], reads
    cols = ["method", "round", "shop", "task", "split", "metric"]  # rows arrive in reply order
    metrics = [pd.read_csv(run / "metrics.csv").set_index(cols)["value"].sort_index() for run in (on, off)]
    assert len(metrics[0]) > 100
    pd.testing.assert_series_equal(*metrics, check_exact=True)
    ckpt_on, ckpt_off = latest_checkpoint(on), latest_checkpoint(off)
    assert ckpt_on.server_round == ckpt_off.server_round == 5
    for key, value in ckpt_off.arrays.items():
        np.testing.assert_array_equal(ckpt_on.arrays[key], value, err_msg=key)
    for shop in ("shop_00", "shop_01", "shop_02"):
        for name in (STATE_FILE, PREVIOUS_FILE):
            a = torch.load(on / "shop-state" / shop / name, weights_only=True)
            b = torch.load(off / "shop-state" / shop / name, weights_only=True)
            assert {k: a[k] for k in ("round", "rounds_trained", "parent")} == {k: b[k] for k in
                                                                                ("round", "rounds_trained", "parent")}
            assert _equal(a["local"], b["local"]) and _equal(a["own_encoder"], b["own_encoder"]), (shop, name)


@pytest.mark.parametrize("extra", [{}, {"proximal-mu": 50.0}, {"objective": "meta", "meta-inner-steps": 4},
                                   {"dpsgd-noise-multiplier": 1.0, "dpsgd-steps": 2, "dpsgd-sample-rate": 0.1}],
                         ids=["plain", "fedprox", "meta", "dpsgd"])
def test_a_reused_model_trains_bit_identically_to_a_fresh_one(tmp_path, monkeypatch, extra):
    """A node without state (fresh context, no state dir) trained three times: fresh model, cached, cached again."""
    from flower_harness import LocalGrid, write_scenario
    from flwr.app import ConfigRecord, Message, MessageType

    from client import client_app
    from server.server_app import initial_encoder

    scenario = tiny_scenario()
    path = write_scenario(scenario, tmp_path / "scenario.toml")
    LocalGrid(1, client_app.app)  # the sender identity messages take
    config = {"scenario": str(path), "seed": scenario.seed, "server-round": 1, "share": "encoder", "max-steps": 4,
              "eval-split": "val", **extra}

    def train() -> dict:
        msg = Message(RecordDict({"arrays": initial_encoder(scenario), "config": ConfigRecord(config)}), 1,
                      MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = client_app.train(msg, context)
        return {**reply.content["arrays"].to_torch_state_dict(), **local_state_of(context)}

    def local_state_of(context: Context) -> dict:
        return {"local." + k: v for k, v in context.state.array_records[local_state.LOCAL_RECORD]
                .to_torch_state_dict().items()}

    model_cache.clear()
    monkeypatch.setenv(model_cache.CACHE_ENV, "0")
    fresh = train()
    monkeypatch.setenv(model_cache.CACHE_ENV, "1")
    first, second, third = train(), train(), train()
    assert model_cache.stats()["models"] == 1
    for got in (first, second, third):
        assert _equal(got, fresh)
    model_cache.clear()


@pytest.mark.parametrize("name, value", [("FEDSHOP_MODEL_CACHE_MB", "abc"), ("FEDSHOP_MODEL_CACHE_MB", "-5"),
                                         ("FEDSHOP_MODEL_CACHE_MODELS", "many")])
def test_a_bad_cache_limit_names_the_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch, name: str,
                                                          value: str) -> None:
    """A cache limit that is no number, or negative, is refused naming the variable and how to fix it."""
    from client import model_cache

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}.*Fix: unset it"):
        model_cache._limits()
