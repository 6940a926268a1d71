"""A run directory's human-readable report: `summary.md` and its plots, from `metrics.csv`.

Works for any run directory with metric rows: a `fedshop simulate` run (one method) or a
`fedshop compare` run (several methods, maybe several seeds). `write_run_report` is the entry point.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from shared.atomic import atomic_write_text
from simulations.plots import METHOD_ORDER, plot_final_bars, plot_rounds
from simulations.report import PRIMARY, final_table
from simulations.rundir import METRIC_COLUMNS


def recorded_seed(config: dict[str, Any]) -> int:
    """The (first) seed a run's ``config.toml`` records: compare's ``seeds``, else the scenario's; 0 if neither."""
    seeds = config.get("seeds") or [config.get("scenario", {}).get("seed", 0)]
    return int(seeds[0])


def read_metrics(run_dir: Path, seed: int = 0) -> pd.DataFrame:
    """The run's metric rows (``metrics.csv``; a ``seed`` column is added as ``seed`` when absent)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Fix: point at a run directory that holds metrics.csv "
                                "(written by fedshop simulate, compare, train-local or train-central)")
    frame = pd.read_csv(path)
    missing = sorted(set(METRIC_COLUMNS) - set(frame.columns))
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}. Fix: metrics.csv needs columns {METRIC_COLUMNS}")
    return frame if "seed" in frame else frame.assign(seed=seed)


def seeded_final_table(rows: pd.DataFrame) -> pd.DataFrame:
    """`report.final_table` for each seed, with a seed column."""
    if "seed" not in rows:
        rows = rows.assign(seed=0)
    parts = [final_table(grp).assign(seed=seed) for seed, grp in rows.groupby("seed", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["seed"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Hand-written: pandas' ``to_markdown`` needs the `tabulate` package, not worth a dependency here.
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _methods(columns: Sequence[str]) -> list[str]:
    return [m for m in METHOD_ORDER if m in columns] + sorted(m for m in columns if m not in METHOD_ORDER)


def _headline(summary: dict[str, Any]) -> list[str]:
    """Markdown lines of the per-task comparison and the targets."""
    method = summary.get("method", "fedshop")
    tasks = summary.get("tasks", {})
    if not tasks:
        return []
    methods = _methods(sorted({m for t in tasks.values() for m in t["mean"]}))
    small = ", ".join(summary.get("small_shops", [])) or "none flagged"
    header = ["task", "metric", *methods, "gap closed", f"shops where {method} < local", "small-shop gain"]
    rows = []
    for task, t in tasks.items():
        gap = _fmt(t["gap_closed"], 3) if t["gap_closed"] is not None else f"n/a ({t['gap_status']})"
        worse = ", ".join(f"{w['shop']} ({w['margin']:+.4f}"
                          + (f" ± {w['margin_se']:.3f}" if w.get("margin_se") else "")
                          + (f"; ± {w['margin_se_seeds']:.3f} over {w['n_seeds']} seeds" if w.get("margin_se_seeds")
                             else "") + ")"
                          for w in t.get("worse_shops", [])) or "none"
        gain = (t.get("small_shop_gain") or {}).get(method)
        rows.append([task, t["metric"], *[_fmt(t["mean"].get(m)) for m in methods], gap, worse, _fmt(gain)])
    lines = ["## Headline (test, mean over shops" + (" and seeds" if len(summary.get("seeds", [])) > 1 else "")
             + ")", "", markdown_table(header, rows), ""]
    lines += [f"- **gap closed** = ({method} - local) / (central - local) on the shop means; n/a when the oracle "
              f"beats local-only by less than {summary.get('min_gap')} (`no-gap`) or not at all "
              "(`oracle-below-local`): then there is no gap to close and the raw means are the result.",
              f"- a shop is listed when {method} ends below local-only; margins are in the metric's bad direction "
              "(positive = worse), with CTR's standard error (Hanley-McNeil, from the shop's test clicks; it treats "
              "the two AUCs as independent, so it overstates the error) and, with three or more seeds, the "
              "standard error from the margin's seed-to-seed spread (paired, and it includes training noise). "
              "Gains are in the good direction (a lower WAPE is a gain).",
              f"- small shops (flagged data-poor by the data source): {small}.", ""]
    targets = summary.get("targets") or {}
    if targets:
        lines += ["## Targets (CTR AUC; gap closed of the sampled ranking metrics where the scenario has them)", "",
                  markdown_table(["target", "wanted", "measured", "met"],
                                 [[k, v["target"], _fmt(v["value"]) + target_detail(v),
                                   "n/a" if v["met"] is None else "yes" if v["met"] else
                                   "**no** (by less than 2 s.e.)" if v.get("within_noise") else "**no**"]
                                  for k, v in targets.items()]), ""]
    return lines


def target_detail(target: dict[str, Any]) -> str:
    """' ± se (shop; ± se over k seeds)' for a target that carries them, else ''."""
    se = f" ± {target['se']:.4f}" if target.get("se") is not None else ""
    inside = [str(target["shop"])] if target.get("shop") else []
    if target.get("se_seeds") is not None:
        inside.append(f"± {target['se_seeds']:.4f} over {target['n_seeds']} seeds")
    return se + (f" ({'; '.join(inside)})" if inside else "")


def _per_shop(final: pd.DataFrame, small: set[str]) -> list[str]:
    """Markdown lines: per task, the primary test metric per shop and method (seed means)."""
    lines = ["## Per shop (test metric at each shop's best-validation round)", ""]
    for task, (metric, higher) in PRIMARY.items():
        sel = final[(final["task"] == task) & (final["metric"] == metric)]
        if sel.empty:
            continue
        wide = sel.pivot_table(index="shop", columns="method", values="value", aggfunc="mean")
        rounds = sel.groupby(["shop", "method"])["round"].agg(lambda r: "/".join(str(int(x)) for x in sorted(set(r))))
        methods = _methods(list(wide.columns))
        rows = [[shop + (" (small)" if shop in small else ""),
                 *[f"{_fmt(wide.at[shop, m])} (r{rounds[(shop, m)]})" if pd.notna(wide.at[shop, m]) else "-"
                   for m in methods]] for shop in wide.index]
        better = "higher" if higher else "lower"
        lines += [f"### {task}: {metric} ({better} is better; rN = round picked on validation, per seed)", "",
                  markdown_table(["shop", *methods], rows), ""]
    return lines


def render_summary(run_dir: Path, rows: pd.DataFrame, final: pd.DataFrame, *, summary: dict[str, Any] | None,
                   small_shops: Sequence[str], plots: Sequence[Path]) -> str:
    """The text of summary.md."""
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    if (run_dir / "config.toml").exists():
        config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    scenario = config.get("scenario", {})
    seeds = sorted(int(s) for s in rows["seed"].unique())
    rounds = int(rows["round"].max()) if len(rows) else 0
    methods = ", ".join(_methods(list(rows["method"].unique())))
    lines = [f"# Run summary: {run_dir.name}", "",
             f"- scenario: `{scenario.get('name', '?')}`; methods: {methods}",
             f"- seeds: {', '.join(map(str, seeds))}; rounds (epochs for local/central): {rounds}",
             f"- shops: {rows['shop'].nunique()}; tasks: {', '.join(t for t in PRIMARY if t in set(rows['task']))}",
             "- every number is a test metric at the round where that shop scored best on its own validation "
             "split (the same early-stopping rule for every method)", ""]
    if summary:
        lines += _headline(summary)
    lines += _per_shop(final, set(small_shops))
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


def write_run_report(run_dir: str | Path, *, small_shops: Sequence[str] = (), summary: dict[str, Any] | None = None
                     ) -> list[Path]:
    """Write ``summary.md`` and PNG plots (``plots/``) for a run directory from its ``metrics.csv``.

    Returns the files written. ``small_shops`` marks data-poor shops in the tables; ``summary`` is
    a `compare.summarize` result (when given, the headline and targets are included).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    config = tomllib.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    rows = read_metrics(run_dir, seed=recorded_seed(config))
    final = seeded_final_table(rows)
    plot_dir = run_dir / "plots"
    plots = plot_rounds(rows, plot_dir) + plot_final_bars(final, plot_dir)
    text = render_summary(run_dir, rows, final, summary=summary, small_shops=small_shops, plots=plots)
    return [atomic_write_text(run_dir / "summary.md", text), *plots]
