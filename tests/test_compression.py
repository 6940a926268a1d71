"""Message compression: codec round trips, malformed input, and compressed federations against dense ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import Array, Context, MessageType, RecordDict

from client import client_app, wire_mod
from client.local_state import resolve_shop
from client.wire_mod import HELD_RECORD
from server.checkpoint import latest_checkpoint
from server.federation_common import initial_encoder_arrays
from server.server_app import FederationSettings, initial_encoder, run_federation, split_privacy
from server.wire import WIRE_RECORD, record_bytes
from shared.compression import (
    CompressionError,
    decode_delta,
    decode_patch,
    digest,
    encode_delta,
    encode_patch,
)
from shared.scenario import load_scenario
from shared.settings import ShopRoundSettings

FP16_REL = 2.0**-10  # float16 keeps 11 significant bits: rounding error <= 2^-11 of the value


@pytest.fixture()
def tables() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    base = {"emb": rng.normal(size=(4096, 16)).astype(np.float32), "w": rng.normal(size=(8, 4)).astype(np.float32),
            "b": rng.normal(size=8).astype(np.float32), "same": np.ones(3, np.float32)}
    new = {k: v.copy() for k, v in base.items()}
    rows = np.sort(rng.choice(4096, size=40, replace=False)).astype(np.int32)
    new["emb"][rows] += rng.normal(scale=1e-2, size=(40, 16)).astype(np.float32)
    new["w"] += rng.normal(scale=1e-3, size=(8, 4)).astype(np.float32)
    new["b"][2] += 0.5
    return base, new, rows


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_delta_round_trip_sends_only_changed_rows(tables, values):
    base, new, rows = tables
    wire = encode_delta(new, base, values=values)
    np.testing.assert_array_equal(wire["emb@rows"], rows)  # indices exact
    assert "same@dense" not in wire and "same@values" not in wire  # unchanged tensors are left out
    assert wire["emb@values"].dtype == (np.float16 if values == "fp16" else np.int8)
    decoded = decode_delta(wire, base)
    for key in base:
        delta = new[key] - base[key]
        # fp16: relative to each value; int8: half a step of the row's (or tensor's) max / 127
        tol = FP16_REL * np.abs(delta) + 1e-7 if values == "fp16" else np.abs(delta).max() / 254 + 1e-7
        assert (np.abs(decoded[key] - new[key]) <= tol).all(), key
        assert decoded[key].dtype == base[key].dtype
    untouched = np.setdiff1d(np.arange(4096), rows)
    np.testing.assert_array_equal(decoded["emb"][untouched], base["emb"][untouched])
    assert sum(a.nbytes for a in wire.values()) < 0.05 * sum(a.nbytes for a in new.values())


def test_patch_round_trip_is_bit_exact(tables):
    base, new, rows = tables
    new["same"][0] = -0.0 if base["same"][0] == 0 else new["same"][0]
    base["b"][5], new["b"][5] = 0.0, -0.0  # equal as floats, different bits: still patched
    wire = encode_patch(new, base)
    np.testing.assert_array_equal(wire["emb@rows"], rows)
    assert wire["emb@values"].dtype == np.float32
    decoded = decode_patch(wire, base)
    assert digest(decoded) == digest(new)
    assert encode_patch(new, new) == {}


@pytest.mark.parametrize(("corrupt", "says"), [
    (lambda w: w.update({"emb@rows": w["emb@rows"] + 5000}), "out of range"),
    (lambda w: w.update({"emb@rows": w["emb@rows"][::-1].copy()}), "strictly increasing"),
    (lambda w: w.update({"emb@values": w["emb@values"][:-1]}), "shape"),
    (lambda w: w.update({"emb@values": w["emb@values"].astype(np.float64)}), "dtype"),
    (lambda w: w.update({"emb@rows": w["emb@rows"].astype(np.int64)}), "int32"),
    (lambda w: w.update({"nope@dense": np.zeros(3, np.float16)}), "names no encoder tensor"),
    (lambda w: w.update({"emb": np.zeros(3, np.float16)}), "<part>"),
    (lambda w: w.pop("emb@values"), "row-sparse delta needs"),
    (lambda w: w.update({"b@dense": np.full(8, np.nan, np.float16)}), "NaN/Inf"),
    (lambda w: w.update({"b@dense": np.zeros(8, np.int8)}), "scale"),
])
def test_malformed_deltas_are_refused_with_a_reason(tables, corrupt, says):
    base, new, _ = tables
    wire = encode_delta(new, base)
    corrupt(wire)
    with pytest.raises(CompressionError, match=says):
        decode_delta(wire, base)


# ---- federations on the in-process Grid ----------------------------------------------------------------

@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("compression") / "scenario.toml")


def _recording(app, log):
    """``app``, noting (node, message type, encoder form, number of arrays) of each request as it arrives."""
    def recorded(msg, context):
        wire = msg.content.config_records.get(WIRE_RECORD, {})
        log.append((msg.metadata.dst_node_id, msg.metadata.message_type, wire.get("encoder"),
                    sum(len(r) for r in msg.content.array_records.values())))
        return app(msg, context)
    return recorded


def _run(scenario_file, run_dir, app=client_app.app, rounds=1, **config):
    grid = LocalGrid(3, _recording(app, sent := []))
    grid.wire_log = sent
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                               "run-dir": str(run_dir), **config})
    reports = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    return reports, grid


def test_compressed_replies_aggregate_to_the_dense_aggregate_within_fp16(scenario_file, tmp_path):
    start = {k: a.numpy() for k, a in initial_encoder(load_scenario(str(scenario_file))).items()}
    dense_reports, _ = _run(scenario_file, tmp_path / "dense")
    sparse_reports, _ = _run(scenario_file, tmp_path / "sparse", compression="sparse-fp16")
    dense, sparse = latest_checkpoint(tmp_path / "dense").arrays, latest_checkpoint(tmp_path / "sparse").arrays
    for key, a in dense.items():
        step = np.abs(a - start[key]).max()
        assert np.abs(sparse[key] - a).max() <= FP16_REL * step + 1e-7, key
    unchanged = (sparse["fields.weight"] == start["fields.weight"]).all(axis=1)
    assert unchanged[0]  # the padding row no shop changes stays bit-identical (no float-rounding drift)
    assert unchanged.sum() >= (dense["fields.weight"] == start["fields.weight"]).all(axis=1).sum()
    assert set(sparse_reports[0].train) == set(dense_reports[0].train) == {"shop_00", "shop_01", "shop_02"}
    assert sparse_reports[0].wire_bytes["up"] < dense_reports[0].wire_bytes["up"] / 2  # deltas went over the wire


def test_patched_globals_equal_the_dense_globals_bit_for_bit(scenario_file, tmp_path):
    reports, grid = _run(scenario_file, tmp_path, rounds=2, compression="sparse-int8")
    assert all(not r.left_out for r in reports)
    forms = [(kind, form) for _, kind, form, _ in grid.wire_log]
    assert forms == [(MessageType.TRAIN, "patch")] * 3 + [(MessageType.EVALUATE, "patch")] * 3 \
        + [(MessageType.TRAIN, "patch")] * 3 + [(MessageType.EVALUATE, "patch")] * 3
    # Round 1 patches the initial encoder each shop rebuilt from the scenario: nothing changed, no arrays.
    assert [n for _, _, _, n in grid.wire_log[:3]] == [0, 0, 0]
    final = latest_checkpoint(tmp_path).arrays
    for context in grid.contexts.values():  # each shop's last decoded global is the coordinator's final one
        held = {k: a.numpy() for k, a in context.state.array_records[HELD_RECORD].items()}
        assert digest(held) == digest({k: final[k] for k in held})
    full = record_bytes(initial_encoder(load_scenario(str(scenario_file))))
    assert reports[0].wire_bytes["down"] < 3 * full  # round 1: only 3 evaluate patches (dense: 6 full encoders)


def test_personal_mix_evaluations_carry_no_encoder_and_score_the_same(scenario_file, tmp_path):
    mix = {"personal-mix": 20000.0, "fuse-evaluate": False}  # separate evaluate messages (a fused run sends none)
    dense, _ = _run(scenario_file, tmp_path / "dense", **mix)
    sparse, grid = _run(scenario_file, tmp_path / "sparse", compression="sparse-fp16", **mix)
    evals = [(form, n) for _, kind, form, n in grid.wire_log if kind == MessageType.EVALUATE]
    assert evals == [("omitted", 0)] * 3
    assert sparse[0].evaluate == dense[0].evaluate  # round 1: each shop serves its own encoder either way
    fused, grid = _run(scenario_file, tmp_path / "fused", compression="sparse-fp16", **{"personal-mix": 20000.0})
    assert not [kind for _, kind, _, _ in grid.wire_log if kind == MessageType.EVALUATE]
    assert fused[0].evaluate == dense[0].evaluate


def _corrupt_replies(node_index: int, corrupt):
    """A ClientApp whose train replies from one node are corrupted by ``corrupt(arrays record)``."""
    def app(msg, context):
        reply = client_app.app(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == node_index
                and not reply.has_error()):
            corrupt(reply.content["arrays"])
        return reply
    return app


@pytest.mark.parametrize(("corrupt", "says"), [
    (lambda r: r.__setitem__(next(k for k in r if k.endswith("@rows")),
                             Array(np.array([0, 10**6], np.int32))), "compressed update rejected"),
    (lambda r: r.__setitem__(next(k for k in r if k.endswith("@values")), Array(np.zeros((1, 1), np.float64))),
     "compressed update rejected"),
    (lambda r: r.__setitem__("fields.weight", Array(np.zeros(2, np.float32))), "<part>"),
])
def test_a_malformed_compressed_reply_leaves_the_shop_out_with_a_reason(scenario_file, tmp_path, corrupt, says):
    reports, _ = _run(scenario_file, tmp_path, app=_corrupt_replies(1, corrupt), compression="sparse-fp16")
    assert set(reports[0].train) == {"shop_00", "shop_02"}
    assert says in next(iter(reports[0].left_out.values()))
    assert all(np.isfinite(a).all() for a in latest_checkpoint(tmp_path).arrays.values())


def test_a_shop_that_lost_its_global_is_left_out_then_patched_from_the_initial(scenario_file, tmp_path):
    def forgetful(msg, context):  # node 0 loses its state (e.g. a restarted SuperNode) before round 2
        config = next(iter(msg.content.config_records.values()))
        if context.node_config["partition-id"] == 0 and int(config.get("server-round", 0)) == 2 \
                and msg.metadata.message_type == MessageType.TRAIN:
            context.state.array_records.pop(HELD_RECORD, None)
        return client_app.app(msg, context)

    reports, grid = _run(scenario_file, tmp_path, app=forgetful, rounds=2, compression="sparse-fp16")
    assert "could not decode" in reports[1].left_out["shop_00"]
    assert "shop_00" in reports[1].evaluate  # its round-2 evaluation: a patch of the initial encoder
    to_shop0 = [form for node, _, form, _ in grid.wire_log if node == 1000]
    assert to_shop0 == ["patch"] * 4  # train, evaluate per round


def test_a_shop_rebuilds_the_coordinators_initial_encoder_without_touching_its_rng(scenario_file):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    config = ShopRoundSettings.from_message({}, {"scenario": str(scenario_file)})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rebuilt, arrays = wire_mod.initial_global(context, config)
    assert torch.equal(torch.get_rng_state(), before)  # the shop's training stream is as without compression
    assert rebuilt == digest(arrays) == digest(initial_encoder_arrays(load_scenario(str(scenario_file))))
    fresh = resolve_shop(context, config).model().encoder_state()  # what a shop's first model starts from
    assert rebuilt == digest({k: v.numpy() for k, v in fresh.items()})


def _initial_encoder_differs_on(node_index: int):
    """`client.wire_mod.initial_global` as on a shop whose code builds another initial encoder."""
    real = wire_mod.initial_global

    def initial_global(context, config):
        start = real(context, config)
        if context.node_config["partition-id"] != node_index:
            return start
        arrays = {**start[1], "fields.weight": start[1]["fields.weight"] + np.float32(1e-3)}
        return digest(arrays), arrays
    return initial_global


def test_a_shop_whose_initial_encoder_differs_gets_the_encoder_in_full(scenario_file, tmp_path, monkeypatch):
    monkeypatch.setattr(wire_mod, "initial_global", _initial_encoder_differs_on(1))
    reports, grid = _run(scenario_file, tmp_path, rounds=3, compression="sparse-int8")
    assert "initial encoder" in reports[0].left_out["shop_01"] and set(reports[0].train) == {"shop_00", "shop_02"}
    assert set(reports[0].evaluate) == {"shop_00", "shop_01", "shop_02"}  # its evaluation got the full encoder
    assert "warm-up" in reports[1].left_out["shop_01"]  # it missed round 1: it joins like a late shop
    assert set(reports[2].train) == {"shop_00", "shop_01", "shop_02"}
    to_shop1 = [form for node, _, form, _ in grid.wire_log if node == 1001]
    assert to_shop1 == ["patch", "full"] + ["patch"] * 4  # refused, then full once, then patches again
    final = latest_checkpoint(tmp_path).arrays
    held = {k: a.numpy() for k, a in grid.contexts[1001].state.array_records[HELD_RECORD].items()}
    assert digest(held) == digest({k: final[k] for k in held})


def test_a_resumed_run_patches_the_initial_encoder_for_new_shop_processes(scenario_file, tmp_path):
    _run(scenario_file, tmp_path, rounds=1, compression="sparse-int8")
    reports, grid = _run(scenario_file, tmp_path, rounds=2, compression="sparse-int8", resume=True)
    assert [r.server_round for r in reports] == [2] and not reports[0].left_out
    assert [form for _, _, form, _ in grid.wire_log] == ["patch"] * 6  # fresh contexts: from the initial
    final = latest_checkpoint(tmp_path).arrays
    for context in grid.contexts.values():
        held = {k: a.numpy() for k, a in context.state.array_records[HELD_RECORD].items()}
        assert digest(held) == digest({k: final[k] for k in held})


@pytest.mark.parametrize(("extra", "says"), [({"secure-aggregation": True}, "SecAgg+"),
                                            ({"dp-noise-multiplier": 0.5}, "dp.clipping.norm"),
                                            ({"compression": "zip"}, "one of")])
def test_compression_is_refused_where_it_breaks_privacy_or_unknown(extra, says):
    with pytest.raises(ValueError, match=says):
        split_privacy({"compression": "sparse-fp16", **extra})
