"""Coordinator state that replies could grow without bound: per-node tables of nodes that left (rotating node
IDs), metric tables of any size, the identity grid's drop list. Each stays bounded, and honest runs are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from flower_harness import LocalGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.node_identity import MAX_DROPPED, IdentityCheckedGrid
from server.robust import RobustSettings
from server.strategies import MAX_METRIC_NAME, MAX_REPLY_METRICS, ShopStrategy, not_scalar_metrics
from server.wire import Wire
from shared.compression import encode_delta
from shared.protocol import NUM_EXAMPLES, SHOP_INDEX

SHAPES = {"emb": (30, 4), "dense.weight": (3, 5)}
GLOBAL = {k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _strategy(mode: str = "sparse-fp16") -> ShopStrategy:
    return ShopStrategy(FedAvg(min_train_nodes=2, min_available_nodes=2), min_shops=2,
                        shop_name=lambda i: f"shop_{i}", robust=RobustSettings(), wire=Wire(mode))


def _round(strategy: ShopStrategy, rnd: int, nodes: list[int], index: dict[int, int] | None = None,
           extra: dict[str, float] | None = None) -> dict[str, str]:
    """One train round on ``nodes`` (online = these): each replies an honest update, naming ``index[node]`` as its
    shop-index if given (else no shop-index). Returns the round's left-out shops."""
    grid = LocalGrid(len(nodes), None)
    grid.node_ids = list(nodes)
    sent = list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(),
                                         grid))
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        msg.metadata.__dict__["_message_id"] = f"train-{rnd}-{node}"
        trained = {k: v + 0.01 * (1 + node % 7) for k, v in GLOBAL.items()}
        arrays = trained if strategy.wire.mode == "none" else encode_delta(trained, dict(GLOBAL))
        metrics = {NUM_EXAMPLES: 100.0 + node % 5, **(extra or {})}
        if index is not None:
            metrics[SHOP_INDEX] = index[node]
        replies.append(Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                           "metrics": MetricRecord(metrics)}), reply_to=msg))
    strategy.aggregate_train(rnd, replies)
    assert strategy._report is not None
    return strategy._report.left_out


def test_rotating_anonymous_node_ids_do_not_grow_the_coordinators_tables():
    strategy = _strategy()
    for rnd in range(1, 31):  # 5 fresh node IDs every round (enough for leave-one-out), none naming its shop
        _round(strategy, rnd, [10 * rnd + i for i in range(5)])
        assert len(strategy.first_claims) == len(strategy.loo_history) == 5  # before the fix: 5 x rnd
        assert len(strategy.wire._held) == 5 and len(strategy.wire._versions) <= 2
    assert set(strategy.first_claims) == {f"node-{300 + i}" for i in range(5)}  # this round's nodes only


def test_named_shops_keep_their_state_while_offline_and_anonymous_nodes_while_online():
    strategy = _strategy()
    _round(strategy, 1, [1, 2, 3, 4, 5], index={n: n - 1 for n in range(1, 6)})
    _round(strategy, 2, [1, 2, 3, 4, 6, 7])  # shop_4's node offline; two anonymous nodes
    _round(strategy, 3, [1, 2, 3, 4, 6])  # node 7 left
    assert set(strategy.first_claims) == {"shop_0", "shop_1", "shop_2", "shop_3", "shop_4", "node-6"}
    assert len(strategy.loo_history["shop_0"]) == 3 and len(strategy.loo_history["node-6"]) == 2
    assert len(strategy.loo_history["shop_4"]) == 1
    assert set(strategy.wire._held) == {1, 2, 3, 4, 6}


def test_the_wire_forgets_what_offline_nodes_hold():
    wire = Wire("sparse-fp16")
    wire._held = {1: "a", 2: "b", 3: "b"}
    wire._versions = {"a": {}, "b": {}, "c": {}}
    wire._no_initial = {2, 9}
    wire.forget_offline({1, 2})
    assert wire._held == {1: "a", 2: "b"} and set(wire._versions) == {"a", "b"} and wire._no_initial == {2}
    wire.forget_offline({1})
    assert set(wire._versions) == {"a"}


@pytest.mark.parametrize("extra, why", [
    ({f"loss-t{i}": 0.5 for i in range(MAX_REPLY_METRICS)}, f"more than {MAX_REPLY_METRICS}"),
    ({"loss-" + "x" * MAX_METRIC_NAME: 0.5}, f"longer than {MAX_METRIC_NAME} characters"),
])
def test_a_reply_with_too_many_or_too_long_metrics_is_left_out(extra, why):
    strategy = _strategy("none")
    left_out = _round(strategy, 1, [1, 2, 3], index={1: 0, 2: 1, 3: 2},
                      extra=extra)
    assert all(why in reason for reason in left_out.values()) and len(left_out) == 3
    assert strategy._report is not None and not strategy._report.train
    assert "x" * 50 not in " ".join(left_out.values())  # the reason does not echo the long name


def test_an_honest_size_metric_table_is_reported():
    metrics = {f"test/ctr.m{i}": 0.5 for i in range(MAX_REPLY_METRICS - 2)} | {SHOP_INDEX: 0, NUM_EXAMPLES: 1.0}
    assert not_scalar_metrics(metrics) == ""
    assert "more than" in not_scalar_metrics({**metrics, "x.y": 1.0})


def test_the_identity_grid_remembers_only_the_newest_drops():
    class Replies(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            reply = Message(RecordDict({"m": MetricRecord({SHOP_INDEX: 2})}), dst_node_id=0,
                            message_type=MessageType.TRAIN)
            reply.metadata.__dict__["_src_node_id"] = 7  # node 7, registered as shop-index 0, claims 2
            return [reply]

    inner = Replies(1, None)
    grid = IdentityCheckedGrid(inner, {7: 0})
    for _ in range(MAX_DROPPED + 5):
        assert list(grid.send_and_receive([])) == []
    assert len(grid.dropped) == MAX_DROPPED and grid.dropped[-1] == (7, 0, 2)
