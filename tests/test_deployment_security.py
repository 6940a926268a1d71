"""Deployment security: who may drive the SuperLink, and which apps a merchant runs.

Fast tests check the pieces in-process: the Control guard on Flower's own SuperLink app, the FAB
signature in Flower's verification format, the merchant-side check and its log lines. The slow tests
start a real loopback federation (TLS SuperLink through the guard, two merchants) and play:
an outsider on another address (127.0.0.2: what a remote host looks like to the guard) with the CA file
and without it, runs that are unsigned, signed by an unknown key or signed for other bytes, and a
merchant presenting another merchant's key. Each refusal is checked where it is enforced and in what
the operator sees. Every process is stopped by PID in teardown.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from pathlib import Path

import httpx
import pytest

from simulations.deploy.app_signing import (
    SIGNATURE_KEY,
    build_fab,
    key_id,
    load_signing_key,
    read_trusted,
    sign_fab,
    verification_record,
    write_signing_key,
)
from simulations.deploy.superlink_launcher import REFUSAL, install_guard, is_local_peer
from simulations.deploy.supernode_launcher import signed_fab_getter

OUTSIDER = "127.0.0.2"  # a source address the guard does not count as this host


# ---------------------------------------------------------------- fast: the Control guard


def test_only_this_hosts_addresses_count_as_local() -> None:
    assert is_local_peer("127.0.0.1") and is_local_peer("::1") and is_local_peer("::ffff:127.0.0.1")
    assert not is_local_peer("127.0.0.2") and not is_local_peer("10.0.0.7") and not is_local_peer(None)
    assert not is_local_peer("testclient")  # not an address at all
    assert is_local_peer("10.0.0.5", allowed=("10.0.0.5",))  # coordinator bound to that one address


@pytest.fixture()
def guarded_superlink_app(monkeypatch: pytest.MonkeyPatch):
    """Flower's own SuperLink FastAPI app (in-memory state), built after `install_guard`."""
    from flwr.superlink import main

    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)  # restored after the test
    install_guard()
    return main.create_app()


def test_guard_refuses_control_and_runtime_to_remote_peers_but_serves_fleet(guarded_superlink_app) -> None:
    from fastapi.testclient import TestClient
    from flwr.proto.control_pb2 import ListNodesRequest

    remote = TestClient(guarded_superlink_app, client=("10.0.0.7", 50000))
    body = ListNodesRequest().SerializeToString()
    for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/control/register-node",
                 "/v1/control/unregister-node", "/v1/runtime/acquire-task", "/docs"):
        answer = remote.post(path, content=body, headers={"content-type": "application/protobuf"})
        assert answer.status_code == 403, (path, answer.status_code)
        assert answer.json()["detail"] == REFUSAL
    sneaky = remote.post("/v1/fleet/%2E%2E/control/list-nodes", content=body,
                         headers={"content-type": "application/protobuf"})
    assert sneaky.status_code in (403, 404), sneaky.status_code  # never Flower's list-nodes answer
    fleet = remote.post("/v1/fleet/activate-node", content=b"", headers={"content-type": "application/protobuf"})
    assert fleet.status_code != 403 and "fedshop" not in fleet.text  # Flower's own answer (node auth etc.)
    local = TestClient(guarded_superlink_app, client=("127.0.0.1", 50000))
    answer = local.post("/v1/control/list-nodes", content=body, headers={"content-type": "application/protobuf"})
    assert "fedshop" not in answer.text and answer.status_code != 403


# ---------------------------------------------------------------- fast: signing and the merchant's check


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The coordinator's key pair and a stranger's, as `fedshop certs` writes them."""
    own, stranger = tmp_path_factory.mktemp("own"), tmp_path_factory.mktemp("stranger")
    write_signing_key(own)
    write_signing_key(stranger)
    return {"key": load_signing_key(own / "app-signing.key"), "trusted": read_trusted(own / "trusted-entities.yaml"),
            "stranger": load_signing_key(stranger / "app-signing.key"), "dir": own}


class _Fab:
    def __init__(self, content: bytes) -> None:
        self.hash_str, self.content, self.verifications = hashlib.sha256(content).hexdigest(), content, {}


class _Run:
    def __init__(self, config: dict) -> None:
        self.override_config = config


def _checked(content: bytes, config: dict, trusted: dict, caplog: pytest.LogCaptureFixture) -> tuple[bool, str]:
    """(Flower's `_verify_fab` verdict, fedshop's log) for a FAB fetched through the merchant's getter."""
    from flwr.supernode.start_client_internal import _verify_fab

    caplog.clear()
    getter = signed_fab_getter(lambda h, r: _Fab(content), lambda r: _Run(config), trusted)
    with caplog.at_level(logging.INFO, logger="flwr"):
        fab = getter("h", 7)
    return _verify_fab(fab, trusted), caplog.text


def test_signed_fab_passes_flowers_own_verification(keys, caplog: pytest.LogCaptureFixture) -> None:
    fab = b"PK fab bytes"
    ok, text = _checked(fab, {SIGNATURE_KEY: sign_fab(fab, keys["key"])}, keys["trusted"], caplog)
    assert ok and f"signed by trusted key {key_id(keys['key'].public_key())}" in text


def test_unsigned_fab_is_refused_with_a_clear_log_line(keys, caplog: pytest.LogCaptureFixture) -> None:
    ok, text = _checked(b"PK fab bytes", {}, keys["trusted"], caplog)
    assert not ok and "refusing run 7: its app" in text and "is not signed" in text


def test_fab_signed_by_an_unknown_key_is_refused(keys, caplog: pytest.LogCaptureFixture) -> None:
    fab = b"PK fab bytes"
    ok, text = _checked(fab, {SIGNATURE_KEY: sign_fab(fab, keys["stranger"])}, keys["trusted"], caplog)
    assert not ok and f"signed by key {key_id(keys['stranger'].public_key())}, which is not in" in text


def test_fab_changed_after_signing_is_refused(keys, caplog: pytest.LogCaptureFixture) -> None:
    ok, text = _checked(b"PK other bytes", {SIGNATURE_KEY: sign_fab(b"PK fab bytes", keys["key"])},
                        keys["trusted"], caplog)
    assert not ok and "does not match this FAB" in text
    signer, signed_at, signature = sign_fab(b"PK fab bytes", keys["key"]).split(":")
    forged = f"{signer}:{signed_at}:{signature[:-4]}AAAA"  # a forged signature for the right bytes
    ok, _ = _checked(b"PK fab bytes", {SIGNATURE_KEY: forged}, keys["trusted"], caplog)
    assert not ok


def test_garbled_signature_record_is_refused(keys, caplog: pytest.LogCaptureFixture) -> None:
    ok, text = _checked(b"PK", {SIGNATURE_KEY: "not json"}, keys["trusted"], caplog)
    assert not ok and "unreadable signature record" in text
    with pytest.raises(ValueError, match=SIGNATURE_KEY):
        verification_record("x:notatime:sig")


def test_signature_covers_exactly_the_fab_flwr_run_builds(keys) -> None:
    from flwr.cli.build import build_fab_from_disk

    repo = Path(__file__).resolve().parents[1]
    assert build_fab(repo) == build_fab_from_disk(repo)  # what `flwr run REPO` sends (deterministic zip)


def test_merchant_without_a_trusted_entities_file_starts_nothing(tmp_path: Path, keys) -> None:
    from simulations.deploy.merchant import start_merchant, supernode_dir

    with pytest.raises(FileNotFoundError, match="trusted-entities"):
        start_merchant(tmp_path / "shop", tmp_path / "state", "127.0.0.1:9", ca=None, key=tmp_path / "k",
                       trusted_entities=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("{}\n")
    with pytest.raises(ValueError, match="no trusted keys"):
        start_merchant(tmp_path / "shop", tmp_path / "state", "127.0.0.1:9", ca=None, key=tmp_path / "k",
                       trusted_entities=bad)
    assert not supernode_dir(tmp_path / "state").exists()


def test_coordinator_without_an_app_signing_key_starts_nothing(tmp_path: Path) -> None:
    from simulations.deploy.certs import write_certs
    from simulations.deploy.coordinator import start_coordinator

    certs = write_certs(tmp_path / "certs", ["a"])
    certs.app_key.unlink()
    with pytest.raises(FileNotFoundError, match="app-signing key"):
        start_coordinator(tmp_path / "home", certs.out)
    assert not (tmp_path / "home" / "superlink.json").exists()


# ---------------------------------------------------------------- slow: a real federation on loopback


def _outsider_client(address: str, ca: str | None):
    """Flower's own Control API client (what `flwr run`/`flwr supernode ...` use), connecting from OUTSIDER."""
    from flwr.supercore.control.control_http_client import ControlHttpClient

    verify: str | bool = ca if ca is not None else False
    client = ControlHttpClient.from_server_address(address, False, ca, [])
    client._client = httpx.Client(verify=verify, timeout=30,
                                  transport=httpx.HTTPTransport(verify=verify, local_address=OUTSIDER))
    return client


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """Coordinator + two registered merchants over tiny shops; 'thief' has a copy of a shop but no key."""
    from simulations.deploy.loopback import loopback_federation, tiny_scenario, write_tiny_shops

    root = tmp_path_factory.mktemp("security")
    shops = write_tiny_shops(root, copies=("thief", "outsider"))[:2]
    (root / "tiny.toml").write_text(tiny_scenario(rounds=1, round_timeout=60.0))
    with loopback_federation(root, shops, extra_keys=("thief", "outsider"), scenario=root / "tiny.toml") as fed:
        yield fed


@pytest.fixture(scope="module")
def refused_runs(federation) -> dict:
    """Two runs the merchants must refuse, submitted side by side: unsigned and signed by an unknown key.

    A signature for other bytes is refused by the same Flower check (`test_fab_changed_after_signing_is_refused`);
    a third run here would cost another ServerApp start in CI for no new path.
    """
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, submit_run

    stranger_dir = federation.root / "stranger"
    write_signing_key(stranger_dir)
    cases = {"unsigned": {"sign": False}, "stranger": {"signing_key": stranger_dir / "app-signing.key"}}
    results: dict = {}

    def submit(name: str, options: dict) -> None:
        run_dir = federation.root / "runs" / name
        run_dir.mkdir(parents=True)
        scenario = str(federation.root / "tiny.toml")
        config = deployment_run_config(load_scenario(scenario), scenario, run_dir)
        config["max-short-rounds"] = 0  # a round every merchant refused ends the run at once, not after retries
        results[name] = submit_run(federation.coordinator.home, config, out=io.StringIO(), timeout=300, **options)

    threads = [threading.Thread(target=submit, args=(name, dict(opts))) for name, opts in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(400)
    return results


def _merchant_logs(federation) -> list[str]:
    return [merchant.log.read_text(errors="replace") for merchant in federation.merchants.values()]


@pytest.mark.slow
@pytest.mark.parametrize("with_ca", [True, False])
def test_outsider_cannot_list_register_or_unregister_nodes(federation, with_ca: bool) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest

    from simulations.deploy.coordinator import list_merchants

    before = list_merchants(federation.coordinator.home)
    victim = next(iter(federation.merchants.values()))
    client = _outsider_client(federation.coordinator.address, str(federation.certs.ca_cert) if with_ca else None)
    own_key = federation.certs.merchant_keys["outsider"][1].read_bytes()
    calls = {"list": lambda: client.ListNodes(ListNodesRequest()),
             "register": lambda: client.RegisterNode(RegisterNodeRequest(public_key=own_key, name="outsider")),
             "unregister": lambda: client.UnregisterNode(UnregisterNodeRequest(node_id=victim.node_id))}
    for name, call in calls.items():
        with pytest.raises(httpx.HTTPStatusError) as refused:
            call()
        assert refused.value.response.status_code == 403, name
        assert refused.value.response.json()["detail"] == REFUSAL
    spoofed = client._client.post(f"https://{federation.coordinator.address}/v1/control/list-nodes",
                                  headers={"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
                                  content=ListNodesRequest().SerializeToString())
    assert spoofed.status_code == 403  # the guard sees the TCP peer, not what a header claims
    after = list_merchants(federation.coordinator.home)  # the operator, on the coordinator host, still may
    assert sorted(n["node-id"] for n in after) == sorted(n["node-id"] for n in before)
    assert str(victim.node_id) in {n["node-id"] for n in after}


@pytest.mark.slow
def test_outsider_cannot_submit_a_run(federation) -> None:
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    from simulations.deploy.coordinator import _flwr, load_coordinator

    runs_before = _flwr(load_coordinator(federation.coordinator.home), "ls", "fedshop").get("runs", [])
    fab = build_fab(Path(__file__).resolve().parents[1])  # any app: the attacker's would differ
    request = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                              override_config=user_config_to_proto({}))
    client = _outsider_client(federation.coordinator.address, str(federation.certs.ca_cert))
    with pytest.raises(httpx.HTTPStatusError) as refused:
        client.StartRun(request)
    assert refused.value.response.status_code == 403
    runs_after = _flwr(load_coordinator(federation.coordinator.home), "ls", "fedshop").get("runs", [])
    assert len(runs_after) == len(runs_before)


@pytest.mark.slow
def test_merchants_refuse_an_unsigned_app(federation, refused_runs: dict) -> None:
    outcome = refused_runs["unsigned"]
    assert outcome.status == "finished:failed", outcome  # the operator sees the failure
    for log in _merchant_logs(federation):
        assert f"fedshop: refusing run {outcome.run_id}: its app" in log and "is not signed" in log
        assert "FAB verification failed" in log  # Flower's own check answered with an error reply


@pytest.mark.slow
def test_merchants_refuse_an_app_signed_by_an_unknown_key(federation, refused_runs: dict) -> None:
    outcome = refused_runs["stranger"]
    stranger = key_id(load_signing_key(federation.root / "stranger" / "app-signing.key").public_key())
    assert outcome.status == "finished:failed", outcome
    for log in _merchant_logs(federation):
        assert f"fedshop: refusing run {outcome.run_id}: its app is signed by key {stranger}" in log


@pytest.mark.slow
def test_refused_apps_never_ran_on_a_merchant(federation, refused_runs: dict) -> None:
    for outcome in refused_runs.values():
        for log in _merchant_logs(federation):
            assert f"fedshop: run {outcome.run_id}: app FAB" not in log  # never accepted
        for merchant in federation.merchants.values():  # no task reached the long-lived ClientApp either
            log = merchant.log.read_text(errors="replace")  # the SuperNode's and the ClientApp's
            assert "long-lived ClientApp ready" in log and f"fedshop: run {outcome.run_id}: FAB" not in log
    for merchant in federation.merchants.values():
        assert not (merchant.state_dir / "local_part.pt").exists()  # no ClientApp trained anything


@pytest.mark.slow
def test_a_signed_run_naming_a_scenario_file_the_merchants_did_not_pin_is_refused(federation) -> None:
    """The operator's own signed app, but a run config whose `scenario` is another file on the merchants' host:
    each merchant refuses before loading it (client/merchant_policy.py), the reply names the key and the fix."""
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, submit_run

    other = federation.root / "elsewhere" / "tiny.toml"  # same settings, a path no merchant pinned
    other.parent.mkdir()
    other.write_text((federation.root / "tiny.toml").read_text() + "# merchant-secret-4f1c\n")
    run_dir = federation.root / "runs" / "unpinned"
    run_dir.mkdir(parents=True)
    config = deployment_run_config(load_scenario(str(other)), str(other), run_dir)
    config["max-short-rounds"] = 0
    out = io.StringIO()
    outcome = submit_run(federation.coordinator.home, config, out=out, timeout=300)
    text = out.getvalue()
    assert outcome.status == "finished:failed", (outcome, text)
    assert f"shop refused the order: scenario='{other}' is not a built-in scenario" in text, text
    assert "allow-scenario-path" in text and "merchant-secret-4f1c" not in text
    assert str(federation.root / "tiny.toml") not in text  # the merchants' pinned path is not echoed
    for merchant in federation.merchants.values():
        assert not (merchant.state_dir / "local_part.pt").exists() and not (merchant.state_dir / "cache").exists()
        assert "shop refused the order: scenario=" in merchant.log.read_text(errors="replace")


@pytest.mark.slow
def test_a_second_merchant_presenting_an_online_merchants_key_is_refused(federation) -> None:
    from simulations.deploy.merchant import supernode_dir
    from simulations.deploy.processes import ProcessStartError, pid_alive

    victim = next(iter(federation.merchants))
    with pytest.raises(ProcessStartError, match="Failed to activate SuperNode"):
        federation.start("thief", key=victim, shop_index=1)
    assert not (supernode_dir(federation.state_dir("thief")) / "supernode.json").exists()
    assert pid_alive(federation.merchants[victim].pid)  # the real merchant stays connected


# ---------------------------------------------------------------- shop identity bound to the node key


def _reply(node: int, shop_index: int | None, error: bool = False):
    from flwr.app import Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    if error:
        return Message(Error(code=2, reason="x"), reply_to=sent)
    metrics = {"num-examples": 3.0} if shop_index is None else {"num-examples": 3.0, "shop-index": shop_index}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)


class _ReplyGrid:
    def __init__(self, replies: list) -> None:
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


def test_reply_claiming_another_shop_than_its_key_is_bound_to_is_dropped_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from server.node_identity import BINDINGS_FILE, IdentityCheckedGrid, check_identities

    (tmp_path / BINDINGS_FILE).write_text(json.dumps({"11": 0, "12": 1}))
    honest, thief, unbound, failed = _reply(12, 1), _reply(11, 2), _reply(13, 5), _reply(11, None, error=True)
    grid = check_identities(_ReplyGrid([honest, thief, unbound, failed]), tmp_path)
    assert isinstance(grid, IdentityCheckedGrid)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        kept = list(grid.send_and_receive([]))
    assert kept == [honest, unbound, failed]
    assert grid.dropped == [(11, 0, 2)]
    assert "SuperNode 11 is registered as shop-index 0 but replied as shop-index 2" in caplog.text


def test_without_bindings_the_grid_is_unchanged(tmp_path: Path) -> None:
    from server.node_identity import BINDINGS_FILE, check_identities

    inner = _ReplyGrid([])
    assert check_identities(inner, tmp_path) is inner and check_identities(inner, "") is inner
    (tmp_path / BINDINGS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=BINDINGS_FILE):
        check_identities(inner, tmp_path)


def test_register_refuses_a_shop_index_bound_to_another_key(tmp_path: Path) -> None:
    from simulations.deploy.certs import write_merchant_keys
    from simulations.deploy.coordinator import register_merchant

    (tmp_path / "merchants.json").write_text(json.dumps({"11": {"name": "a", "shop-index": 0}}))
    keys = write_merchant_keys(tmp_path / "certs", ["b"])
    with pytest.raises(ValueError, match="already bound to SuperNode 11; nothing registered"):
        register_merchant(tmp_path, keys.merchant_keys["b"][1], name="b", shop_index=0)


@pytest.fixture(scope="module")
def impersonation(federation) -> dict:
    """The first merchant stops; 'thief' starts with its key but its own shop-index, and a signed run follows."""
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, submit_run
    from simulations.deploy.merchant import stop_merchant

    victim = next(iter(federation.merchants))
    node_id = federation.merchants[victim].node_id
    stop_merchant(federation.state_dir(victim))
    thief = federation.start("thief", key=victim, retry_for=40)  # shop-index 2, its own
    run_dir = federation.root / "runs" / "impersonation"
    run_dir.mkdir(parents=True)
    scenario = str(federation.root / "tiny.toml")
    out = io.StringIO()
    outcome = submit_run(federation.coordinator.home,
                         deployment_run_config(load_scenario(scenario), scenario, run_dir), out=out, timeout=300)
    return {"victim": node_id, "thief": thief, "outcome": outcome, "output": out.getvalue(), "run_dir": run_dir}


@pytest.mark.slow
def test_a_merchant_using_an_offline_merchants_key_is_dropped_and_reported(impersonation: dict) -> None:
    assert impersonation["thief"].node_id == impersonation["victim"]  # the key is the SuperLink's identity
    assert (f"fedshop: reply dropped: SuperNode {impersonation['victim']} is registered as shop-index 0 but "
            "replied as shop-index 2") in impersonation["output"]
    metrics = impersonation["run_dir"] / "metrics.csv"
    if metrics.exists():  # the round may fail for lack of shops (min-shops 2); either way no thief rows
        assert "shop-2" not in metrics.read_text()
