"""The environment and ``$FLWR_HOME/config.toml`` every Flower process and `flwr` call of ours uses."""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from shared.atomic import atomic_write_text

CONNECTION = "fedshop"  # name of our SuperLink connection in $FLWR_HOME/config.toml
# Latency knobs, unless the caller's environment sets them (docs/deployment.md, "Latency"):
# how often each SuperExec (SuperNode: one per merchant; SuperLink: launches ServerApps) looks for new
# tasks; Flower's default is 1.0 s. The ServerApp's reply polling (FEDSHOP_GRID_POLL_INTERVAL) defaults
# to 0.1 s in server/polling_grid.py.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
POLL_DEFAULTS = {SUPEREXEC_POLL_ENV: "0.2"}
# The coordinator's SuperExec asks the SuperLink for a ServerApp task at this interval all run long, though a
# run has one such task: Flower's 1 s (up to 0.8 s more at run start) instead of 0.2 s saves ~16 of a round's
# ~155 SuperLink requests and most of an idle coordinator's CPU (docs/deployment.md, section 6).
COORDINATOR_TASK_POLL = "1.0"


def flwr_bin(name: str) -> str:
    """Path of a Flower executable, preferring the one beside the running Python (the project venv)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found beside {sys.executable} or on PATH. Fix: install flwr==1.42.0 "
                                "into this environment (pip install -e . in the repo)")
    return found


def flwr_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus a project-local FLWR_HOME, telemetry off, no runtime dependency installation, fast polls."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        # Without this, Flower would `uv sync` the app's dependencies and could pull a CUDA build of torch.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        # Flower spawns flower-superexec / flwr-clientapp / flwr-serverapp by name from PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    # Flower starts a fresh Python process per message, importing the app from the FAB's extracted copy.
    # With bytecode writing off, each one recompiles fedshop's modules (~0.6 CPU s); Python's default
    # lets the first process's __pycache__ serve the rest.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key, value in POLL_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(extra or {})
    return env


def coordinator_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`flwr_env` for the SuperLink (and so its SuperExec): the ServerApp-task poll at Flower's 1 s unless set."""
    own = {} if SUPEREXEC_POLL_ENV in os.environ else {SUPEREXEC_POLL_ENV: COORDINATOR_TASK_POLL}
    return flwr_env(flwr_home, {**own, **(extra or {})})


def write_connection(flwr_home: str | Path, address: str, root_certificates: str | Path | None, *,
                     name: str = CONNECTION, make_default: bool = True) -> Path:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml``, keeping other entries."""
    path = Path(flwr_home) / "config.toml"
    config: dict = {}
    if path.exists():
        try:
            config = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err}). Fix: delete the file; it is rewritten") from err
    superlink = config.setdefault("superlink", {})
    entry: dict = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    if make_default:
        superlink["default"] = name
    atomic_write_text(path, tomli_w.dumps(config))
    return path
