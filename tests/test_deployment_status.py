"""The operator's view: `merchant start` output and probe, `merchant status`, `coordinator status` (fast, no Flower)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import typer
from flower_harness import coordinator_home
from typer.testing import CliRunner

from client.local_state import FORMAT_VERSION, STATE_FILE
from simulations.commands import deploy
from simulations.deploy import coordinator as coordinator_mod
from simulations.deploy.certs import key_fingerprint, write_certs, write_merchant_keys
from simulations.deploy.coordinator import Coordinator, register_merchant
from simulations.deploy.loopback import write_tiny_shops
from simulations.deploy.merchant import (
    MERCHANT_FILE,
    CoordinatorUnreachable,
    Merchant,
    probe_coordinator,
    split_address,
    supernode_dir,
    write_merchant_record,
)
from simulations.deploy.processes import ProcessRecord, free_port


def _cli() -> typer.Typer:
    app = typer.Typer()
    deploy.register(app)
    return app


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("status-shops")
    return root / write_tiny_shops(root)[0] / "shop"


def test_merchant_start_reports_validation_then_names_an_unreachable_coordinator_within_seconds(
        shop_dir: Path, tmp_path: Path) -> None:
    certs = write_certs(tmp_path / "certs", ["m"])
    port = free_port()  # nothing listens on it: the connect is refused
    started = time.monotonic()
    result = CliRunner().invoke(_cli(), [
        "merchant", "start", "--shop-dir", str(shop_dir), "--state-dir", str(tmp_path / "state"),
        "--superlink", f"127.0.0.1:{port}", "--ca", str(certs.ca_cert), "--key", str(certs.merchant_keys["m"][0]),
        "--trusted-entities", str(certs.trusted_entities), "--shop-index", "0"])
    seconds = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"Shop {shop_dir.parent.name} validated: " in result.output and "rows per split: train " in result.output
    assert f"cannot reach the coordinator at 127.0.0.1:{port} (connection refused)" in result.output
    assert "Fix: check the address and port" in result.output and "firewall" in result.output
    assert seconds < 15, seconds  # validation of the tiny shop included; Flower alone would retry for minutes
    assert not (supernode_dir(tmp_path / "state") / "supernode.json").exists()  # nothing started


def test_probe_times_out_quickly_and_rejects_a_malformed_address() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, as a firewall that drops packets does.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        held = [socket.socket() for _ in range(3)]
        try:
            for sock in held:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(CoordinatorUnreachable, match=rf"127\.0\.0\.1:{port} \(no answer within 0\.5 s\)"):
                probe_coordinator(f"127.0.0.1:{port}", timeout=0.5)
            assert time.monotonic() - started < 3
        finally:
            for sock in held:
                sock.close()
    assert split_address("[::1]:9092") == ("::1", 9092)
    for bad in ("coord.example.com", "coord:http", ":9092", "coord:70000"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            split_address(bad)


def _state_dir(tmp_path: Path, *, pid: int, superlink: str) -> tuple[Path, Path]:
    """A merchant's state dir as `merchant start` and a few training rounds leave it; returns it and the .pub."""
    keys = write_merchant_keys(tmp_path / "certs", ["shop-a"])
    private, public = keys.merchant_keys["shop-a"]
    state = tmp_path / "state"
    merchant = Merchant(pid, 42, 0, state, supernode_dir(state) / "supernode.log")
    write_merchant_record(merchant, shop_dir=tmp_path / "export", superlink=superlink, key=private, shop_index=3,
                          shop_name="shop-a")
    (supernode_dir(state) / "supernode.json").write_text(json.dumps(asdict(
        ProcessRecord(pid, "flower-supernode", ["python"], str(merchant.log)))))
    torch.save({"format": FORMAT_VERSION, "shop": "shop-a", "round": 4, "rounds_trained": 7, "run": "/runs/r1",
                "parent": "file", "local": {}}, state / STATE_FILE)
    return state, public


def test_merchant_status_shows_name_key_coordinator_supernode_and_rounds_trained(tmp_path: Path) -> None:
    port = free_port()
    state, public = _state_dir(tmp_path, pid=os.getpid(), superlink=f"127.0.0.1:{port}")
    result = CliRunner().invoke(_cli(), ["merchant", "status", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "merchant     shop-a, shop-index 3" in out
    assert key_fingerprint(public) in out  # the fingerprint the coordinator shows for the registered .pub
    assert f"coordinator  127.0.0.1:{port} (does not answer)" in out and "(connection refused). Fix" in out
    assert f"SuperNode    running, PID {os.getpid()}, node 42" in out
    assert "round 4 of run /runs/r1, rounds_trained 7" in out

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state, _ = _state_dir(tmp_path / "second", pid=dead.pid, superlink=f"127.0.0.1:{port}")
    status = json.loads(CliRunner().invoke(_cli(), ["merchant", "status", "--state-dir", str(state), "--json"])
                        .output)
    assert status["supernode"] == {"running": False, "pid": dead.pid}
    assert status["local-part"]["rounds_trained"] == 7 and status["coordinator-reachable"] is False


def test_merchant_status_of_a_fresh_or_missing_state_dir(tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    result = CliRunner().invoke(_cli(), ["merchant", "status", "--state-dir", str(tmp_path / "fresh")])
    assert result.exit_code == 0, result.output
    assert "never started here" in result.output and "SuperNode    not running" in result.output
    assert "none yet" in result.output
    result = CliRunner().invoke(_cli(), ["merchant", "status", "--state-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such state dir" in result.output and "Fix" in result.output
    (supernode_dir(tmp_path / "fresh")).mkdir(parents=True)
    (supernode_dir(tmp_path / "fresh") / MERCHANT_FILE).write_text("{broken")
    result = CliRunner().invoke(_cli(), ["merchant", "status", "--state-dir", str(tmp_path / "fresh")])
    assert result.exit_code == 1 and MERCHANT_FILE in result.output and "Fix" in result.output


def _flwr_answers(nodes: list[dict], runs: list[dict], calls: list[tuple]):
    """Stand-in for `coordinator._flwr` answering as `flwr supernode ls` / `flwr ls` do with --format json."""
    def fake(info: Coordinator, *args: str, timeout: float = 60.0) -> dict:
        calls.append(args)
        if args[0] == "supernode" and args[1] == "register":
            return {"success": True, "node-id": "9001"}
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": nodes}
        if args[0] == "ls":
            return {"success": True, "runs": runs}
        raise AssertionError(args)
    return fake


def _home(tmp_path: Path, pid: int) -> Path:
    return coordinator_home(tmp_path, pid)


def test_register_records_the_name_and_key_fingerprint_even_without_a_shop_index(tmp_path, monkeypatch) -> None:
    home = _home(tmp_path, os.getpid())
    keys = write_merchant_keys(tmp_path / "certs", ["shop-b"])
    calls: list[tuple] = []
    monkeypatch.setattr(coordinator_mod, "_flwr", _flwr_answers([], [], calls))
    assert register_merchant(home, keys.merchant_keys["shop-b"][1], name="shop-b") == 9001
    assert calls[0][-2:] == ("--name", "shop-b")  # Flower gets the name too
    entry = json.loads((home / "merchants.json").read_text())["9001"]
    assert entry["name"] == "shop-b" and entry["shop-index"] is None
    assert entry["key-fingerprint"] == key_fingerprint(keys.merchant_keys["shop-b"][0])


def test_coordinator_status_joins_registrations_with_flowers_nodes_and_runs(tmp_path, monkeypatch) -> None:
    home = _home(tmp_path, os.getpid())
    (home / "merchants.json").write_text(json.dumps({
        "11": {"name": "shop-a", "shop-index": 0, "key-fingerprint": "SHA256:aaa"},
        "12": {"name": "shop-b", "shop-index": 1, "key-fingerprint": "SHA256:bbb"}}))
    nodes = [{"node-id": "11", "owner-name": "<none>", "status": "online", "online-at": "2026-12-05 05:00:00Z"},
             {"node-id": "12", "owner-name": "<none>", "status": "offline", "online-at": "2026-12-05 04:00:00Z"},
             {"node-id": "13", "owner-name": "<none>", "status": "registered", "online-at": ""}]
    runs = [{"run-id": "7", "status": "finished:completed", "pending-at": "2026-12-05 05:01:00Z",
             "finished-at": "2026-12-05 05:09:00Z", "elapsed": "00:08:00"},
            {"run-id": "8", "status": "running", "pending-at": "2026-12-05 05:10:00Z", "finished-at": "",
             "elapsed": "00:01:00"}]
    monkeypatch.setattr(coordinator_mod, "_flwr", _flwr_answers(nodes, runs, []))
    result = CliRunner().invoke(_cli(), ["coordinator", "status", "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    by_node = {m["node-id"]: m for m in status["merchants"]}
    assert by_node["11"]["name"] == "shop-a" and by_node["11"]["state"] == "online"
    assert by_node["12"]["state"] == "offline" and by_node["12"]["shop-index"] == 1
    assert by_node["13"]["name"] == "" and by_node["13"]["state"] == "registered"  # registered outside fedshop
    assert [(r["run-id"], r["status"]) for r in status["runs"]] == [("7", "finished:completed"), ("8", "running")]
    table = CliRunner().invoke(_cli(), ["coordinator", "status", "--home", str(home)]).output
    assert "shop-a" in table and "SHA256:aaa" in table and "finished:completed" in table and "flwr ls" in table


def test_coordinator_status_without_a_running_superlink_shows_the_registrations(tmp_path, monkeypatch) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    home = _home(tmp_path, dead.pid)
    (home / "merchants.json").write_text(json.dumps({"11": {"name": "shop-a", "shop-index": 0}}))
    monkeypatch.setattr(coordinator_mod, "_flwr", _flwr_answers([], [], calls := []))
    result = CliRunner().invoke(_cli(), ["coordinator", "status", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "not running" in result.output and "fedshop coordinator start" in result.output
    assert "shop-a" in result.output and calls == []  # Flower is not asked when its SuperLink is down
    result = CliRunner().invoke(_cli(), ["coordinator", "status", "--home", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no coordinator here" in result.output


def test_the_deployment_scenario_the_docs_run_is_shipped_and_builds_a_run_config(tmp_path: Path) -> None:
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config

    docs = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    assert "fedshop coordinator run shops --home coord" in docs
    scenario = load_scenario("shops")  # built in: it travels inside the FAB to every merchant
    assert scenario.data["source"] == "shop-dirs" and scenario.data["paths"] == [] and scenario.late_joiners == []
    assert scenario.model == load_scenario("default").model
    config = deployment_run_config(scenario, "shops", tmp_path, rounds=5, extra={"round-timeout": 300.0})
    assert config["scenario"] == "shops" and config["num-server-rounds"] == 5 and config["round-timeout"] == 300.0


def test_foreground_mode_stops_the_process_on_sigterm_and_fails_when_it_dies(tmp_path: Path) -> None:
    """`--foreground` (systemd Type=simple, containers): the supervisor's SIGTERM stops the Flower process group."""
    import signal
    import threading

    from simulations.commands.deploy import stay_in_foreground
    from simulations.deploy.processes import pid_alive, start_process, stop_recorded

    record = tmp_path / "p.json"
    proc = start_process("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "log",
                         record_path=record)
    stopped: list[bool] = []
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # what `systemctl stop` sends
    before = signal.getsignal(signal.SIGTERM)
    stay_in_foreground(proc.pid, "test process", lambda: stopped.append(stop_recorded(record)), poll=0.05)
    assert stopped == [True] and not pid_alive(proc.pid) and not record.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back

    short = start_process("short", [sys.executable, "-c", "pass"], log_path=tmp_path / "log2",
                          record_path=tmp_path / "q.json")
    with pytest.raises(typer.Exit) as exit_info:
        stay_in_foreground(short.pid, "test process", lambda: pytest.fail("nothing to stop"), poll=0.05)
    assert exit_info.value.exit_code == 1  # Restart=on-failure restarts a merchant whose SuperNode died
