"""fedshop starts (or joins) Ray itself, before Flower's simulation engine, with what the shops need.

Flower 1.42's `RayBackend.init_ray` calls `ray.init` only when Ray is not initialised yet, so a
`ray.init` made here first is the one in force (a supported path: Flower documents passing Ray's
init arguments and keeps an initialised Ray). fedshop does it to control two things Flower's call fixes:

* Local cluster (the default): no `runtime_env`. Flower passes `runtime_env={"env_vars": {PYTHONPATH}}`;
  workers with a job runtime env cannot be the idle workers the raylet prestarts (one per CPU, each
  having imported Ray already), so Ray starts fresh ones for the actors and the prestarted ones idle
  until killed. Without it the local raylet's children inherit the driver's environment (PYTHONPATH,
  `FEDSHOP_SHARED_WORLD`, `OMP_WAIT_POLICY`) as they did through Flower's call.
* A cluster (`--ray-address`): workers there were started by `ray start` and do not inherit the
  driver's environment, so the job's `runtime_env` carries the variables the shops read
  (`forwarded_env`): the shared world's descriptor, `OMP_WAIT_POLICY`, Flower's log level, fedshop's
  own `FEDSHOP_*` switches, PYTHONPATH. Only `env_vars`: nothing is uploaded or installed.

Usage statistics are off (`RAY_USAGE_STATS_ENABLED=0`, Ray's documented switch; unless set already):
no reporting thread, nothing sent. Flower's backend shuts Ray down when the simulation ends.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

FORWARDED = ("OMP_WAIT_POLICY", "FLWR_LOG_LEVEL", "FLWR_TELEMETRY_ENABLED", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
FORWARDED_PREFIX = "FEDSHOP_"
QUIET_LEVELS = ("WARNING", "ERROR", "CRITICAL")  # simulations.console sets ERROR unless -v


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a shop's worker needs on any node: `FEDSHOP_*`, the OpenMP/Flower ones, PYTHONPATH."""
    env = dict(os.environ if environ is None else environ)
    out = {k: v for k, v in env.items() if k.startswith(FORWARDED_PREFIX) or k in FORWARDED}
    path = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    out["PYTHONPATH"] = path  # as Flower's own init passes it: the driver's import path
    return out


def ray_init_args(init_args: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`ray.init` keyword arguments for `backend_config`'s ``init_args``: a job runtime env only to join a cluster."""
    args = dict(init_args)
    args.setdefault("include_dashboard", False)
    env = os.environ if environ is None else environ
    if env.get("FLWR_LOG_LEVEL", "").upper() in QUIET_LEVELS:  # quiet console (no -v): no "Started a local Ray"
        args.setdefault("logging_level", logging.WARNING)
    if args.get("address"):
        args["runtime_env"] = {"env_vars": forwarded_env(environ)}
    return args


def start_ray(init_args: dict[str, Any]) -> None:
    """Start (or join) Ray with `ray_init_args` unless it is running already; Flower then keeps this Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # heavy: only when a Ray run starts

    if ray.is_initialized():
        return
    args = ray_init_args(init_args)
    if not args.get("address"):
        os.environ["PYTHONPATH"] = forwarded_env()["PYTHONPATH"]  # the local raylet's workers inherit it
    logger.info("starting Ray: %s", {k: v for k, v in args.items() if k != "runtime_env"})
    ray.init(**args)
