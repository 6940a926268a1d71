"""A merchant's disk: the local-part file (rounds trained across runs and restarts) and the tensor cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client.local_state import (
    _CACHED_FIELDS,
    CACHE_DIR,
    KEY_INDEX,
    STATE_FILE,
    cached_shop_tensors,
    indexed_tensor_cache_key,
    restore_local_part,
    rounds_trained,
    save_local_part,
    tensor_cache_key,
)
from server.polling_grid import DEFAULT_POLL_INTERVAL, POLL_ENV, faster_polling, poll_interval
from shared.features import FeatureConfig, build_shop_tensors
from shared.model import build_model
from simulations.deploy.flwr_config import flwr_env
from simulations.deploy.loopback import write_tiny_shops
from simulations.deploy.merchant import node_config
from simulations.deploy.supernode_launcher import apply_heartbeat_interval, check_heartbeat_interval
from simulations.deploy.supernode_launcher import main as launcher_main


@pytest.fixture(scope="module")
def shop():
    scenario = tiny_scenario()
    return scenario, build_shop_tensors(scenario.training_shops()[0], scenario.features)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _saved(tmp_path) -> dict:
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    return {"round": payload["round"], "rounds_trained": payload["rounds_trained"]}


def _train_round(shop, context: Context, tmp_path, server_round: int) -> str:
    scenario, tensors = shop
    model = build_model(tensors, scenario.model, scenario.features, seed=server_round)
    source = restore_local_part(model, context, tmp_path)
    save_local_part(model, context, tmp_path, shop="s", server_round=server_round)
    return source


def test_lineage_grows_within_a_run_and_carries_into_the_next(shop, tmp_path) -> None:
    run1 = _context()
    assert [_train_round(shop, run1, tmp_path, r) for r in (1, 2)] == ["fresh", "context"]
    assert _saved(tmp_path) == {"round": 2, "rounds_trained": 2} and rounds_trained(run1) == 2
    run2 = _context()  # a new run, or a restarted SuperNode: empty context.state, the file is used
    assert _train_round(shop, run2, tmp_path, 1) == "disk"
    assert _saved(tmp_path) == {"round": 1, "rounds_trained": 3}


def test_a_corrupt_file_restarts_the_lineage(shop, tmp_path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\x00garbage")
    assert _train_round(shop, _context(), tmp_path, 4) == "fresh"
    assert _saved(tmp_path) == {"round": 4, "rounds_trained": 1}


def test_node_config_carries_the_shop_index(tmp_path) -> None:
    text = node_config(tmp_path / "shop", tmp_path / "state", 2)
    assert text.endswith("shop-index=2") and f"shop-dir='{tmp_path / 'shop'}'" in text
    assert "shop-index" not in node_config(tmp_path / "shop", tmp_path / "state")
    with pytest.raises(ValueError, match="--shop-index -1"):
        node_config(tmp_path / "shop", tmp_path / "state", -1)


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cache-shops")
    return root / write_tiny_shops(root)[0] / "shop"


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_tensor_cache_reuses_rebuilds_on_change_and_survives_corruption(shop_dir, tmp_path, monkeypatch,
                                                                        caplog) -> None:
    import client.local_state as local_state

    features = FeatureConfig(hash_buckets=64, product_buckets=64, history_len=3)
    built = cached_shop_tensors(shop_dir, tmp_path, features)
    (cached,) = (tmp_path / CACHE_DIR).glob("tensors-*.pt")
    monkeypatch.setattr(local_state, "build_shop_tensors", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    again = cached_shop_tensors(shop_dir, tmp_path, features)
    assert again.source is None and all(_same(getattr(built, f), getattr(again, f)) for f in _CACHED_FIELDS)
    monkeypatch.undo()
    # Another feature config or a changed shop file gives another key; the stale file is replaced.
    assert tensor_cache_key(shop_dir, replace(features, history_len=4)) != tensor_cache_key(shop_dir, features)
    copy = tmp_path / "shop-copy"
    shutil.copytree(shop_dir, copy)
    key = tensor_cache_key(copy, features)
    interactions = copy / "interactions.csv"
    interactions.write_text(interactions.read_text() + "\n")
    assert tensor_cache_key(copy, features) != key
    # An edited feature pipeline gives another key too: the code is part of it, not just the version.
    import shared.features

    code = Path(shared.features.__file__)
    fake = tmp_path / "features_edited.py"
    fake.write_bytes(code.read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(shared.features, "__file__", str(fake))
    edited_key = tensor_cache_key(shop_dir, features)
    monkeypatch.undo()
    assert edited_key != tensor_cache_key(shop_dir, features)
    cached.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="client.local_state"):
        rebuilt = cached_shop_tensors(shop_dir, tmp_path, features)
    assert "tensor cache" in caplog.text and "rebuilding" in caplog.text
    assert _same(rebuilt.rows, built.rows)
    assert len(list((tmp_path / CACHE_DIR).glob("tensors-*.pt"))) == 1


def _age(folder: Path, seconds: float) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(time.time_ns() - int(seconds * 1e9),) * 2)


def test_cache_key_is_read_from_the_index_until_a_file_changes_stat(shop_dir, tmp_path, monkeypatch) -> None:
    import client.local_state as local_state

    features = FeatureConfig(hash_buckets=64, product_buckets=64, history_len=3)
    copy = tmp_path / "shop"
    shutil.copytree(shop_dir, copy)
    state = tmp_path / "state"
    # Files written just now are not trusted to their stat: no index is saved for them.
    _age(copy, 0)
    assert indexed_tensor_cache_key(copy, state, features) == tensor_cache_key(copy, features)
    assert not (state / CACHE_DIR / KEY_INDEX).exists()
    _age(copy, 60)
    key = indexed_tensor_cache_key(copy, state, features)
    assert key == tensor_cache_key(copy, features) and (state / CACHE_DIR / KEY_INDEX).exists()
    monkeypatch.setattr(local_state, "tensor_cache_key", lambda *a, **k: pytest.fail("hashed unchanged files"))
    assert indexed_tensor_cache_key(copy, state, features) == key
    monkeypatch.undo()
    # A changed size (or mtime) and another feature config both miss the index.
    interactions = copy / "interactions.csv"
    interactions.write_text(interactions.read_text() + "\n")
    _age(copy, 60)
    assert indexed_tensor_cache_key(copy, state, features) == tensor_cache_key(copy, features) != key
    other = replace(features, history_len=4)
    assert indexed_tensor_cache_key(copy, state, other) == tensor_cache_key(copy, other)
    (state / CACHE_DIR / KEY_INDEX).write_text("{not json")
    assert indexed_tensor_cache_key(copy, state, other) == tensor_cache_key(copy, other)


def test_grid_poll_interval_is_validated() -> None:
    assert poll_interval({}) == DEFAULT_POLL_INTERVAL
    assert poll_interval({POLL_ENV: "3"}) == 3.0
    for bad in ("0", "fast", "nan", "100"):
        with pytest.raises(ValueError, match=POLL_ENV):
            poll_interval({POLL_ENV: bad})
    sentinel = object()
    assert faster_polling(sentinel) is sentinel  # simulation's InMemoryGrid polls every 0.1 s already


def test_heartbeat_interval_reaches_the_supernode_modules_and_is_range_checked(monkeypatch) -> None:
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection

    for module in (heartbeat, connection):  # restored after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    apply_heartbeat_interval(10.0)
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    for bad in (5.0, 4000.0):
        with pytest.raises(ValueError, match="10-1800 seconds"):
            check_heartbeat_interval(bad)
    assert launcher_main(["5", "--", "--help"]) == 2  # refused before Flower starts
    assert launcher_main(["10"]) == 2  # usage error, no SuperNode


def test_flower_processes_get_a_local_home_and_keep_their_bytecode(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = flwr_env(tmp_path / "flwr", {"EXTRA": "x"})
    assert "PYTHONDONTWRITEBYTECODE" not in env  # each per-message process would recompile fedshop otherwise
    assert env["FLWR_HOME"] == str((tmp_path / "flwr").resolve())
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["EXTRA"] == "x"


def test_timing_log_appends_one_json_line_per_event_only_when_asked(monkeypatch, tmp_path) -> None:
    from server.polling_grid import _timing
    from shared.timing_log import TIMING_ENV, record, timing_enabled

    monkeypatch.delenv(TIMING_ENV, raising=False)
    record({"event": "ignored"})
    assert not timing_enabled() and not list(tmp_path.iterdir())
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv(TIMING_ENV, str(log))
    record({"where": "clientapp", "round": "1"})
    _timing({"event": "push", "n": 3})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [{"where": "clientapp", "round": "1"}, {"where": "serverapp", "event": "push", "n": 3}]


def test_the_supernode_records_receive_store_and_reply_times_only_when_asked(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from flwr.supernode import start_client_internal as sci

    from shared.timing_log import TIMING_ENV
    from simulations.deploy.supernode_launcher import install_timing

    def flowers_pull(**kwargs):  # what Flower's loop does with the callables it is given
        message, _tree = kwargs["receive"]()
        kwargs["confirm_message_received"](7, message.metadata.message_id)
        return 7

    def flowers_push(**kwargs):
        kwargs["send"](SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m1")), "tree", 0.1)

    monkeypatch.setattr(sci, "_pull_and_store_message", flowers_pull)
    monkeypatch.setattr(sci, "_push_messages", flowers_push)
    monkeypatch.delenv(TIMING_ENV, raising=False)
    install_timing()
    assert sci._pull_and_store_message is flowers_pull and sci._push_messages is flowers_push  # off: untouched
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv(TIMING_ENV, str(log))
    install_timing()
    sent: list[tuple] = []
    received = (SimpleNamespace(metadata=SimpleNamespace(message_id="m1")), "tree")
    assert sci._pull_and_store_message(receive=lambda: received, confirm_message_received=lambda r, m: None) == 7
    sci._push_messages(send=lambda *args: sent.append(args))
    assert len(sent) == 1 and sent[0][1:] == ("tree", 0.1)  # Flower's send still gets everything
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["where"], e["event"], e["ids"]) for e in lines] == [
        ("supernode", "received", ["m1"]), ("supernode", "stored", ["m1"]), ("supernode", "sending", ["m1"]),
        ("supernode", "sent", ["m1"])]
    assert [e["at"] for e in lines] == sorted(e["at"] for e in lines)
