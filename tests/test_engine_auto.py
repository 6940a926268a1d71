"""`engine = "auto"`: the pool unless Ray is needed, shops balanced over the pool's workers, no listener."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flower_harness import tiny_scenario, write_scenario
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from shared.scenario import ScenarioError
from shared.settings import ENGINES, FederationTable
from simulations.cli import app as cli
from simulations.deploy.processes import descendants
from simulations.federated import ray_address_of, resolve_engine
from simulations.pool_grid import PoolGrid, balanced_groups

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ resolve_engine
def test_auto_is_the_default_engine() -> None:
    assert FederationTable().engine == "auto" and ENGINES == ("auto", "ray", "pool")


@pytest.mark.parametrize(("engine", "address", "environ", "fork", "expected"), [
    ("auto", None, {}, True, "pool"),
    ("auto", "10.0.0.5:6379", {}, True, "ray"),  # --ray-address: the only multi-machine path
    ("auto", None, {"RAY_ADDRESS": "10.0.0.5:6379"}, True, "ray"),  # ray.init would join it anyway
    ("auto", None, {"RAY_ADDRESS": "local"}, True, "pool"),  # Ray's "start one here" names no cluster
    ("auto", None, {"RAY_ADDRESS": "  "}, True, "pool"),
    ("auto", None, {}, False, "ray"),  # no fork (Windows): the pool cannot run
    ("ray", None, {}, True, "ray"),
    ("pool", None, {}, True, "pool"),
    ("pool", None, {"RAY_ADDRESS": "10.0.0.5:6379"}, True, "pool"),  # an explicit choice wins over the env
])
def test_resolve_engine(engine: str, address: str | None, environ: dict, fork: bool, expected: str) -> None:
    assert resolve_engine(engine, address, environ, can_fork=fork) == expected


@pytest.mark.parametrize(("engine", "address", "fork", "says"), [
    ("pool", "10.0.0.5:6379", True, "--ray-address is for the ray engine"),
    ("pool", None, False, "needs POSIX fork"),
    ("spark", None, True, "engine 'spark' is unknown"),
])
def test_resolve_engine_refuses_what_cannot_run(engine: str, address: str | None, fork: bool, says: str) -> None:
    with pytest.raises(ScenarioError, match=says) as err:
        resolve_engine(engine, address, {}, can_fork=fork)
    assert "Fix:" in str(err.value)


def test_auto_with_a_ray_address_joins_ray_and_first_asks_for_its_token(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    result = CliRunner().invoke(cli, ["simulate", "default", "--ray-address", "127.0.0.1:1",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "the cluster's token is not set" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_ray_address_flag_wins_over_the_environment() -> None:
    assert ray_address_of("a:1", {"RAY_ADDRESS": "b:2"}) == "a:1"
    assert ray_address_of(None, {"RAY_ADDRESS": "b:2"}) == "b:2"
    assert ray_address_of(None, {}) is None


# ------------------------------------------------------------------ balanced_groups and the round deadline
def _max_load(groups: list[list[int]], loads: dict[int, float]) -> float:
    return max(sum(loads[n] for n in g) for g in groups)


def test_balanced_groups_give_the_next_largest_shop_to_the_least_loaded_worker() -> None:
    loads = {1: 10, 2: 6, 3: 5, 4: 4, 5: 3, 6: 2}
    groups = balanced_groups(loads, 2)
    assert groups == [[1, 4, 6], [2, 3, 5]]  # 10+4+2 = 16, 6+5+3 = 14
    round_robin = [[1, 3, 5], [2, 4, 6]]  # node i -> worker i mod 2, as before: 18 vs 12
    assert _max_load(groups, loads) == 16 < _max_load(round_robin, loads) == 18


def test_balanced_groups_hold_every_node_once_and_are_near_optimal() -> None:
    rng = np.random.default_rng(0)
    loads = {100 + i: float(v) for i, v in enumerate(np.round(1000 * rng.pareto(1.2, 200) + 100))}
    for workers in (1, 2, 3, 7):
        groups = balanced_groups(loads, workers)
        assert sorted(n for g in groups for n in g) == sorted(loads)
        bound = max(sum(loads.values()) / workers, max(loads.values()))  # no split beats this
        assert _max_load(groups, loads) <= 4 / 3 * bound
    assert balanced_groups({1: 1.0}, 3) == [[1], [], []]
    with pytest.raises(ValueError, match="workers >= 1"):
        balanced_groups(loads, 0)


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"m": MetricRecord({"node": float(msg.metadata.dst_node_id)})}), reply_to=msg)

    return app


def test_the_round_deadline_follows_the_busiest_worker_not_the_shop_count() -> None:
    """One large shop alone on a worker, five small ones on the other: the round may take 5 shop budgets."""
    loads = {1: 100.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    with PoolGrid(_echo_app(), {n: {} for n in loads}, workers=2, evict_state=False, loads=loads) as grid:
        assert [sorted(w.nodes) for w in grid._pool] == [[1], [2, 3, 4, 5, 6]]
        content = RecordDict({"config": ConfigRecord({"x": 1})})
        ids = list(grid.push_messages([Message(content, n, MessageType.TRAIN, group_id="1") for n in loads]))
        assert grid.round_deadline(ids, 10.0) == 50.0  # ceil(6 shops / 2 workers) x 10 = 30 would cut it short
        assert grid.round_deadline(ids[:1], 10.0) == 10.0


# ------------------------------------------------------------------ a local auto run: the pool, no listener
LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp*


def listening_sockets(pids: list[int]) -> list[str]:
    """TCP listeners and bound UDP sockets held by ``pids``, as '<proto> <local address>' (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[9] in inodes and (proto.startswith("udp") or cols[3] == LISTEN):
                found.append(f"{proto} {cols[1]}")
    return found


def test_the_listener_probe_sees_a_listening_socket() -> None:
    """Positive control for the probe (the Ray one below is slow)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert any(s.startswith("tcp ") and s.endswith(f":{port:04X}") for s in listening_sockets([os.getpid()]))
    assert not any(s.endswith(f":{port:04X}") for s in listening_sockets([os.getpid()]))


def _run_watched(args: list[str], tmp_path: Path, env_extra: dict[str, str]) -> tuple[set[str], Path]:
    """Run `fedshop simulate` on the tiny scenario; sample its process tree's listeners until it ends."""
    toml = write_scenario(tiny_scenario(), tmp_path / "tiny.toml")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0", **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", str(toml), "--rounds", "1",
                             "--run-dir", str(run_dir), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO)
    seen: set[str] = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(listening_sockets([proc.pid, *descendants(proc.pid)]))
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return seen, run_dir


def test_a_local_auto_run_uses_the_pool_and_opens_no_listening_socket(tmp_path: Path) -> None:
    seen, run_dir = _run_watched([], tmp_path, {"RAY_ADDRESS": ""})
    assert seen == set()
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["run"]["engine"] == "pool"  # the engine that ran, not the scenario's "auto"


@pytest.mark.slow
def test_the_listener_probe_sees_rays_ports(tmp_path: Path) -> None:
    """Positive control: the same probe on a Ray run finds Ray's listeners (docs/federation.md)."""
    seen, run_dir = _run_watched(["--engine", "ray"], tmp_path, {})
    assert any(s.startswith("tcp") for s in seen), seen
    assert tomllib.loads((run_dir / "config.toml").read_text())["run"]["engine"] == "ray"
