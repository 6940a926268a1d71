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
from simulations.best_rounds import PRIMARY, final_table
from simulations.html_report import write_html_report
from simulations.plots import METHOD_ORDER, plot_final_bars, plot_rounds
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


TASK_NAMES = {"ctr": "CTR", "cvr": "CVR", "ranking": "ranking", "sales": "sales"}
METRIC_NAMES = {"auc": "AUC", "ndcg@10": "NDCG@10", "wape": "WAPE"}
METHOD_NAMES = {"local": "local-only", "central": "oracle", "fedavg-all": "FedAvg-all", "fedshop": "fedshop"}
Table = tuple[list[str], list[list[str]]]  # (header, rows) rendered as Markdown or HTML


def _missing_reason(name: str, summary: dict[str, Any]) -> str:
    """Why a target has no value: the method it needs did not run, or there is no gap to close."""
    method = summary.get("method", "fedshop")
    ran = {m for t in summary.get("tasks", {}).values() for m in t["mean"]}
    if name.startswith(("gap_closed", "ranking_gap_closed")) and "central" not in ran:
        return "no oracle in this run"
    if "local" not in ran:
        return "no local-only run in this run"
    if method not in ran:
        return f"no {method} run in this run"
    status = (summary.get("tasks", {}).get("ctr") or {}).get("gap_status", "")
    if status == "no-gap":
        return f"the oracle beats local-only by less than {summary.get('min_gap')}: no gap to close"
    if status == "oracle-below-local":
        return "the oracle is below local-only: no gap to close"
    return status or "not measured"


def target_status(name: str, target: dict[str, Any], summary: dict[str, Any]) -> str:
    """'met', 'not met', 'not met (by less than 2 standard errors: more seeds can tell)' or 'n/a (why)'."""
    if target["met"] is None:
        return f"n/a ({target.get('note', 'nothing to measure')})"
    if target["value"] is None:
        return f"n/a ({_missing_reason(name, summary)})"
    if target["met"]:
        return "met"
    return "not met (by less than 2 standard errors: more seeds can tell)" if target.get("within_noise") else "not met"


def headline_table(summary: dict[str, Any]) -> Table:
    """Per task: each method's mean, the gap closed, the shops left worse off and the small-shop gain."""
    method = summary.get("method", "fedshop")
    tasks = summary.get("tasks", {})
    methods = _methods(sorted({m for t in tasks.values() for m in t["mean"]}))
    header = ["task", "metric", *methods, "gap closed", f"shops where {method} < local", "small-shop gain"]
    rows = []
    for task, t in tasks.items():
        gap = _fmt(t["gap_closed"], 3) if t["gap_closed"] is not None else (
            f"n/a ({_missing_reason('gap_closed', summary)})" if t["gap_status"] == "missing-method"
            else f"n/a ({t['gap_status']})")
        worse = ", ".join(f"{w['shop']} ({w['margin']:+.4f}"
                          + (f" ± {w['margin_se']:.3f}" if w.get("margin_se") else "")
                          + (f"; ± {w['margin_se_seeds']:.3f} over {w['n_seeds']} seeds" if w.get("margin_se_seeds")
                             else "") + ")"
                          for w in t.get("worse_shops", [])) or ("none" if {"local", method} <= set(t["mean"])
                                                                  else "n/a")
        gain = (t.get("small_shop_gain") or {}).get(method)
        rows.append([task, t["metric"], *[_fmt(t["mean"].get(m)) for m in methods], gap, worse, _fmt(gain)])
    return header, rows


def targets_table(summary: dict[str, Any], *, markdown: bool = False) -> Table:
    """The project's targets: wanted, measured and whether met (n/a with the reason when not measurable)."""
    rows = []
    for name, t in (summary.get("targets") or {}).items():
        status = target_status(name, t, summary)
        if markdown and status.startswith("not met"):  # the Markdown summary's established wording
            status = "**no** (by less than 2 s.e.)" if t.get("within_noise") else "**no**"
        elif markdown and status == "met":
            status = "yes"
        rows.append([name, t["target"], _fmt(t["value"]) + target_detail(t), status])
    return ["target", "wanted", "measured", "met"], rows


def headline_notes(summary: dict[str, Any]) -> list[str]:
    """How to read the headline table (plain text)."""
    method = summary.get("method", "fedshop")
    small = ", ".join(summary.get("small_shops", [])) or "none flagged"
    return [f"gap closed = ({method} - local) / (central - local) on the shop means; n/a when the oracle "
            f"beats local-only by less than {summary.get('min_gap')} (no-gap) or not at all "
            "(oracle-below-local): then there is no gap to close and the raw means are the result.",
            f"a shop is listed when {method} ends below local-only; margins are in the metric's bad direction "
            "(positive = worse), with CTR's standard error (Hanley-McNeil, from the shop's test clicks; it treats "
            "the two AUCs as independent, so it overstates the error) and, with three or more seeds, the "
            "standard error from the margin's seed-to-seed spread (paired, and it includes training noise). "
            "Gains are in the good direction (a lower WAPE is a gain).",
            f"small shops (flagged data-poor by the data source): {small}."]


def _headline(summary: dict[str, Any]) -> list[str]:
    """Markdown lines of the per-task comparison and the targets."""
    if not summary.get("tasks"):
        return []
    lines = ["## Headline (test, mean over shops" + (" and seeds" if len(summary.get("seeds", [])) > 1 else "")
             + ")", "", markdown_table(*headline_table(summary)), ""]
    notes = headline_notes(summary)
    lines += [f"- **gap closed** = {notes[0].removeprefix('gap closed = ')}".replace("(no-gap)", "(`no-gap`)")
              .replace("(oracle-below-local)", "(`oracle-below-local`)"), f"- {notes[1]}", f"- {notes[2]}", ""]
    if summary.get("targets"):
        lines += ["## Targets (CTR AUC; gap closed of the sampled ranking metrics where the scenario has them)", "",
                  markdown_table(*targets_table(summary, markdown=True)), ""]
    return lines


def target_detail(target: dict[str, Any]) -> str:
    """' ± se (shop; ± se over k seeds)' for a target that carries them, else ''."""
    se = f" ± {target['se']:.4f}" if target.get("se") is not None else ""
    inside = [str(target["shop"])] if target.get("shop") else []
    if target.get("se_seeds") is not None:
        inside.append(f"± {target['se_seeds']:.4f} over {target['n_seeds']} seeds")
    return se + (f" ({'; '.join(inside)})" if inside else "")


def per_shop_tables(final: pd.DataFrame, small: set[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per task: (title, header, rows) of the primary test metric per shop and method (seed means)."""
    tables = []
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
        tables.append((f"{task}: {metric} ({better} is better; rN = round picked on validation, per seed)",
                       ["shop", *methods], rows))
    return tables


def _per_shop(final: pd.DataFrame, small: set[str]) -> list[str]:
    """Markdown lines: per task, the primary test metric per shop and method (seed means)."""
    lines = ["## Per shop (test metric at each shop's best-validation round)", ""]
    for title, header, rows in per_shop_tables(final, small):
        lines += [f"### {title}", "", markdown_table(header, rows), ""]
    return lines


def _label(task: str) -> str:
    metric = PRIMARY[task][0]
    return f"{TASK_NAMES.get(task, task)} {METRIC_NAMES.get(metric, metric)}"


def verdict_lines(run_dir: Path, rows: pd.DataFrame, final: pd.DataFrame, *, summary: dict[str, Any] | None,
                  scenario: str) -> list[str]:
    """The run in 3-5 plain lines: headline test metrics, the gap closed (or why n/a), targets, the report."""
    picked = pd.concat([final[(final["task"] == t) & (final["metric"] == m)] for t, (m, _) in PRIMARY.items()])
    seeds = sorted(int(s) for s in rows["seed"].unique()) if "seed" in rows else [0]
    means = picked.groupby(["task", "method"])["value"].mean()  # over shops (and seeds: same shops in each)
    tasks = [t for t in PRIMARY if t in set(picked["task"])]
    methods = _methods(list(picked["method"].unique()))
    over = "shops" + (f" and {len(seeds)} seeds" if len(seeds) > 1 else "")

    def note(shown: list[str]) -> str:
        lower = [_label(t) for t in shown if not PRIMARY[t][1]]
        return (f"test split, mean over {over}, each shop at its best-validation round"
                + (f"; lower {', '.join(lower)} is better" if lower else ""))

    n_shops, rounds = final["shop"].nunique(), int(rows["round"].max()) if len(rows) else 0
    where = f"report: {Path(run_dir) / 'report.html'} (run directory {run_dir}: summary.md, metrics.csv, plots/)"
    if not tasks:
        return [f"{scenario}: no test metrics were recorded (see metrics.csv)", where]
    if len(methods) == 1:
        method = methods[0]
        parts = " · ".join(f"{_label(t)} {means[(t, method)]:.3f}" for t in tasks)
        steps = ("epoch" if method in ("local", "central") else "round") + ("s" if rounds != 1 else "")
        lines = [f"{METHOD_NAMES.get(method, method)} on {scenario} ({n_shops} shops, {rounds} {steps}, "
                 f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}): {parts}", f"({note(tasks)})"]
        if method == "central":
            lines.append("gap closed: n/a (this run is the oracle itself: 'fedshop compare' measures "
                         "the federation against it)")
        else:
            lines.append("gap closed: n/a (no oracle in this run: 'fedshop compare' runs local-only and the "
                         "oracle beside it)")
        return [*lines, where]
    task = "ctr" if "ctr" in tasks else tasks[0]
    parts = " · ".join(f"{METHOD_NAMES.get(m, m)} {means[(task, m)]:.3f}" for m in methods if (task, m) in means)
    lines = [f"{scenario} ({n_shops} shops, {rounds} round{'s' if rounds != 1 else ''}): {_label(task)} {parts}",
             f"({note([task])})"]
    entry = (summary or {}).get("tasks", {}).get(task)
    if entry is not None:
        method = summary.get("method", "fedshop")
        if entry["gap_closed"] is not None:
            text = f"{method} closes {entry['gap_closed']:.0%} of the local-to-oracle gap on {_label(task)}"
        elif entry["gap_status"] == "missing-method":
            text = f"gap closed: n/a ({_missing_reason('gap_closed', summary)})"
        else:
            text = f"gap closed: n/a ({entry['gap_status']}: no gap to close, the raw means are the result)"
        worse = entry.get("worse_shops") or []
        if worse:
            text += f"; {len(worse)} shop(s) below local-only, worst {worse[0]['shop']} {worse[0]['margin']:+.4f}"
        lines.append(text)
        targets = summary.get("targets") or {}
        if targets:
            status = {name: target_status(name, t, summary) for name, t in targets.items()}
            met = sum(s == "met" for s in status.values())
            measured = sum(not s.startswith("n/a") for s in status.values())
            if not measured and len(set(status.values())) == 1:
                lines.append(f"targets ({', '.join(status)}): {next(iter(status.values()))}")
            else:
                lines.append(f"targets: {met} of {measured} measured met (" + "; ".join(
                    f"{name} {s}" for name, s in status.items()) + ")")
    return [*lines, where]


def _config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.toml"
    return tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def render_summary(run_dir: Path, rows: pd.DataFrame, final: pd.DataFrame, *, summary: dict[str, Any] | None,
                   small_shops: Sequence[str], plots: Sequence[Path], verdict: Sequence[str] = ()) -> str:
    """The text of summary.md."""
    run_dir = Path(run_dir)
    scenario = _config(run_dir).get("scenario", {})
    seeds = sorted(int(s) for s in rows["seed"].unique())
    rounds = int(rows["round"].max()) if len(rows) else 0
    methods = ", ".join(_methods(list(rows["method"].unique())))
    lines = [f"# Run summary: {run_dir.name}", ""]
    if verdict:
        lines += ["## Verdict", "", *[f"- {line}" for line in verdict], ""]
    lines += [f"- scenario: `{scenario.get('name', '?')}`; methods: {methods}",
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


def html_context(run_dir: Path, rows: pd.DataFrame, final: pd.DataFrame, *, summary: dict[str, Any] | None,
                 small_shops: Sequence[str], plots: Sequence[Path], verdict: Sequence[str]) -> dict[str, Any]:
    """What report.html shows, as plain strings and tables (the template escapes every one of them)."""
    run_dir = Path(run_dir)
    scenario = _config(run_dir).get("scenario", {})
    seeds = sorted(int(s) for s in rows["seed"].unique())
    several = len(seeds) > 1
    facts = [f"scenario: {scenario.get('name', '?')}; methods: {', '.join(_methods(list(rows['method'].unique())))}",
             f"seeds: {', '.join(map(str, seeds))}; rounds (epochs for local/central): "
             f"{int(rows['round'].max()) if len(rows) else 0}",
             f"shops: {rows['shop'].nunique()}; small shops: {', '.join(sorted(small_shops)) or 'none flagged'}",
             "every number is a test metric at the round where that shop scored best on its own validation split "
             "(the same early-stopping rule for every method)"]
    headline = None
    if summary and summary.get("tasks"):
        header, table_rows = headline_table(summary)
        headline = {"title": "Headline (test, mean over shops" + (" and seeds)" if several else ")"),
                    "header": header, "rows": table_rows, "notes": headline_notes(summary)}
    targets = targets_table(summary) if summary and summary.get("targets") else None
    return {"title": f"fedshop run {run_dir.name}", "verdict": list(verdict), "facts": facts, "headline": headline,
            "targets": targets, "per_shop": per_shop_tables(final, set(small_shops)),
            "plots": [{"src": p.relative_to(run_dir).as_posix(), "name": p.stem} for p in plots]}


def _load(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """(config, metric rows, final table) of a run directory."""
    config = _config(run_dir)
    rows = read_metrics(run_dir, seed=recorded_seed(config))
    return config, rows, seeded_final_table(rows)


def run_verdict(run_dir: str | Path, *, summary: dict[str, Any] | None = None) -> list[str]:
    """`verdict_lines` of a run directory, read from its metrics.csv and config.toml (what a command ends with)."""
    run_dir = Path(run_dir)
    config, rows, final = _load(run_dir)
    return verdict_lines(run_dir, rows, final, summary=summary, scenario=config.get("scenario", {}).get("name", "?"))


def write_run_report(run_dir: str | Path, *, small_shops: Sequence[str] = (), summary: dict[str, Any] | None = None
                     ) -> list[Path]:
    """Write ``summary.md``, ``report.html`` and PNG plots (``plots/``) for a run directory from its ``metrics.csv``.

    Returns the files written. ``small_shops`` marks data-poor shops in the tables and plots; ``summary``
    is a `compare.summarize` result (when given, the headline and targets are included).
    """
    run_dir = Path(run_dir)
    config, rows, final = _load(run_dir)
    plot_dir = run_dir / "plots"
    plots = (plot_rounds(rows, plot_dir, small_shops=small_shops)
             + plot_final_bars(final, plot_dir, small_shops=small_shops))
    verdict = verdict_lines(run_dir, rows, final, summary=summary,
                            scenario=config.get("scenario", {}).get("name", "?"))
    shown = verdict[:-1]  # the last line says where the report is: for the console, not the report itself
    text = render_summary(run_dir, rows, final, summary=summary, small_shops=small_shops, plots=plots,
                          verdict=shown)
    md = atomic_write_text(run_dir / "summary.md", text)
    html = write_html_report(run_dir / "report.html", html_context(run_dir, rows, final, summary=summary,
                                                                   small_shops=small_shops, plots=plots,
                                                                   verdict=shown))
    return [md, html, *plots]
