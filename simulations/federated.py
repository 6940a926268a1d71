"""In-process federated runs: fedshop's pool engine, or Flower's simulation engine (Ray, token-authenticated).

`run_federated` is what `fedshop simulate`, the experiment runner and the tests call: it writes
the run directory's `config.toml`, `versions.json` and `scenario.toml` (the resolved scenario the
shops load), then runs the same ServerApp and ClientApp that `flwr run .` runs, one virtual
SuperNode per training shop. `resolve_engine` picks the engine of ``engine = "auto"`` (the default):
the pool, which opens no network listener, unless a Ray cluster is named; the recorded config.toml
holds the engine that ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from shared.atomic import atomic_write_text
from shared.scenario import Scenario, ScenarioError
from shared.settings import ENGINES, RunSettings, run_key
from shared.world_share import SHARED_ENV, serve_over_ray, shared_world_env, with_ray_holder
from simulations.console import quiet_simulation_workers
from simulations.ray_auth import require_ray_token
from simulations.ray_start import start_ray
from simulations.rundir import write_run_info

METHODS = {"fedshop": "encoder", "fedavg-all": "all-shareable"}  # method -> what shops send
SCENARIO_FILE = "scenario.toml"

logger = logging.getLogger(__name__)


def check_engine(engine: str) -> str:
    """``engine`` if known, else a clear error naming the choices."""
    if engine not in ENGINES:
        raise ScenarioError(f"engine '{engine}' is unknown. Fix: use one of {ENGINES} (federation.engine or --engine)")
    return engine


def ray_address_of(ray_address: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray cluster a run should join: ``ray_address`` (`--ray-address`), else `RAY_ADDRESS`, else None.

    `ray.init` itself reads `RAY_ADDRESS`, so a run with it set joins that cluster; "local" (Ray's word
    for "start one here") names no cluster.
    """
    env = os.environ if environ is None else environ
    address = ray_address or env.get("RAY_ADDRESS", "").strip()
    return address if address and address != "local" else None


def resolve_engine(engine: str, ray_address: str | None = None, environ: Mapping[str, str] | None = None,
                   *, can_fork: bool | None = None) -> str:
    """The engine a run uses: "ray" or "pool". ``auto`` is the pool unless Ray is needed.

    Ray is needed to join a Ray cluster (``ray_address`` or `RAY_ADDRESS`: the only multi-machine
    path) and where processes cannot be forked (the pool needs POSIX `fork`). Naming a cluster with
    an explicit ``engine = "pool"`` is refused: the pool runs on this machine only.
    """
    engine = check_engine(engine)
    address = ray_address_of(ray_address, environ)
    if can_fork is None:
        can_fork = "fork" in mp.get_all_start_methods()
    if engine == "auto":
        return "ray" if address or not can_fork else "pool"
    if engine == "pool" and ray_address:
        raise ScenarioError(f"--ray-address is for the ray engine, not '{engine}'. Fix: drop it, or use "
                            "--engine ray (or auto)")
    if engine == "pool" and not can_fork:
        raise ScenarioError("engine 'pool' needs POSIX fork, which this platform lacks. Fix: use --engine ray "
                            "(or auto)")
    return engine


class RunStopped(RuntimeError):
    """The federation ended before its last round by design (e.g. the privacy budget); the message says why."""


class RunFailed(RuntimeError):
    """The federation failed: no round (or too few in a row) had enough usable shops; the message says why."""


def backend_config(cpus: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Ray settings: no dashboard, one CPU per simulated shop; ``ray_address`` joins an existing cluster.

    No `_node_ip_address`: Ray 2.55 replaces 127.0.0.1 by the machine's address anyway, so its ports
    are guarded by token authentication instead (`simulations.ray_auth`). A cluster brings its own
    CPUs, so `num_cpus` is only set for the local one Ray starts itself.
    """
    if ray_address:
        return {"init_args": {"include_dashboard": False, "address": ray_address},
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    cpus = cpus or os.cpu_count() or 1
    return {"init_args": {"include_dashboard": False, "num_cpus": cpus},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def check_ray_address(ray_address: str, environ: dict[str, str] | None = None) -> None:
    """Refuse to join a Ray cluster with a token fedshop would make up (it could never authenticate)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "token") == "token" and not (env.get("RAY_AUTH_TOKEN")
                                                             or env.get("RAY_AUTH_TOKEN_PATH")):
        raise ScenarioError(f"--ray-address {ray_address}: the cluster's token is not set. Fix: export "
                         "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the token its `ray start` used, "
                         "as docs/federation.md (Engines and scale) shows")


def run_config(scenario: Scenario, run_dir: Path, *, method: str, rounds: int | None,
               resume: bool) -> dict[str, Any]:
    """The Flower run config of a scenario, derived from the schema: its [federation] table plus the run's keys."""
    if method not in METHODS:
        raise ScenarioError(f"method '{method}' is unknown. Fix: use one of {sorted(METHODS)}")
    settings = RunSettings(**scenario.federation, scenario=str(run_dir / SCENARIO_FILE), seed=scenario.seed,
                           run_dir=str(run_dir), method=method, share=METHODS[method], resume=resume)
    if rounds:
        settings.rounds = rounds  # validated on assignment: rounds >= 1
    return settings.to_run_config()


def run_federated(scenario: Scenario, run_dir: Path, *, method: str = "fedshop", rounds: int | None = None,
                  resume: bool = False, progress: Callable | None = None,
                  extra_config: dict[str, Any] | None = None, engine: str | None = None,
                  workers: int | None = None, ray_address: str | None = None, checked: bool = False) -> Path:
    """Run (or resume) a federation of the scenario's training shops; returns the run directory.

    ``progress(report, total_rounds)`` is called after every round with a `server.strategies.RoundReport`.
    ``extra_config`` adds run-config keys (e.g. test-only `fault-inject`). ``engine`` (default: the
    scenario's `federation.engine`) is "auto" (`resolve_engine`), "ray" (Flower's simulation engine;
    ``ray_address`` or `RAY_ADDRESS` joins a Ray cluster) or "pool" (`simulations.pool_engine`,
    ``workers`` processes); config.toml records the one that ran. Raises `RunStopped` when
    the run ended early by design (central DP's budget); its checkpoints and metrics stay valid,
    `RunFailed` when too many rounds, or all, lacked usable shops (the message says why), and a
    `ScenarioError` before anything is written when the federation cannot run (`Scenario.check_federation`).
    ``checked`` is True when the caller ran `scenario.check_federation` over these same rounds (the CLI, so
    the check and its fraction_train warning happen once); the check is skipped then.
    """
    engine = resolve_engine(str(engine or scenario.federation.get("engine", "auto")), ray_address)
    ray_address = ray_address_of(ray_address) if engine == "ray" else None
    if ray_address:
        check_ray_address(ray_address)  # before anything is written
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # CPU-only: opt in to Ray's future default (leave device env vars alone), which also silences
    # the FutureWarning Ray raises on every start.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not checked:  # min_shops, join_round, SecAgg+ against the shops: before anything is written
        scenario.check_federation(rounds)
    from client.client_app import app as client_app
    from server.server_app import failure_reason, make_server_app, stop_reason

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**run_config(scenario, run_dir, method=method, rounds=rounds, resume=resume), **(extra_config or {}),
              "engine": engine}  # the engine that runs, not "auto"
    if not (resume and (run_dir / SCENARIO_FILE).exists()):
        atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
    write_run_info(run_dir, {"run": config, "scenario": scenario.raw})
    n_shops = len(scenario.federation_shops())
    # The synthetic world is built once, here, and read by every shop's process (shared/world_share.py).
    shared_world = scenario.share_world(run_dir)
    try:
        with shared_world_env(shared_world), test_faults_env(config):
            _run_engine(engine, config, progress, n_shops, client_app, make_server_app,
                        workers=workers or int(scenario.federation.get("workers", 0)) or None,
                        ray_address=ray_address)
    except Exception:
        if failure_reason(run_dir) is None:
            raise
    failed = failure_reason(run_dir)  # Flower may swallow or wrap the ServerApp's exception: the file says
    if failed is not None:
        raise RunFailed(f"{failed}\nrun directory: {run_dir}")
    reason = stop_reason(run_dir)
    if reason is not None:  # e.g. the privacy budget: the last checkpoint is the final model
        raise RunStopped(f"{reason}\nrun directory: {run_dir}")
    return run_dir


@contextlib.contextmanager
def test_faults_env(config: dict[str, Any]) -> Iterator[None]:
    """Let this simulation's shops obey its test-only faults (`FEDSHOP_ALLOW_TEST_FAULTS=1`) while it runs.

    One person runs the coordinator and every simulated shop, so the run's `fault-inject`/`fault-sleep`
    are that person's agreement; a deployed merchant agrees with its own node config (client/merchant_policy.py).
    """
    from client.merchant_policy import ALLOW_TEST_FAULTS_ENV, TEST_FAULT_FIELDS

    defaults = RunSettings()
    wanted = any(run_key(n) in config and config[run_key(n)] != getattr(defaults, n) for n in TEST_FAULT_FIELDS)
    if not wanted or os.environ.get(ALLOW_TEST_FAULTS_ENV) == "1":
        yield
        return
    os.environ[ALLOW_TEST_FAULTS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(ALLOW_TEST_FAULTS_ENV, None)


def _run_engine(engine: str, config: dict[str, Any], progress: Callable | None, n_shops: int, client_app: Any,
                make_server_app: Callable, *, workers: int | None, ray_address: str | None) -> None:
    """Run the ServerApp and ClientApp on the pool engine or Flower's simulation engine (Ray)."""
    if engine == "pool":
        from simulations.pool_engine import run_pool

        run_pool(make_server_app(config, progress), client_app, config, n_shops, workers=workers)
        return
    require_ray_token()  # Ray listens on every interface: only holders of this token get an answer
    from flwr.simulation import run_simulation  # heavy import (Ray): only when a run starts

    backend = backend_config(ray_address=ray_address)
    world = os.environ.get(SHARED_ENV)
    # On a cluster the descriptor also names the Ray actor that serves the world's bytes to other nodes.
    cluster_world = with_ray_holder(json.loads(world)) if ray_address and world else None
    with quiet_simulation_workers(), shared_world_env(cluster_world):
        # fedshop's own ray.init (Flower keeps an initialised Ray): no job runtime env locally, the shops'
        # variables carried to a cluster's nodes (simulations/ray_start.py).
        start_ray(backend["init_args"])
        try:
            holder = serve_over_ray(cluster_world) if cluster_world else None  # noqa: F841 - alive for the run
            run_simulation(server_app=make_server_app(config, progress, expected_nodes=n_shops),
                           client_app=client_app, num_supernodes=n_shops, backend_config=backend)
        finally:
            _shutdown_ray()  # Flower's backend shuts Ray down when it ends; this covers a failure before that


def _shutdown_ray() -> None:
    """Stop this process's Ray connection if it is still up."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
