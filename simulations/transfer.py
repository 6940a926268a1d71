"""`fedshop transfer`: how well the federation's encoder serves shops that join later, against data size.

For every late joiner, seed and fraction f of its training rows (nested subsets, same validation
and test rows), every mode of `shared.transfer` adapts a model and is scored on every task. The
encoders come from `run_federated` (a plain fedshop federation and one with the Reptile objective)
or from checkpoints given on the command line. Writes `transfer.csv` (mean over seeds),
`transfer_by_seed.csv`, `transfer.png` and `summary.md` / `summary.json` (data saved: the smallest
f at which a transfer mode reaches scratch's full-data metric).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from shared.atomic import atomic_write_bytes, atomic_write_csv, atomic_write_text
from shared.features import build_shop_tensors
from shared.model import SharedEncoder
from shared.protocol import LOCAL_PREFIX
from shared.scenario import Scenario, scenario_from_dict
from shared.transfer import PRIMARY_METRIC, TransferConfig, adapt_frozen_then_finetune, adapt_shop
from simulations.join_diagnostics import explain_miss, join_diagnostics

COLUMNS = ["shop", "mode", "fraction", "task", "metric", "value"]
ENCODER_MODES = {"frozen": "fedshop", "finetune": "fedshop", "meta": "meta"}  # mode -> encoder it needs
Progress = Callable[[str], None]

logger = logging.getLogger(__name__)


class TransferError(ValueError):
    """A transfer run that cannot start: names the setting or file and the fix."""


@dataclass
class TransferPlan:
    """What one transfer run does (resolved from the scenario's [transfer] table and the CLI)."""

    shops: list[str]
    fractions: list[float]
    modes: list[str]
    seeds: list[int]


def plan_transfer(scenario: Scenario, seeds: list[int] | None = None) -> TransferPlan:
    """Late joiners, fractions and modes of a scenario, checked."""
    shops = [s.name for s in scenario.joining_shops()]
    if not shops:
        raise TransferError(f"scenario '{scenario.name}' has no late joiners. Fix: set [transfer] late_joiners = "
                            "[\"<shop>\"] (or data.synthetic.n_late_joiners > 0)")
    unknown = sorted(set(scenario.late_joiners) - set(shops))
    if unknown:
        raise TransferError(f"[transfer] late_joiners {unknown} are not shops of '{scenario.name}'. "
                            f"Fix: use names from {[s.name for s in scenario.shops()]}")
    fractions = sorted(set(scenario.transfer["fractions"]))  # the schema checked: a non-empty list in (0, 1]
    if 1.0 not in fractions:  # scratch at f = 1 is the reference every "data saved" figure needs
        fractions.append(1.0)
    modes = list(scenario.transfer["modes"])  # the schema checked each word
    if "scratch" not in modes:
        modes.insert(0, "scratch")
    return TransferPlan(shops=shops, fractions=fractions, modes=modes, seeds=list(seeds or [scenario.seed]))


def load_encoder(path: Path) -> dict[str, torch.Tensor]:
    """The encoder arrays of a checkpoint file or of a run directory's newest checkpoint."""
    from server.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    path = Path(path)
    if not path.exists():
        raise TransferError(f"encoder checkpoint {path} does not exist. Fix: pass a run directory or a "
                            "checkpoints/round-NNNN.pt file")
    try:
        ckpt = load_checkpoint(path) if path.is_file() else latest_checkpoint(path) or latest_checkpoint(path.parent)
    except CheckpointError as exc:
        raise TransferError(str(exc)) from exc
    if ckpt is None:
        raise TransferError(f"{path} holds no checkpoints. Fix: pass the run directory of a finished federation")
    # A FedAvg-all checkpoint also holds averaged heads under "local."; a new shop takes only the encoder.
    return {k: torch.from_numpy(v.copy()) for k, v in ckpt.arrays.items() if not k.startswith(LOCAL_PREFIX)}


def check_encoder(scenario: Scenario, state: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse an encoder whose keys or shapes do not match the scenario's model (before any training)."""
    expected = {k: tuple(v.shape) for k, v in SharedEncoder(scenario.model, scenario.features).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise TransferError(f"{label} encoder does not match scenario '{scenario.name}' (arrays {diff[:3]} differ). "
                            "Fix: use an encoder trained with this scenario's [model] and [features] sizes")


def federate(scenario: Scenario, run_dir: Path, *, objective: str, rounds: int | None) -> dict[str, torch.Tensor]:
    """Run the federation over the training shops (``objective`` fedavg or meta); its final encoder."""
    from simulations.federated import run_federated

    fed = scenario if scenario.federation["objective"] == objective else scenario_from_dict(
        scenario.raw, {"federation.objective": objective}, path=scenario.path)
    run_federated(fed, run_dir, method="fedshop", rounds=rounds)
    return load_encoder(run_dir)


@functools.lru_cache(maxsize=8)
def _tensors(raw_json: str, shop: str):
    scenario = scenario_from_dict(json.loads(raw_json))
    data = next(s for s in scenario.shops() if s.name == shop)
    return scenario, build_shop_tensors(data, scenario.features)


def adapt_job(raw_json: str, shop: str, fraction: float, seed: int, modes: list[str],
              encoders: dict[str, dict[str, torch.Tensor]], tcfg: TransferConfig) -> list[dict[str, Any]]:
    """All modes for one (shop, fraction, seed): metric rows with their seed and bookkeeping columns."""
    torch.set_num_threads(1)  # jobs run one per core
    scenario, full = _tensors(raw_json, shop)
    tensors = full.subsample_train(fraction, seed)
    kw = {"model_cfg": scenario.model, "train_cfg": scenario.train, "transfer_cfg": tcfg, "seed": seed}
    results = {}
    for mode in modes:
        if mode in results:
            continue
        started = time.perf_counter()
        if mode in ("frozen", "finetune") and {"frozen", "finetune"} <= set(modes):
            frozen, tuned = adapt_frozen_then_finetune(encoders["fedshop"], tensors, **kw)
            results["frozen"], results["finetune"] = frozen, tuned
        else:
            results[mode] = adapt_shop(encoders.get(ENCODER_MODES.get(mode, "")), tensors, mode, **kw)
        logger.info("%s f=%.2f seed=%d %s: %.1fs", shop, fraction, seed, mode, time.perf_counter() - started)
    rows = []
    n_train = tensors.num_train_examples()
    for mode in modes:
        a = results[mode]
        base = {"seed": seed, "shop": shop, "mode": mode, "fraction": fraction, "n_train": n_train,
                "periods": a.periods, "chosen": a.chosen}
        rows += [{**base, "task": task, "metric": m, "value": float(v)}
                 for task, metrics in a.test.items() for m, v in metrics.items()]
    return rows


def _run_jobs(jobs: list[tuple], workers: int, progress: Progress | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for job in jobs:
            rows += adapt_job(*job)
            if progress:
                progress(f"{job[1]} f={job[2]:g} seed={job[3]}")
        return rows
    # spawn: the parent may hold Ray and torch thread pools that must not be forked.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(adapt_job, *job): job for job in jobs}
        for fut in as_completed(futures):
            rows += fut.result()
            if progress:
                job = futures[fut]
                progress(f"{job[1]} f={job[2]:g} seed={job[3]}")
    return rows


def run_transfer(scenario: Scenario, out_dir: Path, *, encoder: Path | None = None, meta_encoder: Path | None = None,
                 rounds: int | None = None, seeds: list[int] | None = None, workers: int | None = None,
                 transfer_cfg: TransferConfig | None = None, progress: Progress | None = None) -> Path:
    """The whole transfer experiment; returns ``out_dir`` holding transfer.csv, the plot and the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_transfer(scenario, seeds)
    tcfg = transfer_cfg or TransferConfig()
    timing: dict[str, float] = {}
    encoders: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    needed = {ENCODER_MODES[m] for m in plan.modes if m in ENCODER_MODES}
    for name, given, objective in (("fedshop", encoder, "fedavg"), ("meta", meta_encoder, "meta")):
        if name not in needed:
            continue
        started = time.perf_counter()
        if given is not None:
            encoders[name], sources[name] = load_encoder(given), str(given)
        else:
            run_dir = out_dir / ("federation" if name == "fedshop" else "federation-meta")
            if progress:
                progress(f"federation ({objective} objective) -> {run_dir}")
            encoders[name] = federate(scenario, run_dir, objective=objective, rounds=rounds)
            sources[name] = str(run_dir)
        check_encoder(scenario, encoders[name], name)
        timing[f"encoder_{name}_s"] = round(time.perf_counter() - started, 1)
    raw_json = json.dumps(scenario.raw, sort_keys=True, default=str)
    # Largest fractions first: they take longest, so the pool finishes evenly.
    jobs = [(raw_json, shop, f, seed, plan.modes, encoders, tcfg)
            for f in sorted(plan.fractions, reverse=True) for shop in plan.shops for seed in plan.seeds]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    started = time.perf_counter()
    rows = _run_jobs(jobs, workers, progress)
    timing["adaptation_s"] = round(time.perf_counter() - started, 1)
    by_seed = pd.DataFrame(rows).sort_values(["shop", "mode", "fraction", "task", "metric", "seed"])
    atomic_write_csv(out_dir / "transfer_by_seed.csv", by_seed)
    mean = by_seed.groupby(["shop", "mode", "fraction", "task", "metric"], as_index=False)["value"].mean()
    mean = mean[COLUMNS]
    atomic_write_csv(out_dir / "transfer.csv", mean)
    summary = summarize(mean, plan, diagnostics=_diagnostics(scenario, plan))
    summary.update({"scenario": scenario.name, "plan": asdict(plan), "encoders": sources, "timing": timing,
                    "transfer_config": asdict(tcfg), "chosen_stage": _chosen(by_seed)})
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary))
    plot_transfer(mean, plan, out_dir / "transfer.png")
    return out_dir


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _chosen(by_seed: pd.DataFrame) -> dict[str, dict[str, int]]:
    """How often each stage's weights were kept, per mode (meta: frozen vs fine-tuned)."""
    runs = by_seed.drop_duplicates(["seed", "shop", "mode", "fraction"])
    return {mode: grp["chosen"].value_counts().to_dict() for mode, grp in runs.groupby("mode")}


def _primary(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    metric, _ = PRIMARY_METRIC[task]
    return frame[(frame["task"] == task) & (frame["metric"] == metric)]


def fraction_to_match(curve: Mapping[float, float], target: float, larger_is_better: bool) -> float | None:
    """The smallest fraction whose metric reaches ``target`` (None if no fraction does)."""
    for f in sorted(curve):
        v = curve[f]
        if math.isfinite(v) and (v >= target if larger_is_better else v <= target):
            return f
    return None


def _diagnostics(scenario: Scenario, plan: TransferPlan) -> dict[str, dict[str, Any]]:
    """Per late joiner: what of it the federation has seen and how many clicks its test split holds."""
    federation = [build_shop_tensors(s, scenario.features) for s in scenario.training_shops()]
    joiners = {s.name: s for s in scenario.joining_shops()}
    return {name: join_diagnostics(build_shop_tensors(joiners[name], scenario.features), federation)
            for name in plan.shops if name in joiners}


def summarize(frame: pd.DataFrame, plan: TransferPlan, diagnostics: Mapping[str, dict[str, Any]] | None = None
              ) -> dict[str, Any]:
    """Per shop and task: curves, scratch's full-data metric and the data each mode saves; plus targets.

    With ``diagnostics`` (from `join_diagnostics`) the f = 0.25 target carries a plain explanation per shop.
    """
    shops: dict[str, Any] = {}
    for shop in plan.shops:
        tasks: dict[str, Any] = {}
        for task, (metric, larger) in PRIMARY_METRIC.items():
            rows = _primary(frame[frame["shop"] == shop], task)
            if rows.empty:
                continue
            curves = {m: dict(zip(g["fraction"], g["value"], strict=True)) for m, g in rows.groupby("mode")}
            ref = curves.get("scratch", {}).get(1.0)
            entry: dict[str, Any] = {"metric": metric, "larger_is_better": larger, "scratch_full": ref,
                                     "curves": curves, "fraction_to_match": {}, "data_saved": {}}
            for mode in plan.modes:
                if mode == "scratch" or mode not in curves or ref is None:
                    continue
                f = fraction_to_match(curves[mode], ref, larger)
                entry["fraction_to_match"][mode] = f
                entry["data_saved"][mode] = None if f is None else round(1 - f, 4)
            tasks[task] = entry
        shops[shop] = tasks
    targets = _targets(frame, plan)
    for shop, entry in targets.get("ctr_auc_f0.25_vs_scratch_f1", {}).get("shops", {}).items():
        if diagnostics and shop in diagnostics:
            entry["diagnostics"] = diagnostics[shop]
            entry["explanation"] = explain_miss(entry["gain"], entry["scratch"], diagnostics[shop])
    return {"metric_per_task": {t: m for t, (m, _) in PRIMARY_METRIC.items()}, "shops": shops,
            "targets": targets, "join_diagnostics": dict(diagnostics or {})}


def _targets(frame: pd.DataFrame, plan: TransferPlan) -> dict[str, Any]:
    """The issue's targets on CTR AUC: gain of the best transfer mode at f=0.05; best at f=0.25 vs scratch at 1."""
    ctr = _primary(frame, "ctr")
    transfer_modes = [m for m in plan.modes if m != "scratch"]
    out: dict[str, Any] = {}

    def at(shop: str, mode: str, f: float) -> float | None:
        hit = ctr[(ctr["shop"] == shop) & (ctr["mode"] == mode) & ((ctr["fraction"] - f).abs() < 1e-9)]
        return float(hit["value"].iloc[0]) if len(hit) else None

    for f, against in ((0.05, 0.05), (0.25, 1.0)):
        if f not in plan.fractions or not transfer_modes:
            continue
        per_shop = {}
        for shop in plan.shops:
            scratch = at(shop, "scratch", against)
            scores = {m: at(shop, m, f) for m in transfer_modes}
            scores = {m: v for m, v in scores.items() if v is not None}
            if scratch is None or not scores:
                continue
            best = max(scores, key=scores.__getitem__)
            per_shop[shop] = {"best_mode": best, "best": scores[best], "scratch": scratch,
                              "gain": scores[best] - scratch, "by_mode": scores}
        if per_shop:
            key = f"ctr_auc_f{f:g}_vs_scratch_f{against:g}"
            out[key] = {"shops": per_shop, "mean_gain": sum(v["gain"] for v in per_shop.values()) / len(per_shop)}
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """A readable summary: targets, then per shop and task the data each mode saves."""
    lines = [f"# Transfer to late joiners: {summary.get('scenario', '')}", ""]
    plan = summary.get("plan", {})
    lines += [f"Shops {plan.get('shops')}, fractions {plan.get('fractions')}, modes {plan.get('modes')}, "
              f"seeds {plan.get('seeds')}. Test metrics after validation early stopping (same rule for all modes).",
              "", "## Targets (CTR AUC; best = the best transfer mode on test)", ""]
    for key, target in summary.get("targets", {}).items():
        lines.append(f"- `{key}`: mean gain {target['mean_gain']:+.4f}")
        for shop, v in target["shops"].items():
            modes = ", ".join(f"{m} {x:.4f}" for m, x in v["by_mode"].items())
            lines.append(f"  - {shop}: scratch {v['scratch']:.4f}; {modes}; best {v['best_mode']} ({v['gain']:+.4f})")
            if v.get("explanation"):
                lines.append(f"    - why: {v['explanation']}")
    lines += ["", "## Data saved to reach scratch's full-data metric", "",
              "| shop | task | metric | scratch f=1 | mode | f to match | data saved |",
              "|---|---|---|---|---|---|---|"]
    for shop, tasks in summary.get("shops", {}).items():
        for task, e in tasks.items():
            ref = "n/a" if e["scratch_full"] is None else f"{e['scratch_full']:.4f}"
            for mode, f in e["fraction_to_match"].items():
                saved = e["data_saved"][mode]
                lines.append(f"| {shop} | {task} | {e['metric']} | {ref} | {mode} | "
                             f"{'not reached' if f is None else f'{f:g}'} | "
                             f"{'-' if saved is None else f'{saved:.0%}'} |")
    if summary.get("chosen_stage"):
        lines += ["", f"Stage kept by early stopping, per mode: {summary['chosen_stage']}"]
    if summary.get("timing"):
        lines += ["", f"Timing (s): {summary['timing']}"]
    return "\n".join(lines) + "\n"


def plot_transfer(frame: pd.DataFrame, plan: TransferPlan, path: Path) -> Path:
    """One panel per (late joiner, task): primary test metric vs fraction, a line per mode."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in PRIMARY_METRIC if not _primary(frame, t).empty]
    fig, axes = plt.subplots(len(plan.shops), max(len(tasks), 1), figsize=(3.6 * max(len(tasks), 1),
                             3.0 * len(plan.shops)), squeeze=False)
    for i, shop in enumerate(plan.shops):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            rows = _primary(frame[frame["shop"] == shop], task)
            for mode in plan.modes:
                line = rows[rows["mode"] == mode].sort_values("fraction")
                if len(line):
                    ax.plot(line["fraction"], line["value"], marker="o", label=mode)
            ref = rows[(rows["mode"] == "scratch") & (rows["fraction"] == 1.0)]["value"]
            if len(ref):
                ax.axhline(float(ref.iloc[0]), color="grey", linestyle="--", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{shop}: {task}", fontsize=9)
            ax.set_xlabel("fraction of training rows")
            ax.set_ylabel(PRIMARY_METRIC[task][0])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
