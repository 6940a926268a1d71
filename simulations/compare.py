"""`fedshop compare`: local-only, the centralized oracle, FedAvg-all and fedshop on the same splits and seeds.

Every method gets the same compute budget (rounds x local epochs = epochs of the non-federated
runs) and the same early-stopping rule (test metric at each shop's best-validation round). The
headline is the share of the local-to-oracle gap fedshop closes, and which shops end worse than
they would alone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from shared.atomic import atomic_write_csv, atomic_write_text
from shared.features import build_shop_tensors
from shared.metrics import auc_standard_error
from shared.scenario import Scenario
from simulations.baselines import compute_epochs, run_central, run_local_only
from simulations.best_rounds import PRIMARY
from simulations.run_report import seeded_final_table, write_run_report
from simulations.rundir import METRIC_COLUMNS, write_run_info

METHODS = ("local", "central", "fedavg-all", "fedshop")
FEDERATED = ("fedavg-all", "fedshop")
MIN_GAP = 0.002  # oracle-minus-local gaps smaller than this (in metric units) make gap_closed undefined
WORSE_TOLERANCE = 0.005  # a shop worse than local-only by more than this fails the "no shop loses" target
TARGETS = {"gap_closed": 0.70, "max_loss": WORSE_TOLERANCE, "small_shop_gain": 0.02}  # on CTR AUC
# Ranking with the federated-recommendation protocol (leave-one-out, 99 sampled negatives): gap closed.
SAMPLED_RANKING = ("hr@10_s99", "ndcg@10_s99")
RANKING_GAP_TARGET = 0.60

Progress = Callable[[str, int, int], None]  # (label, done, total)


@dataclass
class Comparison:
    """What a comparison produced: metric rows, the final per-shop table, the summary and where they are."""

    run_dir: Path
    rows: pd.DataFrame  # METRIC_COLUMNS (+ seed when several seeds)
    final: pd.DataFrame  # method, shop, task, metric, value, round (+ seed)
    summary: dict[str, Any]
    small_shops: list[str] = field(default_factory=list)


def parse_methods(text: str) -> list[str]:
    """``"local,fedshop"`` -> a validated, de-duplicated list in the order given."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {text!r}: unknown method(s) {unknown or '(none given)'}. "
                         f"Fix: a comma-separated subset of {','.join(METHODS)}")
    return methods


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; anything that is not a comma-separated list of integers is an error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ValueError(f"--seeds {text!r} is not a list of integers. Fix: e.g. --seeds 0,1,2") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once. Fix: e.g. --seeds 0,1,2")
    return seeds


def small_shops_of(scenario: Scenario) -> list[str]:
    """Training shops the data source flags as data-poor (``ShopData.meta['small']``, set by the synthetic world)."""
    return [s.name for s in scenario.training_shops() if s.meta.get("small")]


def run_method(scenario: Scenario, method: str, run_dir: Path, *, progress: Progress | None = None,
               checked: bool = False) -> list[dict[str, Any]]:
    """Metric rows of one method on one scenario (its seed), with the comparison's compute budget.

    ``checked``: the caller ran `scenario.check_federation()` (passed on to `run_federated`)."""
    epochs = compute_epochs(scenario)
    if method == "local":
        return run_local_only(scenario, epochs=epochs, progress=progress)
    if method == "central":
        return run_central(scenario, epochs=epochs, progress=progress)
    if method in FEDERATED:
        from simulations.federated import run_federated  # Flower and Ray load only when a federation runs

        def on_round(report: Any, total: int) -> None:
            if progress:
                progress(method, int(report.server_round), int(total))

        sub = run_federated(scenario, run_dir / f"{method}-seed{scenario.seed}", method=method,
                            rounds=int(scenario.federation["rounds"]), progress=on_round, checked=checked)
        frame = pd.read_csv(sub / "metrics.csv")
        return frame.assign(method=method)[METRIC_COLUMNS].to_dict("records")
    raise ValueError(f"method {method!r} is unknown. Fix: use one of {METHODS}")


def primary_table(final: pd.DataFrame) -> pd.DataFrame:
    """Primary test metric per (task, shop, method), averaged over seeds: index (task, shop), columns method."""
    keep = [(task, metric) for task, (metric, _) in PRIMARY.items()]
    mask = pd.Series(False, index=final.index)
    for task, metric in keep:
        mask |= (final["task"] == task) & (final["metric"] == metric)
    picked = final[mask]
    if picked.empty:
        return pd.DataFrame()
    return picked.pivot_table(index=["task", "shop"], columns="method", values="value", aggfunc="mean")


def _gap(local: float, central: float, fedshop: float, higher: bool, min_gap: float) -> tuple[float | None, str]:
    """(gap_closed, status): the share of the local-to-oracle gap fedshop closes, when there is a gap."""
    gap = (central - local) if higher else (local - central)
    if any(math.isnan(v) for v in (local, central, fedshop)):
        return None, "missing-method"
    if abs(gap) < min_gap:
        return None, "no-gap"  # the oracle does not beat local-only: nothing to close, report raw gains
    if gap < 0:
        return None, "oracle-below-local"  # pooling hurts; a share of a negative gap would invert the sign
    return (fedshop - local) / (central - local), "ok"


def _improvement(new: pd.Series, base: pd.Series, higher: bool) -> pd.Series:
    """Per-shop gain of ``new`` over ``base`` in the metric's good direction (positive = better)."""
    return (new - base) if higher else (base - new)


def ctr_test_sizes(scenarios: Sequence[Scenario]) -> dict[str, list[tuple[int, int]]]:
    """Per training shop, (clicks, non-clicks) in its CTR test split, one pair per scenario (seed).

    A seed where the shop has no CTR task (a click-only log: no non-clicks) adds no pair, as its margin
    comes from the other seeds only.
    """
    out: dict[str, list[tuple[int, int]]] = {}
    for scenario in scenarios:
        for shop in scenario.training_shops():
            clicked = build_shop_tensors(shop, scenario.features).rows["test"]["clicked"]
            pos = int(clicked.sum())
            neg = int(clicked.shape[0]) - pos
            if pos and neg:
                out.setdefault(shop.name, []).append((pos, neg))
    return out


def _difference_se(a: float, b: float, sizes: Sequence[tuple[int, int]]) -> float:
    """Standard error of the seed-mean of an AUC difference, treating the two AUCs as independent.

    Both methods are scored on the same rows, so they correlate and this overstates the error: a loss
    larger than it is certainly real, a smaller one may still be.
    """
    per_seed = [auc_standard_error(a, p, n) ** 2 + auc_standard_error(b, p, n) ** 2 for p, n in sizes]
    return math.sqrt(sum(per_seed) / len(per_seed) ** 2) if per_seed else float("nan")


def _seed_margin_se(final: pd.DataFrame, task: str, metric: str, shop: str, method: str, higher: bool
                    ) -> tuple[float, int] | None:
    """(standard error, seeds) of a shop's seed-mean margin (local minus ``method``) from its seed-to-seed spread.

    Paired within each seed (same test rows) and covering training noise too, unlike `_difference_se`;
    None with fewer than three seeds, where a spread says little.
    """
    if "seed" not in final:
        return None
    rows = final[(final["task"] == task) & (final["metric"] == metric) & (final["shop"] == shop)]
    per_seed = rows.pivot_table(index="seed", columns="method", values="value", aggfunc="mean")
    if not {"local", method} <= set(per_seed.columns):
        return None
    margin = -_improvement(per_seed[method], per_seed["local"], higher).dropna()
    if len(margin) < 3:
        return None
    return float(margin.std(ddof=1) / math.sqrt(len(margin))), int(len(margin))


def summarize(final: pd.DataFrame, *, small_shops: Sequence[str] = (), method: str = "fedshop",
              min_gap: float = MIN_GAP, tolerance: float = WORSE_TOLERANCE,
              ctr_sizes: Mapping[str, Sequence[tuple[int, int]]] | None = None,
              ranking_targets: bool = False) -> dict[str, Any]:
    """Per task (primary metric): method means, gap closed, shops worse than local-only, small-shop gain.

    Means are over shops (each seed's shops averaged, then seeds averaged: with the same shops in
    every seed this equals the mean over shops of seed-averaged values). ``gap_closed`` is
    (method - local) / (central - local) on those means; it is None with a status when the gap is
    below ``min_gap`` ("no-gap") or negative ("oracle-below-local"). ``worse_shops`` lists every
    shop where ``method`` ends below local-only, with the margin (positive = worse), and whether it
    exceeds ``tolerance``; for CTR with ``ctr_sizes`` (from `ctr_test_sizes`) also the margin's
    standard error, so a reader can tell a real loss from test-split noise, and with three or more
    seeds every task's margin gets its seed-to-seed standard error (`_seed_margin_se`). Gains are in the metric's
    good direction (WAPE: a drop is a gain).
    """
    table = primary_table(final)
    small = sorted(set(small_shops))
    out: dict[str, Any] = {"method": method, "min_gap": min_gap, "tolerance": tolerance, "small_shops": small,
                           "seeds": sorted(int(s) for s in final["seed"].unique()) if "seed" in final else [],
                           "tasks": {}}
    if table.empty:
        return out
    for task in table.index.get_level_values("task").unique():
        metric, higher = PRIMARY[task]
        per_shop = table.loc[task].dropna(axis=1, how="all")
        entry: dict[str, Any] = {"metric": metric, "higher_is_better": higher, "n_shops": int(len(per_shop)),
                                 **_means_and_gap(per_shop, method, higher, min_gap)}
        if {"local", method} <= set(per_shop.columns):
            both = per_shop[["local", method]].dropna()
            margin = -_improvement(both[method], both["local"], higher)
            worse = margin[margin > 0].sort_values(ascending=False)
            entry["worse_shops"] = [{"shop": str(s), "margin": float(v), "beyond_tolerance": bool(v > tolerance)}
                                    for s, v in worse.items()]
            if task == "ctr" and ctr_sizes:
                for row in entry["worse_shops"]:
                    sizes = ctr_sizes.get(row["shop"], [])
                    if not sizes:
                        continue
                    row["margin_se"] = _difference_se(float(both.loc[row["shop"], "local"]),
                                                      float(both.loc[row["shop"], method]), sizes)
                    row["test_clicks"] = [p for p, _ in sizes]
            for row in entry["worse_shops"]:
                spread = _seed_margin_se(final, task, metric, row["shop"], method, higher)
                if spread is not None:
                    row["margin_se_seeds"], row["n_seeds"] = spread
            entry["max_loss"] = float(max(margin.max(), 0.0)) if len(margin) else None
        gains = {}
        shops_small = [s for s in small if s in per_shop.index]
        for other in per_shop.columns:
            if other != "local" and "local" in per_shop.columns and shops_small:
                gain = _improvement(per_shop.loc[shops_small, other], per_shop.loc[shops_small, "local"], higher)
                gains[other] = float(gain.mean())
        entry["small_shop_gain"] = gains or None
        out["tasks"][str(task)] = entry
    out["ranking_sampled"] = _sampled_ranking(final, method, min_gap)
    out["targets"] = check_targets(out, ranking=ranking_targets)
    return out


def _means_and_gap(per_shop: pd.DataFrame, method: str, higher: bool, min_gap: float) -> dict[str, Any]:
    """Per-method means over shops (columns = methods) and the share of the gap ``method`` closes."""
    means = {m: float(per_shop[m].mean()) for m in per_shop.columns}
    if not {"local", "central", method} <= set(means):
        return {"mean": means, "gap_closed": None, "gap_status": "missing-method"}
    gap_closed, status = _gap(means["local"], means["central"], means[method], higher, min_gap)
    return {"mean": means, "gap": means["central"] - means["local"], "gap_closed": gap_closed, "gap_status": status}


def _sampled_ranking(final: pd.DataFrame, method: str, min_gap: float) -> dict[str, Any]:
    """Means and gap closed of the sampled ranking metrics (HR@10 and NDCG@10 against 99 negatives)."""
    out: dict[str, Any] = {}
    for metric in SAMPLED_RANKING:
        rows = final[(final["task"] == "ranking") & (final["metric"] == metric)]
        if not rows.empty:
            per_shop = rows.pivot_table(index="shop", columns="method", values="value", aggfunc="mean")
            out[metric] = _means_and_gap(per_shop, method, True, min_gap)
    return out


def check_targets(summary: dict[str, Any], *, eps: float = 1e-9, ranking: bool = False) -> dict[str, Any]:
    """The project's targets with measured values: on CTR AUC gap closed, no shop losing and small-shop
    gain; with ``ranking`` also the sampled-ranking gap closed (the MovieLens target).

    ``eps`` keeps a value that equals a target up to float rounding (0.7 computed as 0.69999...) on the right side.
    """
    ctr = summary["tasks"].get("ctr")
    def check(value: float | None, bound: float, at_least: bool = True) -> dict[str, Any]:
        met = value is not None and (value >= bound - eps if at_least else value <= bound + eps)
        return {"target": f"{'>=' if at_least else '<='} {bound}", "value": value, "met": met}

    targets: dict[str, Any] = {}
    if ctr:
        targets = {"gap_closed": check(ctr.get("gap_closed"), TARGETS["gap_closed"]),
                   "max_loss": check(ctr.get("max_loss"), TARGETS["max_loss"], at_least=False),
                   "small_shop_gain": check((ctr.get("small_shop_gain") or {}).get(summary["method"]),
                                            TARGETS["small_shop_gain"])}
        worst = (ctr.get("worse_shops") or [None])[0]
        if worst is not None:  # which shop sets the max loss, and how precisely its test split measures it
            targets["max_loss"]["shop"] = worst["shop"]
            if worst.get("margin_se") is not None:
                targets["max_loss"]["se"] = worst["margin_se"]
            if worst.get("margin_se_seeds") is not None:
                targets["max_loss"].update(se_seeds=worst["margin_se_seeds"], n_seeds=worst["n_seeds"])
            se = targets["max_loss"].get("se_seeds", targets["max_loss"].get("se"))
            if se is not None and not targets["max_loss"]["met"]:  # a miss the run's noise could explain
                targets["max_loss"]["within_noise"] = bool(worst["margin"] - TARGETS["max_loss"] <= 2 * se)
        if not summary.get("small_shops"):  # nothing to measure: neither met nor missed
            targets["small_shop_gain"].update(met=None, note="the scenario has no small shops")
    for metric, entry in (summary.get("ranking_sampled") or {}).items() if ranking else ():
        targets[f"ranking_gap_closed_{metric}"] = check(entry["gap_closed"], RANKING_GAP_TARGET)
    return targets


def comparison_csv(final: pd.DataFrame, several_seeds: bool) -> pd.DataFrame:
    """The test-split table written to comparison.csv: method, shop, task, metric, value (+ seed, round)."""
    cols = ["method", "shop", "task", "metric", "value", "round"]
    return final[(["seed"] if several_seeds else []) + cols].reset_index(drop=True)


def run_comparison(scenarios: Sequence[Scenario], run_dir: Path, *, methods: Sequence[str] = METHODS,
                   progress: Progress | None = None, config: dict[str, Any] | None = None,
                   on_method_done: Callable[[str, int, float], None] | None = None,
                   checked: bool = False) -> Comparison:
    """Run every method on every scenario (one per seed) into ``run_dir``; write metrics, tables and reports.

    ``checked`` is True when the caller ran each scenario's `check_federation()` (`fedshop compare`): the
    federated methods then do not check it again.

    Writes config.toml + versions.json, metrics.csv (all methods; a seed column when several
    seeds), comparison.csv, summary.json, summary.md and PNG plots.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    several = len(scenarios) > 1
    write_run_info(run_dir, {"command": "compare", "methods": list(methods),
                             "seeds": [s.seed for s in scenarios], **(config or {}),
                             "scenario": scenarios[0].raw})
    frames: list[pd.DataFrame] = []
    for scenario in scenarios:
        for method in methods:
            start = time.perf_counter()
            rows = pd.DataFrame(run_method(scenario, method, run_dir, progress=progress, checked=checked),
                                columns=METRIC_COLUMNS)
            frames.append(rows.assign(seed=scenario.seed))
            if on_method_done:
                on_method_done(method, scenario.seed, time.perf_counter() - start)
            _write_rows(run_dir, frames, several)  # partial results survive a later failure
    return report_comparison(run_dir, pd.concat(frames, ignore_index=True), scenarios)


def report_comparison(run_dir: Path, rows: pd.DataFrame, scenarios: Sequence[Scenario]) -> Comparison:
    """From metric rows with a seed column (one scenario per seed): comparison.csv, summary.json/.md, plots."""
    final = seeded_final_table(rows)
    small = small_shops_of(scenarios[0])
    # The sampled-ranking target belongs to the literature's protocol: leave-one-out splits (MovieLens).
    summary = summarize(final, small_shops=small, ctr_sizes=ctr_test_sizes(scenarios),
                        ranking_targets=all(sc.features.split == "leave-last-out" for sc in scenarios))
    atomic_write_csv(run_dir / "comparison.csv", comparison_csv(final, len(scenarios) > 1))
    atomic_write_text(run_dir / "summary.json", json.dumps(_plain(summary), indent=2))
    write_run_report(run_dir, small_shops=small, summary=summary)
    return Comparison(run_dir=run_dir, rows=rows, final=final, summary=summary, small_shops=small)


def _write_rows(run_dir: Path, frames: list[pd.DataFrame], several: bool) -> None:
    frame = pd.concat(frames, ignore_index=True)
    atomic_write_csv(run_dir / "metrics.csv", frame if several else frame[METRIC_COLUMNS])


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN to null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
