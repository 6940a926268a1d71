"""A coordinator restart with its SuperLink state in memory (the default), while the merchants keep running.

Slow test: a real TLS loopback federation of three tiny shops. Merchant 2 is unregistered before the
restart; the coordinator is stopped and started on the same port; the SuperLink has forgotten every node,
so `start` registers the keys of merchants.json again (new node IDs). The running SuperNodes are refused
under their old IDs (401) and their launcher re-activates them by key, in the same process. Then a run must
complete with replies bound to the right shops, an unregister by an old ID must refuse that key, and the key
unregistered before the restart must stay refused. Fast tests check `restore_registrations` with a fake `flwr`.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from server.node_identity import BINDINGS_FILE
from shared.scenario import load_scenario
from simulations.deploy import coordinator as coordinator_mod
from simulations.deploy.certs import key_fingerprint, write_merchant_keys
from simulations.deploy.coordinator import (
    deployment_run_config,
    list_merchants,
    registered_merchants,
    restore_registrations,
    start_coordinator,
    stop_coordinator,
    submit_run,
    unregister_merchant,
)
from simulations.deploy.loopback import loopback_federation, tiny_scenario, write_tiny_shops
from simulations.deploy.merchant import stop_merchant
from simulations.deploy.processes import ProcessStartError, pid_alive
from simulations.deploy.status import latest_node_id

REJOIN_FOR = 25  # seconds a refused SuperNode keeps trying to rejoin (FEDSHOP_REJOIN_FOR) in this test


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The federation before and after a coordinator restart, a run after it and the unregister checks."""
    root = tmp_path_factory.mktemp("restart")
    shops = write_tiny_shops(root)
    (root / "tiny.toml").write_text(tiny_scenario(rounds=2))
    seen: dict = {"shops": shops, "warnings": []}
    with loopback_federation(root, shops, env={"FEDSHOP_REJOIN_FOR": str(REJOIN_FOR)},
                            scenario=root / "tiny.toml") as fed:
        home = fed.coordinator.home
        seen["state"] = fed.coordinator.state
        seen["before"] = registered_merchants(home)
        seen["pids"] = {name: m.pid for name, m in fed.merchants.items()}
        seen["old_ids"] = {name: m.node_id for name, m in fed.merchants.items()}
        unregister_merchant(home, seen["old_ids"][shops[2]])  # revoked before the restart
        assert stop_coordinator(home)
        restarted_at = time.monotonic()
        start_coordinator(home, root / "certs", port=fed.coordinator.port, state_db=False,
                          warn=seen["warnings"].append)
        seen["after"] = registered_merchants(home)
        new_ids = {entry["name"]: int(node) for node, entry in seen["after"].items()}
        seen["new_ids"] = new_ids

        def rejoined() -> bool:
            return all(latest_node_id(fed.merchants[n].log) == new_ids[n] for n in shops[:2])

        _wait(rejoined, 120, "both merchants to re-activate under their new node IDs")
        seen["rejoin_s"] = time.monotonic() - restarted_at
        seen["nodes"] = {str(n["node-id"]): n["status"] for n in list_merchants(home)}
        seen["alive_after_rejoin"] = {n: pid_alive(seen["pids"][n]) for n in shops[:2]}
        seen["clientapps_alive"] = {n: pid_alive(fed.merchants[n].clientapp_pid) for n in shops[:2]}
        seen["rejoin_logs"] = {n: fed.merchants[n].log.read_text(errors="replace") for n in shops[:2]}
        run_dir = root / "runs" / "after-restart"
        run_dir.mkdir(parents=True)
        config = deployment_run_config(load_scenario(str(root / "tiny.toml")), str(root / "tiny.toml"), run_dir,
                                       rounds=2, extra={"min-shops": 2})
        log = io.StringIO()
        seen["outcome"] = submit_run(home, config, out=log, timeout=600)
        seen["log"] = log.getvalue()
        seen["metrics"] = pd.read_csv(run_dir / "metrics.csv")
        seen["bindings"] = json.loads((run_dir / BINDINGS_FILE).read_text())
        # Unregister by the ID from before the restart: it is mapped to the key's new node ID.
        seen["unregistered"] = unregister_merchant(home, seen["old_ids"][shops[1]])
        fed_merchant_2 = fed.merchants[shops[2]]
        _wait(lambda: not pid_alive(fed_merchant_2.pid), REJOIN_FOR + 60, "the revoked merchant to give up")
        seen["revoked_log"] = fed_merchant_2.log.read_text(errors="replace")
        for name in shops[1:]:
            stop_merchant(fed.state_dir(name))
            try:
                fed.start(name, validate=False, retry_for=0)
                seen[f"start-{name}"] = None
            except ProcessStartError as err:
                seen[f"start-{name}"] = str(err)
    return seen


@pytest.mark.slow
def test_restart_registers_the_keys_again_under_new_ids_keeping_what_they_are_bound_to(restarted: dict) -> None:
    shops, before, after = restarted["shops"], restarted["before"], restarted["after"]
    assert restarted["state"] == coordinator_mod.STATE_MEMORY
    assert sorted(e["name"] for e in after.values()) == sorted(shops[:2])  # the revoked key is not brought back
    old_by_name = {e["name"]: (node, e) for node, e in before.items()}
    for node, entry in after.items():
        old_node, old_entry = old_by_name[entry["name"]]
        assert node != old_node and entry["previous-node-ids"] == [old_node]
        for field in ("name", "shop-index", "key", "key-fingerprint", "public-key"):
            assert entry[field] == old_entry[field]
    assert any("registered again" in line for line in restarted["warnings"])


@pytest.mark.slow
def test_running_merchants_rejoin_in_the_same_process_and_the_next_run_binds_the_right_shops(restarted: dict) -> None:
    shops, new_ids = restarted["shops"], restarted["new_ids"]
    assert restarted["alive_after_rejoin"] == {shops[0]: True, shops[1]: True}  # same PIDs, never restarted by hand
    assert restarted["clientapps_alive"] == {shops[0]: True, shops[1]: True}  # the long-lived ClientApps too
    for name in shops[:2]:
        assert "no longer accepts this SuperNode's node ID" in restarted["rejoin_logs"][name]
    print(f"merchants rejoined {restarted['rejoin_s']:.1f} s after `coordinator start` began")
    assert all(restarted["nodes"][str(new_ids[n])] == "online" for n in shops[:2])
    assert restarted["outcome"].ok, restarted["log"][-3000:]
    assert restarted["bindings"] == {str(new_ids[shops[0]]): 0, str(new_ids[shops[1]]): 1}
    trained = restarted["metrics"].query("split == 'train'")
    assert sorted(trained["shop"].unique()) == ["shop-0", "shop-1"]
    assert sorted(trained["round"].unique()) == [1, 2]
    assert "reply dropped" not in restarted["log"]


@pytest.mark.slow
def test_unregister_by_an_old_id_and_before_the_restart_both_keep_the_key_refused(restarted: dict) -> None:
    shops = restarted["shops"]
    assert restarted["unregistered"] == restarted["new_ids"][shops[1]]
    assert "still refused" in restarted["revoked_log"]  # the revoked running SuperNode gave up, saying why
    for name in shops[1:]:
        assert restarted[f"start-{name}"] and "Failed to activate SuperNode" in restarted[f"start-{name}"]


@pytest.mark.slow
def test_with_the_state_db_a_restart_keeps_node_ids_and_the_merchant_just_reconnects(tmp_path: Path) -> None:
    shops = write_tiny_shops(tmp_path)[:1]
    with loopback_federation(tmp_path, shops, state_db=True) as fed:
        home, merchant = fed.coordinator.home, fed.merchants[shops[0]]
        assert fed.coordinator.state == str(Path(home) / "superlink.db")
        before = registered_merchants(home)
        assert stop_coordinator(home)
        warnings: list[str] = []
        start_coordinator(home, tmp_path / "certs", port=fed.coordinator.port, state_db=True, warn=warnings.append)
        assert registered_merchants(home) == before and warnings == []  # nothing registered again
        _wait(lambda: {str(n["node-id"]): n["status"] for n in list_merchants(home)}.get(str(merchant.node_id))
              == "online", 60, "the merchant to be online under its old node ID")
        assert pid_alive(merchant.pid) and latest_node_id(merchant.log) == merchant.node_id
        assert "no longer accepts" not in merchant.log.read_text(errors="replace")


def _fake_flwr(nodes: list[dict], calls: list[tuple], fail: str | None = None):
    counter = iter(range(5000, 6000))

    def fake(info, *args, timeout=60.0):
        calls.append(args)
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": nodes}
        if args[:2] == ("supernode", "register"):
            if fail and Path(args[2]).read_text().strip() == fail:
                raise RuntimeError("`flwr supernode register` failed: boom")
            return {"success": True, "node-id": str(next(counter))}
        if args[:2] == ("supernode", "unregister"):
            return {"success": True}
        raise AssertionError(args)
    return fake


def _home_with(tmp_path: Path, names: list[str]) -> tuple[Path, dict]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "coordinator.json").write_text(json.dumps({
        "home": str(home), "host": "127.0.0.1", "port": 1, "address": "127.0.0.1:1", "ca_cert": "", "server_cert": "",
        "server_key": ""}))
    keys = write_merchant_keys(tmp_path / "certs", names)
    merchants = {str(100 + i): {"name": n, "shop-index": i, "key": str(keys.merchant_keys[n][1]),
                                "key-fingerprint": key_fingerprint(keys.merchant_keys[n][1]),
                                "public-key": keys.merchant_keys[n][1].read_text().strip()}
                 for i, n in enumerate(names)}
    (home / "merchants.json").write_text(json.dumps(merchants))
    return home, merchants


def test_restore_maps_each_forgotten_key_to_its_new_id_and_keeps_known_ones(tmp_path, monkeypatch) -> None:
    home, merchants = _home_with(tmp_path, ["a", "b", "c"])
    calls: list[tuple] = []
    # "b" is still known (SQLite state); "a" and "c" were forgotten (in-memory state after a restart)
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr([{"node-id": "101", "status": "offline"}], calls))
    remap = restore_registrations(home, warn=pytest.fail)
    assert set(remap) == {"100", "102"} and "101" not in remap
    after = registered_merchants(home)
    assert after["101"] == merchants["101"]
    for old, new in remap.items():
        assert after[new] == {**merchants[old], "previous-node-ids": [old]}
    assert [c[-2:] for c in calls if c[1] == "register"] and all("--name" in c for c in calls if c[1] == "register")


def test_restore_keeps_a_key_it_cannot_register_under_its_old_id_and_says_what_to_do(tmp_path, monkeypatch) -> None:
    home, merchants = _home_with(tmp_path, ["a", "b"])
    warnings: list[str] = []
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr([], [], fail=merchants["101"]["public-key"]))
    remap = restore_registrations(home, warn=warnings.append)
    assert list(remap) == ["100"]
    after = registered_merchants(home)
    assert after["101"] == merchants["101"] and remap["100"] in after
    assert len(warnings) == 1 and "node 101" in warnings[0] and "coordinator register" in warnings[0]


def test_restore_refuses_a_recorded_key_file_that_now_holds_another_key(tmp_path, monkeypatch) -> None:
    home, merchants = _home_with(tmp_path, ["a", "b"])
    entry = merchants["100"]
    del entry["public-key"]  # recorded before keys were kept: only the path
    Path(entry["key"]).write_text(Path(merchants["101"]["key"]).read_text())  # the file was replaced
    (home / "merchants.json").write_text(json.dumps(merchants))
    warnings: list[str] = []
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr([], []))
    remap = restore_registrations(home, warn=warnings.append)
    assert list(remap) == ["101"] and "100" in registered_merchants(home)
    assert "is not the key registered as" in warnings[0]


def test_unregister_maps_an_id_from_before_a_restart_to_the_current_one(tmp_path, monkeypatch) -> None:
    home, merchants = _home_with(tmp_path, ["a"])
    calls: list[tuple] = []
    monkeypatch.setattr(coordinator_mod, "_flwr", _fake_flwr([], calls))
    new = restore_registrations(home, warn=lambda _: None)["100"]
    calls.clear()
    assert unregister_merchant(home, 100) == int(new)
    assert calls == [("supernode", "unregister", new, coordinator_mod.CONNECTION)]
    assert registered_merchants(home) == {}


def test_the_launcher_notes_a_401_only_after_activation(monkeypatch) -> None:
    import httpx
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from simulations.deploy import supernode_launcher

    answers: list[int] = []

    def fake_unary(self, *, path: str, **kwargs):
        status = answers.pop(0)
        if status != 200:
            request = httpx.Request("POST", f"https://127.0.0.1{path}")
            raise httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, request=request))
        return "ok"

    monkeypatch.setattr(FleetHttpClient, "_unary_unary", fake_unary)  # restored after the test
    admission = supernode_launcher.install_rejoin_watch()
    client = object.__new__(FleetHttpClient)
    answers[:] = [401]
    with pytest.raises(httpx.HTTPStatusError):
        FleetHttpClient._unary_unary(client, path="/v1/fleet/activate-node")
    assert not admission.activated and not admission.refused  # an unregistered key at start: Flower's exit
    assert admission.activation_refused
    answers[:] = [200, 200, 503, 401]
    FleetHttpClient._unary_unary(client, path="/v1/fleet/activate-node")
    FleetHttpClient._unary_unary(client, path="/v1/fleet/pull-messages")
    with pytest.raises(httpx.HTTPStatusError):
        FleetHttpClient._unary_unary(client, path="/v1/fleet/pull-messages")
    assert admission.activated and not admission.refused  # a 503 is Flower's retry, not a refusal
    with pytest.raises(httpx.HTTPStatusError):
        FleetHttpClient._unary_unary(client, path="/v1/fleet/send-node-heartbeat")
    assert admission.refused


def test_rejoin_state_round_trips_through_the_environment() -> None:
    from simulations.deploy.supernode_launcher import _REJOIN_STATE_ENV, rejoin_state

    assert rejoin_state({}) is None and rejoin_state({_REJOIN_STATE_ENV: "garbage"}) is None
    assert rejoin_state({_REJOIN_STATE_ENV: "1700000000.500,3"}) == (1700000000.5, 3)
