"""In-process federated runs on Flower's simulation engine (Ray backend, token-authenticated).

`run_federated` is what `fedshop simulate`, the experiment runner and the tests call: it writes
the run directory's `config.toml`, `versions.json` and `scenario.toml` (the resolved scenario the
shops load), then runs the same ServerApp and ClientApp that `flwr run .` runs, one virtual
SuperNode per training shop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from shared.atomic import atomic_write_text
from shared.scenario import Scenario
from simulations.console import quiet_simulation_workers
from simulations.ray_auth import require_ray_token
from simulations.rundir import write_run_info

METHODS = {"fedshop": "encoder", "fedavg-all": "all-shareable"}  # method -> what shops send
SCENARIO_FILE = "scenario.toml"

logger = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The federation ended before its last round by design (e.g. the privacy budget); the message says why."""


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """Ray settings: no dashboard, one CPU per simulated shop.

    No `_node_ip_address`: Ray 2.55 replaces 127.0.0.1 by the machine's address anyway, so its ports
    are guarded by token authentication instead (`simulations.ray_auth`).
    """
    cpus = cpus or os.cpu_count() or 1
    return {"init_args": {"include_dashboard": False, "num_cpus": cpus},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def run_config(scenario: Scenario, run_dir: Path, *, method: str, rounds: int | None,
               resume: bool) -> dict[str, Any]:
    """The Flower run config of a scenario: its [federation] table in the ServerApp's keys."""
    if method not in METHODS:
        raise ValueError(f"method '{method}' is unknown. Fix: use one of {sorted(METHODS)}")
    fed = scenario.federation
    return {"scenario": str(run_dir / SCENARIO_FILE), "num-server-rounds": int(rounds or fed["rounds"]),
            "strategy": fed["strategy"], "fraction-train": float(fed["fraction_train"]),
            "min-shops": int(fed["min_shops"]), "local-epochs": int(fed["local_epochs"]),
            "personal-mix": float(fed["personal_mix"]),
            "compression": str(fed["compression"]),
            "proximal-mu": float(fed["prox_mu"]), "server-lr": float(fed["server_lr"]),
            "server-momentum": float(fed["server_momentum"]),
            "warmup-rounds": int(fed["warmup_rounds"]), "round-timeout": float(fed["round_timeout"]),
            "objective": str(fed["objective"]), "meta-inner-steps": int(fed["meta_inner_steps"]),
            "meta-outer-step": float(fed["meta_outer_step"]),
            "join-round": int(fed["join_round"]),
            "seed": scenario.seed, "run-dir": str(run_dir), "method": method, "share": METHODS[method],
            "resume": resume, **privacy_config(fed)}


def privacy_config(fed: dict[str, Any]) -> dict[str, Any]:
    """The run-config keys of the privacy options a scenario turns on (none when all are off)."""
    out: dict[str, Any] = {}
    if bool(fed["secure_aggregation"]):
        out.update({"secure-aggregation": True, "secagg-num-shares": float(fed["secagg_num_shares"]),
                    "secagg-clipping-range": float(fed["secagg_clipping_range"]),
                    "secagg-weighting": str(fed["secagg_weighting"]),
                    "secagg-max-weight": float(fed["secagg_max_weight"])})
    if float(fed["dp_noise_multiplier"]) > 0:
        out.update({"dp-noise-multiplier": float(fed["dp_noise_multiplier"]),
                    "dp-clipping-norm": float(fed["dp_clipping_norm"]), "dp-delta": float(fed["dp_delta"]),
                    "dp-max-epsilon": float(fed["max_epsilon"])})
    if float(fed["dpsgd_noise_multiplier"]) > 0:
        out.update({"dpsgd-noise-multiplier": float(fed["dpsgd_noise_multiplier"]),
                    "dpsgd-clipping-norm": float(fed["dpsgd_clipping_norm"]), "dpsgd-unit": str(fed["dpsgd_unit"]),
                    "dpsgd-sample-rate": float(fed["dpsgd_sample_rate"]), "dpsgd-steps": int(fed["dpsgd_steps"]),
                    "dpsgd-max-epsilon": float(fed["dpsgd_max_epsilon"])})
    return out


def run_federated(scenario: Scenario, run_dir: Path, *, method: str = "fedshop", rounds: int | None = None,
                  resume: bool = False, progress: Callable | None = None,
                  extra_config: dict[str, Any] | None = None) -> Path:
    """Run (or resume) a federation of the scenario's training shops; returns the run directory.

    ``progress(report, total_rounds)`` is called after every round with a `server.strategies.RoundReport`.
    ``extra_config`` adds run-config keys (e.g. test-only `fault-inject`). Raises `RunStopped` when
    the run ended early by design (central DP's budget); its checkpoints and metrics stay valid.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # CPU-only: opt in to Ray's future default (leave device env vars alone), which also silences
    # the FutureWarning Ray raises on every start.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    require_ray_token()  # Ray listens on every interface: only holders of this token get an answer
    from flwr.simulation import run_simulation  # heavy import (Ray): only when a run starts

    from client.client_app import app as client_app
    from server.server_app import make_server_app, stop_reason

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**run_config(scenario, run_dir, method=method, rounds=rounds, resume=resume), **(extra_config or {})}
    if not (resume and (run_dir / SCENARIO_FILE).exists()):
        atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
    write_run_info(run_dir, {"run": config, "scenario": scenario.raw})
    n_shops = len(scenario.federation_shops())
    if n_shops < int(config["min-shops"]):
        raise ValueError(f"scenario '{scenario.name}' has {n_shops} training shops but min-shops is "
                         f"{config['min-shops']}. Fix: lower federation.min_shops or add shops")
    with quiet_simulation_workers():
        run_simulation(server_app=make_server_app(config, progress), client_app=client_app,
                       num_supernodes=n_shops, backend_config=backend_config())
    reason = stop_reason(run_dir)
    if reason is not None:  # e.g. the privacy budget: the last checkpoint is the final model
        raise RunStopped(f"{reason}\nrun directory: {run_dir}")
    return run_dir
