"""Pooling compare runs: the seeds of several `fedshop compare` runs of one scenario in one report.

Many seeds take hours on a small machine, so they are often run in chunks (seeds 0-2 today, 3-7
tomorrow) or one method at a time. Pooling reads each run's recorded scenario and metric rows and
refuses runs of different scenarios, overlapping (method, seed) pairs and seeds that lack a method.
It writes the report one `fedshop compare` over all those seeds would write: metrics.csv,
comparison.csv, summary.json, summary.md and plots, with the targets and standard errors.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from shared.atomic import atomic_write_csv
from shared.scenario import scenario_from_dict
from simulations.compare import Comparison, report_comparison
from simulations.run_report import read_metrics, recorded_seed
from simulations.rundir import METRIC_COLUMNS, write_run_info


class PoolError(ValueError):
    """Runs that cannot be pooled: names the run directory, what is wrong and the fix."""


def read_compare_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A compare run's recorded config (``config.toml``) and its metric rows, each with its seed."""
    config_path = Path(run_dir) / "config.toml"
    if not config_path.exists():
        raise PoolError(f"{config_path} does not exist. Fix: pass directories written by `fedshop compare`")
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    if config.get("command") != "compare" or "scenario" not in config:
        raise PoolError(f"{config_path}: command = {config.get('command')!r}, not a compare run with a [scenario] "
                        "table. Fix: pass directories written by `fedshop compare`")
    try:  # a one-seed run writes no seed column: its seed is the recorded one
        rows = read_metrics(Path(run_dir), seed=recorded_seed(config))
    except (FileNotFoundError, ValueError) as exc:
        raise PoolError(str(exc)) from exc
    return config, rows


def _without_seed(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "seed"}


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """The dotted key where two scenario tables first differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return where or "(root)"


@dataclass
class Pool:
    """Validated runs to pool: their directories, the scenario (as recorded), metric rows, seeds, methods."""

    run_dirs: list[Path]
    scenario: dict[str, Any]
    rows: pd.DataFrame  # METRIC_COLUMNS + seed
    seeds: list[int]
    methods: list[str]

    @property
    def name(self) -> str:
        """The scenario's name (for the run directory)."""
        return str(self.scenario.get("name", "scenario"))


def load_pool(run_dirs: Sequence[Path]) -> Pool:
    """Read and check compare runs: one scenario up to the seed, no (method, seed) twice, every method per seed."""
    if len(run_dirs) < 2:
        raise PoolError(f"got {len(run_dirs)} run director{'y' if len(run_dirs) == 1 else 'ies'}. "
                        "Fix: pass two or more compare runs of the same scenario")
    runs = [(Path(d), *read_compare_run(Path(d))) for d in run_dirs]
    base_dir, base_config, _ = runs[0]
    base = _without_seed(base_config["scenario"])
    owner: dict[tuple[str, int], Path] = {}
    for run_dir, config, rows in runs:
        scenario = _without_seed(config["scenario"])
        if scenario != base:
            key = _first_difference(base, scenario)
            raise PoolError(f"{run_dir} ran another scenario than {base_dir}: they differ at '{key}'. "
                            "Fix: pool only runs of one scenario with the same settings (seeds may differ)")
        for method, seed in rows[["method", "seed"]].drop_duplicates().itertuples(index=False):
            pair = (str(method), int(seed))
            if pair in owner:
                raise PoolError(f"{run_dir} and {owner[pair]} both hold {method} at seed {seed}. "
                                "Fix: leave one of them out")
            owner[pair] = run_dir
    rows = pd.concat([r for _, _, r in runs], ignore_index=True)[[*METRIC_COLUMNS, "seed"]]
    seeds = sorted(int(s) for s in rows["seed"].unique())
    methods = list(dict.fromkeys(str(m) for m in rows["method"]))
    for seed in seeds:  # a method missing at some seeds would be averaged over other seeds than the rest
        absent = [m for m in methods if (m, seed) not in owner]
        if absent:
            raise PoolError(f"seed {seed} has no {', '.join(absent)} in any of the runs (methods elsewhere: "
                            f"{', '.join(methods)}). Fix: run `fedshop compare --seeds {seed} --methods "
                            f"{','.join(absent)}` and pool that too, or leave seed {seed}'s runs out")
    return Pool([d for d, _, _ in runs], dict(base_config["scenario"]), rows, seeds, methods)


def write_pool(pool: Pool, out: Path) -> Comparison:
    """Write the pooled report into ``out``: config.toml (with the source runs), metrics.csv and the compare report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, {"command": "compare", "pooled_from": [str(d) for d in pool.run_dirs],
                         "methods": pool.methods, "seeds": pool.seeds,
                         "scenario": {**pool.scenario, "seed": pool.seeds[0]}})
    atomic_write_csv(out / "metrics.csv", pool.rows)
    scenarios = [scenario_from_dict(pool.scenario, {"seed": seed}) for seed in pool.seeds]
    return report_comparison(out, pool.rows, scenarios)
