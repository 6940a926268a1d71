"""The leak guard sends only a reply it rebuilt: the encoder, the shop's vocabulary of scalars, nothing else.

Threat: a malicious or buggy handler inside the shop's ClientApp tries to get private data (a user ID,
rows) to the coordinator through any part of a reply other than the encoder values. Every smuggling
route below must end as the one generic error reply; an honest reply of every task set must pass
unchanged in value.
"""

from __future__ import annotations

import copy
import logging
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app import Context as FlowerContext
from hypothesis import given, settings
from hypothesis import strategies as st

from client import client_app
from client.leak_guard import leak_guard
from server.server_app import initial_encoder
from shared.privacy.audit import (
    CANONICAL_NAN,
    MAX_METRICS,
    LeakBlocked,
    MetricVocabulary,
    clean_metrics,
)
from shared.protocol import BLOCKED_TEXT, ERROR_CODE_BLOCKED, FAILED_TEXT
from shared.schema import TASKS

# Four shops whose data supports the four task sets the synthetic world makes (task dropout of CTR/sales).
MIXED = {"data.synthetic.n_shops": 4, "data.synthetic.task_dropout": 0.5, "seed": 6}
SECRETS = ("4711", "user", "u-", "towers", "ids", "loss", "auc", "metrics", "arrays")


@dataclass
class World:
    scenario: object
    path: object
    grid: LocalGrid
    task_sets: list[tuple[str, ...]]
    honest: dict = field(default_factory=dict)

    def context(self, node: int) -> FlowerContext:
        return self.grid.contexts[self.grid.node_ids[node]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    scenario = tiny_scenario(**MIXED)
    path = write_scenario(scenario, tmp_path_factory.mktemp("leak") / "scenario.toml")
    task_sets = [tuple(s.available_tasks()) for s in scenario.federation_shops()]
    assert len(set(task_sets)) == 4, f"the world should cover every task set, got {task_sets}"
    return World(scenario, path, LocalGrid(len(task_sets), client_app.app), task_sets)


def _request(world: World, node: int = 0, kind: str = MessageType.TRAIN, share: str = "encoder",
             split: str = "val") -> Message:
    config = ConfigRecord({"scenario": str(world.path), "seed": world.scenario.seed, "server-round": 1,
                           "share": share, "eval-split": split})
    msg = Message(RecordDict({"arrays": initial_encoder(world.scenario), "config": config}),
                  world.grid.node_ids[node], kind, group_id="1")
    msg.metadata.__dict__["_message_id"] = f"m-{node}-{kind}-{share}-{split}"
    return msg


def _honest(world: World, node: int = 0, kind: str = MessageType.TRAIN, share: str = "encoder",
            split: str = "val") -> Message:
    """The real handler's reply (no guard), computed once per request kind."""
    key = (node, kind, share, split)
    if key not in world.honest:
        handler = client_app.train if kind == MessageType.TRAIN else client_app.evaluate
        world.honest[key] = handler(_request(world, node, kind, share, split), world.context(node))
    return world.honest[key]


def _guard(world: World, mutate, node: int = 0, kind: str = MessageType.TRAIN, share: str = "encoder",
           split: str = "val") -> tuple[Message, Message]:
    """(request, what the guard sends) for a handler that returns the honest reply tampered by ``mutate``."""
    honest = _honest(world, node, kind, share, split)
    msg = _request(world, node, kind, share, split)

    def handler(request: Message, context: FlowerContext) -> Message:
        reply = Message(copy.deepcopy(honest.content), reply_to=request)
        return mutate(reply, context) or reply

    REFUSALS.lines.clear()
    return msg, leak_guard(msg, world.context(node), handler)


class _Refusals(logging.Handler):
    """The leak guard's log lines, to tell a deliberate refusal from a check that crashed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


REFUSALS = _Refusals()
logging.getLogger("client.leak_guard").addHandler(REFUSALS)


def _assert_blocked(msg: Message, reply: Message, text: str = BLOCKED_TEXT) -> None:
    """The generic error reply, and (for a refusal) the shop's log says which check refused it."""
    if text == BLOCKED_TEXT:  # a deliberate refusal, not a check that crashed on the tampered reply
        assert any(line.startswith("leak guard blocked") for line in REFUSALS.lines), REFUSALS.lines
        REFUSALS.lines.clear()
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == text and reply.error.code == ERROR_CODE_BLOCKED
    assert not any(s in reply.error.reason for s in SECRETS)
    assert reply.metadata.group_id == msg.metadata.group_id and reply.metadata.reply_to_message_id == \
        msg.metadata.message_id


# ---- the smuggling routes -------------------------------------------------------------------------

def _rename(old: str, new: str):
    def mutate(reply, _):
        reply.content[new] = reply.content[old]
        del reply.content[old]
    return mutate


def _extra_record(name, record):
    def mutate(reply, _):
        reply.content[name] = record
    return mutate


def _set_metadata(field_name, value):
    def mutate(reply, _):
        reply.metadata.__dict__[field_name] = value
    return mutate


def _set_metric(key, value):
    def mutate(reply, _):
        reply.content["metrics"][key] = value
    return mutate


def _made_up_keys(keys):
    def mutate(reply, _):
        for i, key in enumerate(keys):
            reply.content["metrics"][key] = float(i)
    return mutate


def _set_array(key, value):
    def mutate(reply, _):
        reply.content["arrays"][key] = value
    return mutate


def _first_key(world) -> str:
    return next(iter(initial_encoder(world.scenario)))


def _retype_first(world, **changes):
    key = _first_key(world)

    def mutate(reply, _):
        a = reply.content["arrays"][key]
        fields = {"dtype": a.dtype, "shape": a.shape, "stype": a.stype, "data": a.data, **changes}
        reply.content["arrays"][key] = Array(**fields)
    return mutate


def _drop_first(world):
    key = _first_key(world)

    def mutate(reply, _):
        del reply.content["arrays"][key]
    return mutate


def _local_head(reply, context):
    reply.content["arrays"]["towers.ctr.0.weight"] = \
        context.state.array_records["fedshop.local-part"]["towers.ctr.0.weight"]


def _user_embedding(reply, context):
    reply.content["arrays"]["local.user_ids.weight"] = \
        context.state.array_records["fedshop.local-part"]["user_ids.weight"]


TRAIN_ROUTES = {
    # record names
    "arrays record named after a user": _rename("arrays", "u-4711"),
    "metrics record named after a user": _rename("metrics", "user-4711"),
    "extra empty record with a user's name": _extra_record("user-4711", MetricRecord()),
    "extra array record": _extra_record("heads", ArrayRecord({"gates.ctr.weight": torch.ones(2, 2)})),
    # metadata
    "group_id": _set_metadata("_group_id", "user-4711"),
    "ttl": _set_metadata("_ttl", 4711.0),
    "created_at": _set_metadata("_created_at", 4711.0),
    "dst_node_id": _set_metadata("_dst_node_id", 4711),
    "src_node_id": _set_metadata("_src_node_id", 4711),
    "src_task_id": _set_metadata("_src_task_id", 4711),
    "dst_task_id": _set_metadata("_dst_task_id", 4711),
    "delivered_at": _set_metadata("_delivered_at", "u-4711"),
    "message_type": _set_metadata("_message_type", MessageType.EVALUATE),
    "message_id": _set_metadata("_message_id", "u-4711"),
    "reply_to_message_id": _set_metadata("_reply_to_message_id", "u-4711"),
    "run_id": _set_metadata("_run_id", 4711),
    "an extra metadata field": _set_metadata("_user", "u-4711"),
    # ConfigRecords
    "config record with bytes": _extra_record("config", ConfigRecord({"blob": b"u-4711,u-4712"})),
    "config record with a long list of strings": _extra_record("config", ConfigRecord({"ids": ["u-4711"] * 500})),
    "config record with a private string": _extra_record("extra", ConfigRecord({"user_id": "u-4711"})),
    # metric values
    "list of floats under loss": _set_metric("loss", [0.1, 4711.0, 4712.0]),
    "list of ints under num-examples": _set_metric("num-examples", [4711, 4712]),
    "infinite loss": _set_metric("loss", math.inf),
    "shop-index carrying a user id": _set_metric("shop-index", 4711),
    "fractional shop-index": _set_metric("shop-index", 0.4711),
    # metric keys
    "user id as a metric key": _set_metric("user-4711", 1.0),
    "per-task loss of an unknown task": _made_up_keys(["loss-user4711"]),
    "many made-up per-task losses": _made_up_keys([f"loss-u{i}" for i in range(200)]),
    "made-up task metric names": _made_up_keys([f"ctr.auc_{i}" for i in range(50)]),
    "a ranking cut-off made up on the fly": _made_up_keys(["ranking.hr@4711_s99"]),
    "a sampled-negatives suffix made up on the fly": _made_up_keys(["ranking.hr@10_s4711"]),
    "task metrics in a train reply": _made_up_keys(["ctr.auc"]),
    # arrays
    "a local head": _local_head,
    "a user embedding": _user_embedding,
}


@pytest.mark.parametrize("route", list(TRAIN_ROUTES))
def test_each_smuggling_route_in_a_train_reply_is_refused(world, route):
    msg, reply = _guard(world, TRAIN_ROUTES[route])
    _assert_blocked(msg, reply)


@pytest.mark.parametrize("route", ["dtype", "shape", "stype", "bytes", "missing"])
def test_encoder_arrays_must_match_the_request_exactly(world, route):
    mutate = {"dtype": lambda w: _retype_first(w, dtype="float64"),
              "shape": lambda w: _retype_first(w, shape=(4711,)),
              "stype": lambda w: _retype_first(w, stype="u-4711"),
              "bytes": lambda w: _retype_first(w, data=b"u-4711"),
              "missing": _drop_first}[route](world)
    msg, reply = _guard(world, mutate)
    _assert_blocked(msg, reply)


EVAL_ROUTES = {
    "arrays in an evaluate reply": _extra_record("arrays", ArrayRecord({"x": torch.zeros(1)})),
    "metrics record renamed": _rename("metrics", "u-4711"),
    "group_id": _set_metadata("_group_id", "user-4711"),
    "config record": _extra_record("config", ConfigRecord({"ids": ["u-4711"] * 50})),
    "list of floats under a task metric": _set_metric("ctr.auc", [0.5, 4711.0]),
    "a split the request did not ask for": _made_up_keys(["test/ctr.auc"]),
    "a metric of a task the shop lacks": _made_up_keys(["nosuchtask.auc"]),
    "train losses in an evaluate reply": _made_up_keys(["loss"]),
}


@pytest.mark.parametrize("route", list(EVAL_ROUTES))
def test_each_smuggling_route_in_an_evaluate_reply_is_refused(world, route):
    msg, reply = _guard(world, EVAL_ROUTES[route], kind=MessageType.EVALUATE)
    _assert_blocked(msg, reply)


def test_a_metric_of_a_task_outside_the_shops_task_set_is_refused(world):
    node = next(i for i, t in enumerate(world.task_sets) if "sales" not in t)
    msg, reply = _guard(world, _made_up_keys(["sales.rmse"]), node=node, kind=MessageType.EVALUATE)
    _assert_blocked(msg, reply)
    msg, reply = _guard(world, _made_up_keys(["loss-sales"]), node=node)
    _assert_blocked(msg, reply)


def test_error_replies_and_exceptions_leave_only_the_generic_text(world):
    msg = _request(world)

    def erroring(request, context):
        return Message(Error(code=4711, reason="user u-4711 has no history; loss=0.4711"), reply_to=request)

    def crashing(request, context):
        raise RuntimeError("user u-4711 has no history")

    for handler in (erroring, crashing):
        reply = leak_guard(msg, world.context(0), handler)
        _assert_blocked(msg, reply, FAILED_TEXT)


def test_a_reply_of_another_message_type_is_refused(world):
    msg = _request(world, kind="query")
    reply = leak_guard(msg, world.context(0), lambda m, c: Message(RecordDict(), reply_to=m))
    _assert_blocked(msg, reply)


# ---- what the guard rebuilds instead of refusing ----------------------------------------------------

def test_the_guard_sends_a_rebuilt_copy_of_an_honest_reply(world):
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        honest = _honest(world, kind=kind)
        msg, reply = _guard(world, lambda r, c: None, kind=kind)
        assert not reply.has_error()
        assert reply is not honest and reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert list(reply.content.metric_records) == ["metrics"] and not reply.content.config_records
        got, want = dict(reply.content["metrics"]), dict(honest.content["metrics"])
        assert set(got) == set(want)
        assert all(got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in want)
        if kind == MessageType.TRAIN:
            assert list(reply.content["arrays"]) == list(initial_encoder(world.scenario))
            for k, a in honest.content["arrays"].items():
                np.testing.assert_array_equal(reply.content["arrays"][k].numpy(), a.numpy())


def test_bytes_the_checks_do_not_read_never_leave(world):
    """Trailing bytes after an array, a NaN payload, key order and int/float types are all rebuilt."""
    key = _first_key(world)
    nan_with_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000004711))[0]

    def tamper(reply, _):
        arrays = reply.content["arrays"]
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data + b"u-4711")
        reply.content["arrays"] = ArrayRecord({k: arrays[k] for k in reversed(list(arrays))})
        reply.content["metrics"]["loss"] = nan_with_payload
        reply.content["metrics"]["shop-index"] = float(reply.content["metrics"]["shop-index"])

    msg, reply = _guard(world, tamper)
    assert not reply.has_error()
    sent = reply.content["arrays"]
    assert list(sent) == list(initial_encoder(world.scenario))
    assert b"u-4711" not in sent[key].data and sent[key].data == Array(sent[key].numpy()).data
    loss = reply.content["metrics"]["loss"]
    assert struct.pack("<d", loss) == struct.pack("<d", CANONICAL_NAN)
    assert type(reply.content["metrics"]["shop-index"]) is int


# ---- honest replies of every task set pass through the real app ------------------------------------

def test_every_task_set_trains_and_evaluates_through_the_guard(world):
    for node, tasks in enumerate(world.task_sets):
        vocab = MetricVocabulary(tasks=tasks, sampled_negatives=world.scenario.features.sampled_negatives)
        ctx = world.context(node)
        train = world.grid.app(_request(world, node), ctx)
        assert not train.has_error(), (tasks, train.error.reason if train.has_error() else "")
        assert list(train.content["arrays"]) == list(initial_encoder(world.scenario))
        keys = set(train.content["metrics"])
        assert {"num-examples", "shop-index", "loss"} <= keys <= vocab.train_keys()
        assert {k for k in keys if k.startswith("loss-")} == {f"loss-{t}" for t in tasks}
        assert train.content["metrics"]["shop-index"] == node
        for split in ("val", "val+test"):
            ev = world.grid.app(_request(world, node, MessageType.EVALUATE, split=split), ctx)
            assert not ev.has_error(), (tasks, split)
            keys = set(ev.content["metrics"])
            assert keys <= vocab.eval_keys(tuple(split.split("+")))
            reported = {k.split("/")[-1].split(".")[0] for k in keys if "." in k}
            assert reported and reported <= set(tasks)  # a task without rows in the split reports nothing


def test_all_shareable_lets_heads_out_but_never_id_embeddings(world):
    ctx = world.context(0)
    reply = world.grid.app(_request(world, share="all-shareable"), ctx)
    assert not reply.has_error()
    keys = set(reply.content["arrays"])
    assert any(k.startswith("local.towers.") for k in keys)
    assert not any(k.startswith(("local.user_ids", "local.item_ids", "local.item_bias", "local.ctx_num")) for k in keys)
    msg, leaked = _guard(world, _user_embedding, share="all-shareable")
    _assert_blocked(msg, leaked)


def test_all_shareable_takes_its_list_from_the_model_not_from_the_handlers_state(world):
    """A handler that plants a fake 'local head' in its own state still cannot send it."""

    def plant(reply, context):
        fake = torch.arange(16, dtype=torch.float32).reshape(4, 4)
        context.state.array_records["fedshop.local-part"]["towers.fake.weight"] = Array(fake.numpy())
        reply.content["arrays"]["local.towers.fake.weight"] = Array(fake.numpy())

    msg, reply = _guard(world, plant, share="all-shareable")
    _assert_blocked(msg, reply)
    del world.context(0).state.array_records["fedshop.local-part"]["towers.fake.weight"]


# ---- the vocabulary and its cap --------------------------------------------------------------------

def test_the_vocabulary_is_exact_and_below_the_cap():
    full = MetricVocabulary(tasks=TASKS, sampled_negatives=99)
    assert len(full.eval_keys(("train", "val", "test"))) <= MAX_METRICS
    assert "ranking.hr@10_s99" in full.eval_keys(("val",)) and "ranking.hr@10_s98" not in full.eval_keys(("val",))
    assert "val/ctr.auc" in full.eval_keys(("val", "test")) and "ctr.auc" not in full.eval_keys(("val", "test"))
    assert "ctr.auc" not in MetricVocabulary(tasks=("cvr",)).eval_keys(("val",))
    assert full.train_keys() == {"num-examples", "shop-index", "loss", "dp-epsilon", "loss-ctr", "loss-cvr",
                                 "loss-ranking", "loss-sales"}


def test_the_cap_holds_even_for_allowed_keys():
    allowed = frozenset(f"k{i}" for i in range(2 * MAX_METRICS))
    clean_metrics({f"k{i}": 1.0 for i in range(MAX_METRICS)}, allowed)
    with pytest.raises(LeakBlocked):
        clean_metrics({f"k{i}": 1.0 for i in range(MAX_METRICS + 1)}, allowed)


@pytest.mark.parametrize("value", [True, "0.5", b"\x00", [0.5], np.float64(0.5), None])
def test_only_plain_int_or_float_values_pass(value):
    with pytest.raises(LeakBlocked):
        clean_metrics({"loss": value}, frozenset({"loss"}))


_VOCAB = MetricVocabulary(tasks=TASKS, sampled_negatives=99, shop_index=3)
_ALLOWED = _VOCAB.eval_keys(("val", "test"))
_values = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8),
                    st.binary(max_size=8), st.lists(st.floats(), max_size=3), st.none())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(sorted(_ALLOWED)), st.text(max_size=12).map("u-4711:".__add__)),
                       _values, max_size=80))
def test_whatever_a_handler_reports_only_vocabulary_scalars_come_out(metrics):
    """Property: clean_metrics refuses, or returns at most MAX_METRICS vocabulary keys with plain scalars."""
    try:
        out = clean_metrics(metrics, _ALLOWED, _VOCAB.shop_index)
    except LeakBlocked as exc:
        assert "u-4711" not in str(exc)  # a made-up key may be private: never echoed
        return
    assert set(out) <= _ALLOWED and len(out) <= MAX_METRICS and list(out) == sorted(out)
    for key, value in out.items():
        assert type(value) is (int if key == "shop-index" else float)
        assert not (isinstance(value, float) and math.isinf(value))
        if isinstance(value, float) and math.isnan(value):
            assert struct.pack("<d", value) == struct.pack("<d", CANONICAL_NAN)
    assert out.get("shop-index", 3) == 3
