"""A real two-node Ray cluster on this machine: `fedshop`'s `--ray-address` path end to end.

Two `ray start` nodes (head and worker, one CPU each, their own temp dirs, token authentication on,
`--node-ip-address=127.0.0.1`), then a tiny federated round joined with ``ray_address``. The world
file is removed once the driver has loaded it into its Ray holder actor, so every shop must fetch the
world through Ray's object store, as a node without the driver's disk would. Afterwards every process
of the cluster is stopped by PID (never a global `ray stop`: other Ray instances may share the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY_CLI = Path(sys.executable).with_name("ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_pids(marker: str) -> set[int]:
    """PIDs whose command line names ``marker`` (the cluster's temp dir), and all their descendants."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        if marker in cmd:
            roots.add(int(entry))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return found - {os.getpid()}


def _stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Head and worker `ray start` nodes on 127.0.0.1; yields (address, temp dir); stops both by PID."""
    if not RAY_CLI.exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    root = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_WAIT_POLICY": "PASSIVE",
           "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, client, agent1, agent2 = _free_ports(4)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([str(RAY_CLI), "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                        f"--dashboard-agent-listen-port={agent1}", "--include-dashboard=false",
                        f"--temp-dir={root}/head", *common], env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([str(RAY_CLI), "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent2}",
                        f"--temp-dir={root}/w2", *common], env=env, check=True, capture_output=True, timeout=180)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        yield f"127.0.0.1:{gcs}", root
    finally:
        _stop(_cluster_pids(str(root)))
        shutil.rmtree(root, ignore_errors=True)


def _node_of(pid: int, root: Path) -> str:
    """Which node ("head" or "w2") ran worker ``pid``: Ray names each worker's log file after its PID."""
    nodes = {p.parts[len(root.parts)] for p in root.glob(f"*/session_*/logs/worker-*-{pid}.*")}
    assert len(nodes) == 1, f"worker {pid}: log files on nodes {nodes}"
    return nodes.pop()


# The driver runs in a fresh process: Ray reads its auth token once per process, and earlier tests of this
# pytest process have started local Ray instances with tokens of their own.
DRIVER = """
import sys
from pathlib import Path
from flower_harness import tiny_scenario
import simulations.federated as federated

served = []
federated_serve = federated.serve_over_ray


def serve_then_hide(descriptor):
    holder = federated_serve(descriptor)
    served.append(descriptor)
    Path(descriptor["path"]).unlink()  # as on a node without the driver's disk: only Ray has the bytes now
    return holder


federated.serve_over_ray = serve_then_hide
run_dir = federated.run_federated(tiny_scenario(), Path(sys.argv[1]), rounds=1, engine="ray", ray_address=sys.argv[2])
print("SERVED", len(served), "RUN_DIR", run_dir)
"""


def test_a_simulation_runs_its_shops_on_both_nodes_of_a_ray_cluster(two_node_cluster, tmp_path):
    address, root = two_node_cluster
    timing = tmp_path / "timing.jsonl"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FEDSHOP_TIMING_LOG": str(timing),  # reaches the cluster's workers via the job runtime env
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "run"), address], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    served = [line for line in done.stdout.splitlines() if line.startswith("SERVED ")]
    assert served and not served[-1].startswith("SERVED 0"), done.stdout[-2000:]
    run_dir = Path(served[-1].split(" RUN_DIR ", 1)[1])
    assert (run_dir / "metrics.csv").exists()
    events = [json.loads(line) for line in timing.read_text().splitlines()]
    shop_pids = {e["pid"] for e in events if e.get("where") == "clientapp"}
    assert {_node_of(pid, root) for pid in shop_pids} == {"head", "w2"}, "shops did not run on both nodes"
    world = [e for e in events if e.get("where") == "shared-world"]
    assert world and {e["source"] for e in world} == {"ray"}, f"world reads: {world}"
    assert {e["pid"] for e in world} >= shop_pids, "a shop built the world itself instead of reading it"
