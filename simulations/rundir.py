"""Run directories: every run records its resolved config, package versions and git commit."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w

from shared.atomic import atomic_write_csv, atomic_write_text

METRIC_COLUMNS = ["method", "round", "shop", "task", "split", "metric", "value"]
_PACKAGES = ("fedshop", "flwr", "torch", "numpy", "pandas", "scikit-learn", "ray", "opacus", "pyarrow")


def git_commit(repo: Path | None = None) -> str:
    """The current git commit of the source tree, or 'unknown' outside a checkout."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_safe(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value


def new_run_dir(base: str | Path, name: str) -> Path:
    """A fresh folder ``base/<name>-<timestamp>`` (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        path = Path(base) / f"{name}-{stamp}-{n}"
        n += 1
    path.mkdir(parents=True)
    return path


def write_run_info(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Write ``config.toml`` (resolved config) and ``versions.json`` (packages + git commit)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "config.toml", tomli_w.dumps(_toml_safe(config)))
    info = {"git_commit": git_commit(), "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "versions.json", json.dumps(info, indent=2))


def write_metrics(run_dir: str | Path, rows: list[dict[str, Any]], name: str = "metrics.csv") -> Path:
    """Write metric rows (columns METRIC_COLUMNS) atomically; the whole file is rewritten each call."""
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    return atomic_write_csv(Path(run_dir) / name, frame)
