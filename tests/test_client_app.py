"""The shop's ClientApp: local part kept in context.state and on disk, corrupt state never fatal."""

from __future__ import annotations

import logging

import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.local_state import (
    OWN_ENCODER_RECORD,
    STATE_FILE,
    restore_local_part,
    restore_own_encoder,
    save_local_part,
)
from client.shop_round import mixed_start, personal_mix, round_seed, update_reply
from server.server_app import initial_encoder
from shared.features import build_shop_tensors
from shared.model import build_model
from shared.settings import ShopRoundSettings
from shared.train import evaluate_shop


@pytest.fixture(scope="module")
def shop():
    scenario = tiny_scenario()
    return scenario, build_shop_tensors(scenario.training_shops()[0], scenario.features)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _model(shop, seed: int):
    scenario, tensors = shop
    return build_model(tensors, scenario.model, scenario.features, seed=seed)


def test_local_part_survives_in_context_and_on_disk(shop, tmp_path):
    trained, ctx = _model(shop, seed=1), _context()
    save_local_part(trained, ctx, tmp_path, shop="s", server_round=3)
    for context in (ctx, _context()):  # the second has an empty state: the disk copy is used
        fresh = _model(shop, seed=2)
        source = restore_local_part(fresh, context, tmp_path)
        assert source == ("context" if context is ctx else "disk")
        for key, value in trained.local_state().items():
            assert torch.equal(fresh.local_state()[key], value)


def test_a_corrupt_state_file_warns_and_starts_fresh(shop, tmp_path, caplog):
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    model = _model(shop, seed=2)
    before = model.local_state()
    with caplog.at_level(logging.WARNING):
        assert restore_local_part(model, _context(), tmp_path) == "fresh"
    assert "unreadable" in caplog.text and STATE_FILE in caplog.text
    assert all(torch.equal(model.local_state()[k], v) for k, v in before.items())


def test_an_incompatible_state_file_warns_and_starts_fresh(shop, tmp_path, caplog):
    scenario, _ = shop
    other = build_shop_tensors(scenario.training_shops()[2], scenario.features)  # other vocabulary sizes
    save_local_part(build_model(other, scenario.model, scenario.features), _context(), tmp_path, shop="o",
                    server_round=1)
    with caplog.at_level(logging.WARNING):
        assert restore_local_part(_model(shop, seed=2), _context(), tmp_path) == "fresh"
    assert "does not fit" in caplog.text


def test_round_seeds_differ_by_round_and_shop_and_repeat():
    seeds = {round_seed(0, r, s) for r in range(1, 4) for s in range(3)}
    assert len(seeds) == 9
    assert round_seed(0, 2, 1) == round_seed(0, 2, 1)


def test_personal_mix_weights_own_encoder_by_shop_size_and_only_for_fedshop():
    received, own = {"w": torch.zeros(2), "steps": torch.tensor([3])}, {"w": torch.ones(2), "steps": torch.tensor([9])}
    mixed = mixed_start(received, own, n_rows=300, n0=100.0)
    assert torch.allclose(mixed["w"], torch.full((2,), 0.75)) and mixed["steps"].item() == 3  # b = 300 / 400
    def mix(**sent) -> float:
        return personal_mix(ShopRoundSettings.from_message({}, {k.replace("_", "-"): v for k, v in sent.items()}))

    assert mix(personal_mix=20000) == 20000
    assert mix(personal_mix=20000, share="all-shareable") == 0  # FedAvg-all baseline
    assert mix(personal_mix=20000, objective="meta") == 0
    assert mix() == 0


def test_own_encoder_is_kept_in_context_and_on_disk(shop, tmp_path):
    trained = _model(shop, seed=1)
    ctx = _context()
    assert restore_own_encoder(trained, ctx) is None  # nothing saved yet
    save_local_part(trained, ctx, tmp_path, shop="s", server_round=1, keep_own_encoder=True)
    for context in (ctx, _context()):  # the second has an empty state: the disk copy is used
        fresh = _model(shop, seed=2)
        restore_local_part(fresh, context, tmp_path)  # one read of the state file brings both
        own = restore_own_encoder(fresh, context)
        assert own is not None and all(torch.equal(own[k], v) for k, v in trained.encoder_state().items())


def test_train_and_evaluate_use_the_own_encoder_when_the_personal_mix_is_on(shop, tmp_path):
    scenario, tensors = shop
    path = write_scenario(scenario, tmp_path / "scenario.toml")

    def message(kind: str, server_round: int, arrays: ArrayRecord, mix: float) -> Message:
        config = ConfigRecord({"scenario": str(path), "seed": scenario.seed, "server-round": server_round,
                               "share": "encoder", "eval-split": "val", "personal-mix": mix})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), 1, kind)
        msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}"
        return msg

    LocalGrid(1, client_app.app)  # sets the sender identity messages take, as in a ServerApp process
    ctx = _context()
    first = client_app.train(message(MessageType.TRAIN, 1, initial_encoder(scenario), 1000.0), ctx)
    sent = dict(first.content["arrays"].to_torch_state_dict())
    kept = dict(ctx.state.array_records[OWN_ENCODER_RECORD].to_torch_state_dict())
    assert all(torch.equal(kept[k], v) for k, v in sent.items())  # the shop keeps what it trained
    # Evaluation serves the own encoder, whatever global encoder arrives.
    other = initial_encoder(scenario)  # the untrained global stands in for an aggregate
    metrics = client_app.evaluate(message(MessageType.EVALUATE, 1, other, 1000.0), ctx).content["metrics"]
    served = _model(shop, seed=0)
    served.load_encoder_state(kept)
    restore_local_part(served, ctx, None)
    assert metrics["ctr.auc"] == pytest.approx(evaluate_shop(served, tensors, "val")["ctr"]["auc"])
    plain = client_app.evaluate(message(MessageType.EVALUATE, 1, other, 0.0), ctx).content["metrics"]
    assert plain["ctr.auc"] != metrics["ctr.auc"]


def test_update_reply_is_the_global_plus_the_training_update():
    received, start = {"w": torch.zeros(3), "steps": torch.tensor([3])}, {"w": torch.tensor([0.5, 0.5, 0.0]),
                                                                          "steps": torch.tensor([3])}
    trained = {"w": torch.tensor([0.75, 0.5, 0.25]), "steps": torch.tensor([4])}
    out = update_reply(trained, received, start)
    assert torch.equal(out["w"], torch.tensor([0.25, 0.0, 0.25])) and out["steps"].item() == 4
    assert out["w"][1].item() == 0.0 and not torch.signbit(out["w"][1])  # untouched row: the global's, bit for bit


def test_mix_reply_update_sends_the_training_update_and_keeps_the_own_encoder(shop, tmp_path):
    scenario, tensors = shop
    path = write_scenario(scenario, tmp_path / "scenario.toml")

    def message(server_round: int, arrays: ArrayRecord) -> Message:
        config = ConfigRecord({"scenario": str(path), "seed": scenario.seed, "server-round": server_round,
                               "share": "encoder", "eval-split": "val", "personal-mix": 1000.0,
                               "mix-reply": "update"})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), 1, MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = f"train-{server_round}"
        return msg

    LocalGrid(1, client_app.app)
    ctx = _context()
    client_app.train(message(1, initial_encoder(scenario)), ctx)  # round 1: no own encoder yet, a plain reply
    own = dict(ctx.state.array_records[OWN_ENCODER_RECORD].to_torch_state_dict())
    glob = initial_encoder(scenario)
    received = dict(glob.to_torch_state_dict())
    reply = dict(client_app.train(message(2, glob), ctx).content["arrays"].to_torch_state_dict())
    trained = dict(ctx.state.array_records[OWN_ENCODER_RECORD].to_torch_state_dict())
    start = mixed_start(received, own, int(tensors.rows["train"]["user"].shape[0]), 1000.0)
    expected = update_reply(trained, received, start)
    assert all(torch.equal(reply[k], v) for k, v in expected.items())
    assert any(not torch.equal(reply[k], trained[k]) for k in trained)  # the shop still keeps what it trained
