"""The coordinator parses each reply's arrays once per round, and builds each down-patch once per held global."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
from flower_harness import LocalGrid, honest_train_round
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import server.wire
from server.decoded_array import DecodedArray, array_record
from server.robust import RobustSettings
from server.strategies import ShopStrategy
from server.wire import Wire
from shared.protocol import WIRE_PATCH, WIRE_RECORD

N = 6
SHAPES = {"emb": (200, 4), "dense.weight": (3, 5), "dense.bias": (3,)}
RNG = np.random.default_rng(0)
GLOBAL = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _trained(i: int) -> dict[str, np.ndarray]:
    """Shop i's encoder after training: a few embedding rows and every dense value moved."""
    rng = np.random.default_rng(10 + i)
    out = {k: v.copy() for k, v in GLOBAL.items()}
    out["emb"][[i, 50 + i]] += 0.1
    for k in ("dense.weight", "dense.bias"):
        out[k] += 0.01 * rng.normal(size=SHAPES[k]).astype(np.float32)
    return out


def _train_round(strategy: ShopStrategy, mode: str) -> tuple[list[Message], list[Message]]:
    """The train messages the strategy sends to N shops, and each shop's reply (dense or as its wire delta)."""
    return honest_train_round(strategy, GLOBAL, N, _trained, mode)


@pytest.mark.parametrize("mode", ["none", "sparse-fp16"])
def test_each_reply_array_is_decoded_once_per_aggregation(monkeypatch, mode):
    strategy = ShopStrategy(FedAvg(min_train_nodes=N, min_available_nodes=N), min_shops=2,
                            shop_name=lambda i: f"shop_{i}", robust=RobustSettings(), wire=Wire(mode))
    _, replies = _train_round(strategy, mode)
    reply_arrays = [a for msg in replies for a in msg.content["arrays"].values()]
    per_array: Counter[int] = Counter()
    loads = [0]
    real_numpy, real_load = Array.numpy, np.load

    def counting_numpy(self: Array) -> np.ndarray:
        per_array[id(self)] += 1
        return real_numpy(self)

    def counting_load(*args, **kwargs):
        loads[0] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Array, "numpy", counting_numpy)
    monkeypatch.setattr(np, "load", counting_load)
    merged, _ = strategy.aggregate_train(1, replies)
    monkeypatch.undo()

    assert merged is not None and len(strategy._report.train) == N
    assert [per_array[id(a)] for a in reply_arrays] == [1] * len(reply_arrays)
    # Beyond the replies' arrays only per-round work parses anything: the global (screens) and the aggregate.
    assert loads[0] - len(reply_arrays) <= 2 * len(SHAPES)
    weights = [100 + i for i in range(N)]  # the aggregate is still the weighted mean of the trained encoders
    expected = sum(w * _trained(i)["dense.bias"] for i, w in enumerate(weights)) / sum(weights)
    np.testing.assert_allclose(merged["dense.bias"].numpy(), expected, rtol=1e-3 if mode != "none" else 1e-6)


def test_a_reply_whose_array_is_misshapen_is_still_left_out_after_one_decode():
    strategy = ShopStrategy(FedAvg(min_train_nodes=N, min_available_nodes=N), min_shops=2,
                            shop_name=lambda i: f"shop_{i}", robust=RobustSettings(), wire=Wire())
    _, replies = _train_round(strategy, "none")
    replies[0].content["arrays"]["dense.bias"] = Array(np.full(3, np.nan, np.float32))
    replies[1].content["arrays"]["dense.weight"] = Array(np.zeros((5, 3), np.float32))
    strategy.aggregate_train(1, replies)
    assert strategy._report.left_out == {
        "shop_0": "update holds NaN/Inf values",
        "shop_1": "array 'dense.weight' has shape (5, 3), the global encoder's is (3, 5)"}


def test_decoded_array_serves_its_ndarray_read_only_and_serialises_only_on_demand():
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    lazy = DecodedArray(value)
    assert "data" not in lazy.__dict__ and lazy.numpy() is lazy.numpy()
    with pytest.raises(ValueError):
        lazy.numpy()[0, 0] = 1.0  # a reply is never changed in place
    plain = Array(value)  # bytes made on first read are Flower's own npy serialisation
    assert (lazy.dtype, lazy.shape, lazy.stype, lazy.data) == (plain.dtype, plain.shape, plain.stype, plain.data)
    kept = DecodedArray(value, Array(value))
    assert kept.data == Array(value).data
    record = array_record({"x": lazy})
    assert record["x"] is lazy and copy.deepcopy(record)["x"].numpy().tolist() == value.tolist()


def test_nodes_holding_the_same_global_get_one_patch_computed_once(monkeypatch):
    wire = Wire("sparse-fp16")
    grid = LocalGrid(N, None)
    first = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    sent = wire.prepare([grid.create_message(RecordDict({"arrays": first}), "train", nid, "1")
                         for nid in grid.get_node_ids()], "arrays", "train")
    for msg in sent:
        msg.metadata.__dict__["_message_id"] = f"m-{msg.metadata.dst_node_id}"
    wire.receive([Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=m) for m in sent],
                 sent, "evaluate")  # every node answered: each now holds the first global
    calls = [0]
    real = server.wire.encode_patch

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(server.wire, "encode_patch", counting)
    second = {k: v.copy() for k, v in GLOBAL.items()}
    second["emb"][3] += 1.0
    new = ArrayRecord({k: Array(v) for k, v in second.items()})
    out = wire.prepare([grid.create_message(RecordDict({"arrays": new}), "evaluate", nid, "1")
                        for nid in grid.get_node_ids()], "arrays", "evaluate")
    assert calls[0] == 1
    assert {m.content.config_records[WIRE_RECORD]["encoder"] for m in out} == {WIRE_PATCH}
    payloads = [{k: a.data for k, a in m.content["arrays"].items()} for m in out]
    assert all(p == payloads[0] for p in payloads) and set(payloads[0]) == {"emb@rows", "emb@values"}
