"""Deployment on loopback: a TLS SuperLink with SuperNode auth and one SuperNode per merchant.

Uses the throwaway app in tests/fixtures/tinyapp (numpy only, so a message costs Flower's own
overhead, not torch's). Every process is started in its own session and stopped by PID in teardown.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from simulations.commands import deploy
from simulations.deploy.certs import write_certs
from simulations.deploy.coordinator import RunOutcome, register_merchant, submit_run
from simulations.deploy.loopback import LoopbackFederation, loopback_federation
from simulations.deploy.merchant import supernode_dir
from simulations.deploy.processes import ProcessStartError, pid_alive, read_record, stop_pid

TINYAPP = Path(__file__).parent / "fixtures" / "tinyapp"
SHOPS = ["shop-a", "shop-b", "shop-c"]
INTERACTIONS = ("user_id,item_id,timestamp,event\n" + "".join(
    f"u{i % 3},i{i % 4},{1_700_000_000 + 60 * i},{('impression', 'click', 'purchase')[i % 3]}\n" for i in range(12)))


def rounds_trained(fed: LoopbackFederation, name: str) -> int:
    return int(json.loads((fed.state_dir(name) / "tiny_state.json").read_text())["rounds_trained"])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """Coordinator + three registered merchants, all on 127.0.0.1; everything stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("deploy")
    for name in SHOPS + ["intruder", "no-ca"]:
        (root / name / "shop").mkdir(parents=True)
        (root / name / "shop" / "interactions.csv").write_text(INTERACTIONS)
    with loopback_federation(root, SHOPS, extra_keys=("intruder", "no-ca")) as fed:
        yield fed


def _run(fed: LoopbackFederation, name: str, **config: object) -> tuple[RunOutcome, pd.DataFrame]:
    run_dir = fed.root / "runs" / name
    run_dir.mkdir(parents=True)
    with (run_dir / "flwr-run.log").open("w") as log:
        outcome = submit_run(fed.coordinator.home, {"min-nodes": 3, "run-dir": str(run_dir), **config},
                             app=TINYAPP, out=log, timeout=150)
    metrics = pd.read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else pd.DataFrame()
    return outcome, metrics


@pytest.mark.slow
def test_unregistered_merchant_is_refused(federation: LoopbackFederation) -> None:
    with pytest.raises(ProcessStartError, match="Failed to activate SuperNode"):
        federation.start("intruder")
    record = supernode_dir(federation.state_dir("intruder")) / "supernode.json"
    assert not record.exists()


@pytest.mark.slow
def test_merchant_without_the_ca_cannot_connect(federation: LoopbackFederation) -> None:
    register_merchant(federation.coordinator.home, federation.certs.merchant_keys["no-ca"][1])
    with pytest.raises(ProcessStartError, match="CERTIFICATE_VERIFY_FAILED"):
        federation.start("no-ca", ca=False)  # registered key, but only the system trust store


@pytest.mark.slow
def test_two_rounds_survive_a_merchant_crash_with_state_intact(federation: LoopbackFederation) -> None:
    """Three merchants over TLS + auth, two rounds; shop-a is SIGKILLed after round 1 and restarted."""
    (federation.state_dir("shop-c") / "tiny_state.json").write_text("{not json")  # corrupt: must start fresh
    (federation.state_dir("shop-b") / "tiny_state.json").write_text('{"rounds_trained": 5}')  # a previous run
    result: dict[str, object] = {}

    def run() -> None:
        result["outcome"], result["metrics"] = _run(federation, "crash", **{"num-server-rounds": 3,
                                                                            "pause-seconds": 6.0})

    worker = threading.Thread(target=run)
    worker.start()
    metrics_file = federation.root / "runs" / "crash" / "metrics.csv"
    deadline = time.monotonic() + 100
    while not metrics_file.exists() and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.2)
    assert metrics_file.exists(), "round 1 never finished"
    victim = federation.merchants["shop-a"]
    stop_pid(victim.pid, sig=signal.SIGKILL, timeout=5)  # a crash, not a clean stop
    assert not pid_alive(victim.pid)
    assert rounds_trained(federation, "shop-a") == 1
    restarted = federation.start("shop-a", retry_for=90)  # the SuperLink releases a crashed node within 60 s
    worker.join(120)
    assert not worker.is_alive()
    outcome, metrics = result["outcome"], result["metrics"]
    assert outcome.ok, outcome
    ids = {name: m.node_id for name, m in federation.merchants.items()}
    assert restarted.node_id == victim.node_id  # same key, same SuperNode
    assert set(metrics["shop"]) == set(ids.values()) and len(set(ids.values())) == 3
    assert sorted(metrics["round"].unique()) == [1, 2, 3]
    trained = metrics[metrics["metric"] == "rounds-trained"].pivot(index="shop", columns="round", values="value")
    assert trained.loc[ids["shop-b"]].tolist() == [6, 7, 8]  # state from an earlier run was picked up
    assert trained.loc[ids["shop-c"]].tolist() == [1, 2, 3]  # corrupt state replaced by a fresh one
    # The crashed node may miss round 2 (its message dies with it); after the restart it continues from
    # its saved counter instead of starting again at 1.
    shop_a = trained.loc[ids["shop-a"]].dropna()
    assert shop_a[1] == 1 and 3 in shop_a.index and shop_a[3] >= 2
    assert shop_a.is_monotonic_increasing
    assert rounds_trained(federation, "shop-a") == shop_a[3]
    assert read_record(supernode_dir(federation.state_dir("shop-a")) / "supernode.json").pid == restarted.pid


@pytest.mark.slow
def test_cli_run_exits_non_zero_when_the_run_fails(federation: LoopbackFederation, tmp_path: Path) -> None:
    app = typer.Typer()
    deploy.register(app)
    result = CliRunner().invoke(app, ["coordinator", "run", "tiny", "--home", federation.coordinator.home,
                                      "--app", str(TINYAPP), "--runs-dir", str(tmp_path), "-c", "fail-server=1"])
    assert result.exit_code == 1, result.output
    assert "finished:failed" in result.output


def test_merchant_with_bad_shop_data_starts_nothing(tmp_path: Path) -> None:
    shop, state = tmp_path / "shop", tmp_path / "state"
    shop.mkdir()
    (shop / "interactions.csv").write_text("user_id,item_id,timestamp,event\nu1,i1,1700000000,teleport\n")
    certs = write_certs(tmp_path / "certs", ["m"])
    app = typer.Typer()
    deploy.register(app)
    result = CliRunner().invoke(app, ["merchant", "start", "--shop-dir", str(shop), "--state-dir", str(state),
                                      "--superlink", "127.0.0.1:9", "--ca", str(certs.ca_cert),
                                      "--key", str(certs.merchant_keys["m"][0])])
    assert result.exit_code == 2, result.output
    assert "interactions.csv" in result.output and "nothing started" in result.output
    assert not (supernode_dir(state) / "supernode.json").exists()
