"""Hypothesis fuzzing of the decoding and validation entry points that take another party's bytes.

Threat model (docs/robustness.md, "Fuzzed entry points"): a shop sends the coordinator anything as its
train reply; a coordinator sends a shop anything as its encoder. Properties checked here:

* coordinator: `ShopStrategy.aggregate_train` never raises on hostile replies (dense or compressed),
  leaves every hostile reply out with a reason, and the new global keeps the global's keys, shapes and
  dtypes with finite values;
* `shared.compression.decode_delta` / `decode_patch`: a result of the base's keys, shapes and dtypes, or a
  `CompressionError`, never a raw numpy error;
* `shared.npy_check`: npy bytes of any header either decode to exactly what the `Array` states or raise
  `ArrayFormatError` before numpy allocates the declared size;
* shop: `client.shop_round.check_received` refuses a non-finite or mistyped global before it is loaded.

Shop data files are fuzzed by tests/test_schema_properties.py (not repeated here). Examples are bounded
(`deadline=None`, a few dozen each) so the file runs in well under 30 s.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid, honest_train_round
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

from client.shop_round import ReceivedEncoderError, check_received
from server.robust import RobustSettings
from server.strategies import ShopStrategy
from server.wire import Wire
from shared.compression import PARTS, SEP, CompressionError, decode_delta, decode_patch
from shared.npy_check import ArrayFormatError, checked_numpy

N = 5
SHAPES = {"emb": (40, 4), "dense.weight": (3, 5), "dense.bias": (3,)}
GLOBAL = {k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
FUZZ = settings(max_examples=int(os.environ.get("FEDSHOP_FUZZ_EXAMPLES", "30")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """Hostile replies log one warning each: keep hypothesis' hundreds of them out of the output (levels restored
    afterwards, so other test files' log assertions see their warnings)."""
    loggers = [logging.getLogger(name) for name in ("server", "flwr")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def npy_bytes(shape: tuple, descr: str = "<f4", payload: bytes = b"") -> bytes:
    """npy bytes whose header says ``shape`` and ``descr``, followed by ``payload`` (any length)."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def raw_array(data: bytes, shape: tuple = (3,), dtype: str = "float32") -> Array:
    """An `Array` carrying ``data`` as its npy bytes, whatever they hold."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def trained(i: int) -> dict[str, np.ndarray]:
    """Honest shop i's encoder after a round: small moves of every value."""
    rng = np.random.default_rng(10 + i)
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in GLOBAL.items()}


def strategy(mode: str) -> ShopStrategy:
    """The coordinator's screening strategy over FedAvg with the default screens."""
    return ShopStrategy(FedAvg(min_train_nodes=N, min_available_nodes=N), min_shops=2,
                        shop_name=lambda i: f"shop_{i}", robust=RobustSettings(), wire=Wire(mode))


def train_round(strat: ShopStrategy, mode: str) -> list[Message]:
    """Each shop's honest reply to the strategy's train messages (dense, or the wire delta), shop i at index i."""
    return honest_train_round(strat, GLOBAL, N, trained, mode)[1]


# ---- hostile reply content: each of these must leave the shop out ----------------------------------
def _array_damage(draw: st.DrawFn, arrays: ArrayRecord, dense: bool) -> str:
    """Damage one array of ``arrays`` in place; returns what was done (a delta may leave a tensor out: not
    hostile, so "drop" only for dense replies)."""
    key = draw(st.sampled_from(sorted(arrays)))
    value = arrays[key].numpy()
    kind = draw(st.sampled_from(["dtype", "shape", "nonfinite", "garbage", "huge-header", "header-lies",
                                 "object", "extra", "stype", *(["drop"] if dense else [])]))
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != value.dtype]))
        arrays[key] = Array(value.astype(dtype))
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3).filter(lambda s: tuple(s) != value.shape))
        arrays[key] = Array(np.zeros(shape, value.dtype))
    elif kind == "nonfinite":
        bad = value.astype(value.dtype if value.dtype.kind == "f" else np.float32, copy=True)
        bad.flat[draw(st.integers(0, max(bad.size - 1, 0)))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key] = Array(bad)
    elif kind == "garbage":
        arrays[key] = raw_array(draw(st.binary(max_size=80)), value.shape, str(value.dtype))
    elif kind == "huge-header":  # a tiny payload declaring up to exabytes
        shape = (draw(st.integers(2**28, 2**62)),)
        arrays[key] = raw_array(npy_bytes(shape, value.dtype.str, b"\0" * 16), shape, str(value.dtype))
    elif kind == "header-lies":  # metadata says the global's shape, the bytes hold another array
        other = np.zeros(draw(st.integers(1, 50)), value.dtype)
        arrays[key] = raw_array(Array(other).data, value.shape, str(value.dtype))
    elif kind == "object":
        arrays[key] = raw_array(npy_bytes((2,), "|O", b"\0" * 16), (2,), "object")
    elif kind == "drop":
        del arrays[key]
    elif kind == "extra":
        arrays[draw(st.sampled_from(["emb2", f"{key}{SEP}rows", "dense.weight@nope"]))] = Array(np.zeros(3, np.float32))
    else:
        arrays[key] = Array(dtype=str(value.dtype), shape=value.shape, stype="torch.Tensor", data=arrays[key].data)
    return f"{kind} {key}"


@st.composite
def hostile(draw: st.DrawFn, reply: Message, dense: bool) -> str:
    """Turn ``reply`` into a hostile one (arrays, metrics or records); returns a description."""
    where = draw(st.sampled_from(["arrays", "arrays", "arrays", "metrics", "records"]))
    if where == "arrays":
        return _array_damage(draw, reply.content["arrays"], dense)
    if where == "metrics":
        metrics = {"shop-index": reply.content["metrics"]["shop-index"]}
        if draw(st.booleans()):  # a good weight, but another metric is a list (MetricRecord allows them)
            metrics.update({"num-examples": 100, draw(st.sampled_from(["loss", "ctr.auc"])): draw(
                st.lists(st.floats(allow_nan=True), max_size=3) | st.lists(st.integers(), max_size=3))})
            reply.content["metrics"] = MetricRecord(metrics)
            return f"list metric {metrics}"
        weight = draw(st.one_of(st.sampled_from([-1, -1e300, float("nan"), float("inf"), float("-inf")]),
                                st.lists(st.floats(0, 10), max_size=3), st.just(None)))
        if weight is not None:
            metrics["num-examples"] = weight
        reply.content["metrics"] = MetricRecord(metrics)
        return f"num-examples {weight!r}"
    change = draw(st.sampled_from(["no-metrics", "config-metrics", "two-arrays", "no-arrays"]))
    content = reply.content
    if change == "no-metrics":
        reply.content = RecordDict({"arrays": content["arrays"]})
    elif change == "config-metrics":
        reply.content = RecordDict({"arrays": content["arrays"], "metrics": ConfigRecord({"num-examples": "100"})})
    elif change == "two-arrays":
        reply.content = RecordDict({**dict(content.items()), "more": ArrayRecord({"x": Array(np.zeros(2))})})
    else:
        reply.content = RecordDict({"metrics": content["metrics"]})
    return change


def check_global(merged: ArrayRecord | None) -> None:
    """The aggregate (if any) has exactly the global's keys, shapes and dtypes, with finite values."""
    assert merged is not None
    assert sorted(merged) == sorted(GLOBAL)
    for key, value in GLOBAL.items():
        got = merged[key].numpy()
        assert got.shape == value.shape and got.dtype == value.dtype, key
        assert np.isfinite(got).all(), key


@FUZZ
@given(data=st.data(), mode=st.sampled_from(["none", "sparse-fp16", "sparse-int8"]),
       victims=st.sets(st.integers(0, N - 1), min_size=1, max_size=2))
def test_hostile_replies_are_left_out_and_never_reach_the_global(data: st.DataObject, mode: str,
                                                                  victims: set[int]) -> None:
    strat = strategy(mode)
    replies = train_round(strat, mode)
    done = {i: data.draw(hostile(replies[i], mode == "none"), label=f"shop_{i}") for i in sorted(victims)}
    merged, _ = strat.aggregate_train(1, replies)  # must not raise
    check_global(merged)
    for i, what in done.items():
        reasons = {**strat._report.left_out}
        assert any(name in reasons for name in (f"shop_{i}", f"node-{1000 + i}")), (what, reasons)
    assert len(strat._report.train) == N - len(victims)


def test_replies_in_another_dtype_are_left_out_not_adopted_by_the_global() -> None:
    """Found by the fuzz: the first sorted reply's dtypes became the global's (a float16 or float64 reply
    silently changed the model's dtype; an int reply, with screens off, truncated the global)."""
    for dtype in (np.float16, np.float64, np.int8):
        strat = ShopStrategy(FedAvg(min_train_nodes=N, min_available_nodes=N), min_shops=2,
                             shop_name=lambda i: f"shop_{i}", robust=RobustSettings.off(), wire=Wire())
        replies = train_round(strat, "none")
        for key in SHAPES:
            replies[0].content["arrays"][key] = Array(trained(0)[key].astype(dtype))
        merged, _ = strat.aggregate_train(1, replies)
        check_global(merged)
        assert strat._report.left_out["shop_0"] == f"array 'emb' has dtype {np.dtype(dtype)}, the global " \
                                                   "encoder's is float32"


def test_list_valued_metrics_are_left_out_not_a_coordinator_crash() -> None:
    """Found by the fuzz: a train or evaluate reply whose MetricRecord held a list raised TypeError in
    `float(v)` inside `aggregate_train` / `aggregate_evaluate`, stopping the run."""
    strat = strategy("none")
    replies = train_round(strat, "none")
    replies[0].content["metrics"] = MetricRecord({"num-examples": 100, "shop-index": 0, "loss": [1.0, 2.0]})
    merged, _ = strat.aggregate_train(1, replies)
    check_global(merged)
    assert strat._report.left_out["shop_0"] == "metric 'loss' is a list, not a number"
    sent = list(strat.configure_evaluate(1, merged, ConfigRecord(), LocalGrid(N, None)))
    evals = []
    for msg in sent:
        i = msg.metadata.dst_node_id - 1000
        auc = [0.5, 0.6] if i == 1 else 0.5 + i / 100
        evals.append(Message(RecordDict({"metrics": MetricRecord({"shop-index": i, "ctr.auc": auc})}), reply_to=msg))
    means = strat.aggregate_evaluate(1, evals)  # must not raise
    assert means is not None and "ctr.auc" in means


def test_a_known_shared_local_array_of_another_shape_or_dtype_is_left_out() -> None:
    strat = strategy("none")
    replies = train_round(strat, "none")
    strat._global_local = {"local.head": np.zeros(4, np.float32)}  # as if the round's global held this shared head
    replies[0].content["arrays"]["local.head"] = Array(np.zeros(4, np.float64))
    replies[1].content["arrays"]["local.head"] = Array(np.zeros(5, np.float32))
    strat.aggregate_train(1, replies)
    assert "dtype float64" in strat._report.left_out["shop_0"]
    assert "shape (5,)" in strat._report.left_out["shop_1"]


# ---- npy header checks --------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=200), shape=st.lists(st.integers(0, 4), max_size=3),
       dtype=st.sampled_from(["float32", "int8", "float16", "object", "bogus"]))
def test_any_bytes_decode_to_the_stated_array_or_are_refused(data: bytes, shape: list[int], dtype: str) -> None:
    try:
        value = checked_numpy("x", raw_array(data, tuple(shape), dtype))
    except ArrayFormatError as err:
        assert "array 'x'" in str(err)
        return
    assert value.shape == tuple(shape) and value.dtype == np.dtype(dtype)


@FUZZ
@given(shape=st.lists(st.integers(0, 2**40), min_size=1, max_size=3), descr=st.sampled_from(["<f4", "<f8", "|i1"]),
       payload=st.binary(max_size=64))
def test_a_declared_shape_is_checked_against_the_bytes_before_numpy_allocates(monkeypatch: pytest.MonkeyPatch,
                                                                              shape: list[int], descr: str,
                                                                              payload: bytes) -> None:
    calls = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: calls.append(1) or real(self))
    array = raw_array(npy_bytes(tuple(shape), descr, payload), tuple(shape), str(np.dtype(descr)))
    fits = int(np.prod(shape, dtype=object)) * np.dtype(descr).itemsize == len(payload)
    try:
        value = checked_numpy("emb", array)
    except ArrayFormatError as err:
        assert not fits and "header declares shape" in str(err) and not calls  # refused before np.load
        return
    assert fits and value.shape == tuple(shape)


def test_a_two_gib_header_on_sixteen_bytes_allocates_nothing() -> None:
    array = raw_array(npy_bytes((2**29,), "<f4", b"\0" * 16), (2**29,), "float32")
    with pytest.raises(ArrayFormatError, match=r"declares shape \(536870912,\) float32 \(2147483648 bytes\) but 16"):
        checked_numpy("emb", array)


def test_object_arrays_are_refused_before_np_load() -> None:
    with pytest.raises(ArrayFormatError, match="dtype object is not numeric"):
        checked_numpy("emb", raw_array(npy_bytes((2,), "|O", b"\0" * 16), (2,), "object"))


# ---- compressed deltas and patches ---------------------------------------------------------------------
BASE = {"emb": np.zeros((6, 3), np.float32), "bias": np.zeros(3, np.float32), "scalar": np.zeros((), np.float32),
        "count": np.zeros((), np.int64)}
names = st.builds(lambda k, p: f"{k}{SEP}{p}", st.sampled_from([*BASE, "nope"]), st.sampled_from([*PARTS, "x"]))


def _filled(dtype: type, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` holding ``fill`` (cast however numpy casts it: NaN to int too)."""
    with np.errstate(all="ignore"):
        return np.full(shape, fill).astype(dtype) if dtype != np.bool_ else np.zeros(shape, bool)


arrays = st.builds(
    _filled,
    st.sampled_from([np.int32, np.int8, np.float16, np.float32, np.int64, np.bool_]),
    st.lists(st.integers(0, 6), max_size=3).map(tuple),
    st.sampled_from([0, 1, 5, -1, 200, 70000, np.nan, np.inf]))


@FUZZ
@given(parts=st.dictionaries(names, arrays, min_size=1, max_size=4))
def test_any_delta_decodes_to_the_base_layout_or_raises_compression_error(parts: dict[str, np.ndarray]) -> None:
    with np.errstate(all="ignore"):
        try:
            out = decode_delta(parts, BASE)
        except CompressionError:
            return
    for key, base in BASE.items():
        assert out[key].shape == base.shape and out[key].dtype == base.dtype
        assert np.isfinite(out[key]).all()


@FUZZ
@given(parts=st.dictionaries(names, arrays, min_size=1, max_size=4))
def test_any_patch_decodes_or_raises_compression_error(parts: dict[str, np.ndarray]) -> None:
    try:
        out = decode_patch(parts, BASE)
    except CompressionError:
        return
    assert set(out) == set(BASE)  # '@full' may replace a tensor: the shop's digest and check_received judge it


@pytest.mark.parametrize(("parts", "says"), [
    ({"emb@rows": np.zeros(0, np.int32), "emb@values": np.zeros((0, 3), np.int8), "emb@scale": np.zeros(0, np.float32)},
     None),  # was a raw ValueError from reshape(0, -1)
    ({"count@dense": np.ones((), np.float16)}, "only '@full' may change it"),  # was silently truncated into the int
])
def test_found_delta_cases(parts: dict[str, np.ndarray], says: str | None) -> None:
    if says is None:
        assert all(np.array_equal(v, BASE[k]) for k, v in decode_delta(parts, BASE).items())
    else:
        with pytest.raises(CompressionError, match=says):
            decode_delta(parts, BASE)


def test_a_row_patch_of_a_scalar_is_a_compression_error_not_an_index_error() -> None:
    with pytest.raises(CompressionError, match="at least one dimension"):
        decode_patch({"scalar@rows": np.zeros(0, np.int32), "scalar@values": np.zeros(0, np.float32)}, BASE)


# ---- the shop's side: what the coordinator sends ---------------------------------------------------------
MODEL = {"emb": torch.zeros(6, 3), "bias": torch.zeros(3)}


@FUZZ
@given(key=st.sampled_from(sorted(MODEL)), dtype=st.sampled_from([torch.float32, torch.float16, torch.float64,
                                                                 torch.int64]),
       bad=st.sampled_from([0.0, float("nan"), float("inf"), float("-inf")]), reshape=st.booleans())
def test_a_shop_refuses_a_global_that_is_not_finite_or_not_its_dtype(key: str, dtype: torch.dtype, bad: float,
                                                                       reshape: bool) -> None:
    received = {k: v.clone() for k, v in MODEL.items()}
    value = torch.zeros(7) if reshape else received[key].clone()
    value.view(-1)[0] = bad
    received[key] = value.to(dtype) if dtype.is_floating_point or bad == 0.0 else value
    hostile_ = reshape or received[key].dtype != torch.float32 or bad != 0.0
    if hostile_:
        with pytest.raises(ReceivedEncoderError, match=f"'{key}'"):
            check_received(received, MODEL)
    else:
        check_received(received, MODEL)


def test_a_nan_global_is_refused_before_the_shop_trains_on_it() -> None:
    received = {k: v.clone() for k, v in MODEL.items()}
    received["emb"][2, 1] = float("nan")
    with pytest.raises(ReceivedEncoderError, match="'emb' holds NaN/Inf values"):
        check_received(received, MODEL)


# ---- packed messages (shared.wire_pack, the shop's pack_mod and the coordinator's polling grid) ------------
def _packable() -> RecordDict:
    """A message content as the coordinator sends it: config, encoder arrays, metrics."""
    return RecordDict({"config": ConfigRecord({"server-round": 2}),
                       "arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                       "metrics": MetricRecord({"num-examples": 5})})


LAYOUT_FIELDS = ["order", "kinds", "deflated", "records", "keys", "dtypes", "stypes", "shapes", "lengths", "blob"]
layout_values = st.one_of(
    st.lists(st.integers(-2**40, 2**40), max_size=6), st.lists(st.text(max_size=6), max_size=6),
    st.lists(st.binary(max_size=12), max_size=4), st.binary(max_size=64), st.text(max_size=8),
    st.integers(-5, 5), st.integers(2**30, 2**50), st.floats(allow_nan=True),
    st.lists(st.sampled_from(["array", "config", "metric"]), max_size=5))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(LAYOUT_FIELDS), layout_values), min_size=1, max_size=3),
       drop=st.sets(st.sampled_from(LAYOUT_FIELDS), max_size=2))
def test_any_packed_layout_unpacks_or_raises_pack_error(edits: list[tuple[str, object]], drop: set[str]) -> None:
    from shared.wire_pack import LAYOUT, PackError, pack, unpack

    packed = pack(_packable())
    layout = packed[LAYOUT]
    for field in drop:
        layout.pop(field, None)
    for field, value in edits:
        try:
            layout[field] = value
        except (TypeError, ValueError):  # a value a ConfigRecord cannot hold never reaches the wire either
            continue
    try:
        out = unpack(packed)
    except PackError:
        return
    for record in out.array_records.values():  # whatever the layout said, the arrays' bytes are judged per array
        for key, array in record.items():
            try:
                checked_numpy(key, array)
            except ArrayFormatError:
                pass


def test_found_packed_cases_are_pack_errors_not_crashes_or_allocations() -> None:
    """Found by the fuzz: `lengths=['']` raised a raw TypeError out of `unpack` (the coordinator's polling grid
    catches only PackError, so one shop's reply stopped the run); an int `blob` was passed to bytes(n),
    allocating n zero bytes."""
    from shared.wire_pack import LAYOUT, PackError, pack, unpack

    for field, value in (("lengths", [""]), ("blob", 2**40), ("shapes", [True]), ("deflated", ["x"])):
        packed = pack(_packable())
        packed[LAYOUT][field] = value
        with pytest.raises(PackError):
            unpack(packed)


# ---- the shop's wire mod: whatever the coordinator's wire record and arrays, an error reply or the exact global --
def _wire_message(config: dict, arrays: ArrayRecord) -> Message:
    """A train request as the coordinator's `server.wire.Wire` shapes it (wire record + encoder arrays)."""
    from flwr.app import Metadata
    from flwr.app.message import make_message

    from shared.protocol import WIRE_RECORD

    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=1.0, ttl=600.0, message_type="train")
    return make_message(metadata=meta, content=RecordDict({"arrays": arrays, WIRE_RECORD: ConfigRecord(config)}))


@FUZZ
@given(data=st.data(), form=st.sampled_from(["full", "patch", "omitted", "bogus", ""]),
       base=st.sampled_from(["", "0" * 32, "held"]), target=st.sampled_from(["", "right", "f" * 32]))
def test_the_wire_mod_answers_any_request_with_an_error_or_the_exact_global(data: st.DataObject, form: str,
                                                                            base: str, target: str) -> None:
    from flwr.app import Context

    from client.wire_mod import HELD_META, HELD_RECORD, wire_mod
    from shared.compression import digest, encode_patch
    from shared.protocol import ERROR_CODE_BLOCKED

    held = {k: v.copy() for k, v in GLOBAL.items()}
    new = trained(0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    context.state[HELD_RECORD] = ArrayRecord({k: Array(v) for k, v in held.items()})
    context.state[HELD_META] = ConfigRecord({"digest": digest(held)})
    payload = new if form != "patch" else encode_patch(new, held)
    arrays = ArrayRecord({k: Array(v) for k, v in payload.items()})
    if data.draw(st.booleans(), label="damage"):
        _array_damage(data.draw, arrays, dense=True)
    config = {"mode": "none", "encoder": form, "base": digest(held) if base == "held" else base,
              "target": digest(new) if target == "right" else target}
    seen: list[dict[str, np.ndarray]] = []

    def handler(msg: Message, _context: Context) -> Message:
        seen.append({k: a.numpy() for k, a in msg.content["arrays"].items()})
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    reply = wire_mod(_wire_message(config, arrays), context, handler)  # must not raise
    if reply.has_error():
        assert reply.error.code == ERROR_CODE_BLOCKED and not seen
        return
    # the handler got exactly the announced global (an "omitted" encoder is the one the shop holds, by design)
    assert len(seen) == 1 and digest(seen[0]) == (digest(held) if form == "omitted" else config["target"])


# ---- the screens on whatever finite updates and claims got past decoding ----------------------------------------
@FUZZ
@given(n=st.integers(1, 8), dim=st.integers(1, 6), data=st.data())
def test_screens_give_finite_weights_for_any_finite_updates(n: int, dim: int, data: st.DataObject) -> None:
    from server.robust import screen

    value = st.floats(-1e30, 1e30, allow_nan=False) | st.sampled_from([0.0, 1e-38, -1e-45])
    deltas = [np.asarray(data.draw(st.lists(value, min_size=dim, max_size=dim)), np.float32) for _ in range(n)]
    claims = data.draw(st.lists(st.floats(1e-300, 1e300), min_size=n, max_size=n))
    firsts = data.draw(st.lists(st.none() | st.floats(1e-300, 1e300), min_size=n, max_size=n))
    with np.errstate(all="ignore"):
        out = screen(deltas, claims, firsts, RobustSettings(), [dim])
    kept = [i for i in range(n) if i not in out.left_out]
    assert all(np.isfinite(out.weights[i]) and out.weights[i] >= 0 for i in kept), out.weights
    assert all(0 < out.scale[i] <= 1 for i in kept), out.scale
