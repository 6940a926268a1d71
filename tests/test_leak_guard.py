"""The leak guard lets only the encoder and allow-listed scalars out, and hides private text in errors."""

from __future__ import annotations

import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client import client_app
from client.leak_guard import BLOCKED_TEXT, FAILED_TEXT, allowed_metric, leak_guard
from server.server_app import initial_encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    scenario = tiny_scenario()
    path = write_scenario(scenario, tmp_path_factory.mktemp("leak") / "scenario.toml")
    return scenario, path


def _request(scenario, path, kind: str = MessageType.TRAIN, share: str = "encoder") -> tuple[Message, LocalGrid]:
    grid = LocalGrid(1, client_app.app)
    config = ConfigRecord({"scenario": str(path), "seed": scenario.seed, "server-round": 1, "share": share,
                           "eval-split": "val"})
    msg = Message(RecordDict({"arrays": initial_encoder(scenario), "config": config}), grid.node_ids[0], kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg, grid


def _leaky(mutate):
    """A handler that does the real training, then lets ``mutate`` tamper with the reply content."""
    def handler(msg, context):
        reply = client_app.train(msg, context)
        mutate(reply.content, context)
        return reply
    return handler


def _add_head(content, context):
    head = context.state.array_records["fedshop.local-part"]["towers.ctr.0.weight"]
    content["arrays"]["towers.ctr.0.weight"] = head


def _add_user_embedding(content, context):
    user_ids = context.state.array_records["fedshop.local-part"]["user_ids.weight"]
    content["arrays"]["local.user_ids.weight"] = user_ids


def _add_user_id_metric(content, context):
    content["metrics"]["user-4711"] = 4711


def _extra_record(content, context):
    content["heads"] = ArrayRecord({"gates.ctr.weight": torch.ones(2, 2)})


def _private_config(content, context):
    content["extra"] = ConfigRecord({"user_id": "u-4711"})


@pytest.mark.parametrize("mutate", [_add_head, _add_user_embedding, _add_user_id_metric, _extra_record,
                                    _private_config])
def test_a_deliberate_leak_is_blocked_and_the_error_names_nothing_private(setup, mutate):
    scenario, path = setup
    msg, grid = _request(scenario, path)
    reply = leak_guard(msg, grid.contexts[grid.node_ids[0]], _leaky(mutate))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == BLOCKED_TEXT
    for secret in ("towers", "user_ids", "user-4711", "4711", "gates", "u-4711"):
        assert secret not in reply.error.reason


def test_an_honest_reply_passes_with_exactly_the_encoder_keys(setup):
    scenario, path = setup
    msg, grid = _request(scenario, path)
    reply = grid.app(msg, grid.contexts[grid.node_ids[0]])
    assert not reply.has_error()
    assert set(reply.content["arrays"]) == set(initial_encoder(scenario))
    assert set(reply.content["metrics"]) <= {"num-examples", "shop-index", "loss", "loss-ctr", "loss-cvr",
                                             "loss-ranking", "loss-sales"}


def test_all_shareable_lets_heads_out_but_never_id_embeddings(setup):
    scenario, path = setup
    msg, grid = _request(scenario, path, share="all-shareable")
    ctx = grid.contexts[grid.node_ids[0]]
    reply = grid.app(msg, ctx)
    keys = set(reply.content["arrays"])
    assert any(k.startswith("local.towers.") for k in keys)
    assert not any(k.startswith(("local.user_ids", "local.item_ids", "local.item_bias")) for k in keys)
    msg2, _ = _request(scenario, path, share="all-shareable")
    leaked = leak_guard(msg2, ctx, _leaky(_add_user_embedding))
    assert leaked.has_error() and leaked.error.reason == BLOCKED_TEXT


def test_an_exception_text_never_reaches_the_coordinator(setup):
    scenario, path = setup
    msg, grid = _request(scenario, path)

    def crashing(msg, context):
        raise RuntimeError("user u-4711 has no history")

    reply = leak_guard(msg, grid.contexts[grid.node_ids[0]], crashing)
    assert reply.has_error() and reply.error.reason == FAILED_TEXT


def test_metric_allow_list():
    assert allowed_metric("ranking.ndcg@10_s99", MessageType.EVALUATE)
    assert allowed_metric("ctr.auc", MessageType.EVALUATE)
    assert not allowed_metric("ctr.user_4711", MessageType.EVALUATE)
    assert not allowed_metric("ctr.auc", MessageType.TRAIN)
    assert allowed_metric("loss-ctr", MessageType.TRAIN)


def test_evaluate_reply_with_arrays_is_blocked(setup):
    scenario, path = setup
    msg, grid = _request(scenario, path, kind=MessageType.EVALUATE)

    def leaky_eval(msg, context):
        reply = client_app.evaluate(msg, context)
        reply.content["arrays"] = ArrayRecord({"x": torch.zeros(1)})
        return reply

    reply = leak_guard(msg, grid.contexts[grid.node_ids[0]], leaky_eval)
    assert reply.has_error() and reply.error.reason == BLOCKED_TEXT
    honest = grid.app(msg, grid.contexts[grid.node_ids[0]])
    assert not honest.has_error()
    assert any(k.startswith("ctr.") for k in honest.content["metrics"])
