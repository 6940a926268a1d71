"""Local training throughput: examples per second for each task mix on the default scenario's largest shop.

Runs the production trainer (`shared.train.train_shop`) for a fixed number of optimiser steps per task
mix (ctr; ctr+cvr; ctr+cvr+ranking; all four) and torch thread count, after a short warm-up. The
machine is shared, so the 1/5/15-minute load averages are recorded before and after every measurement,
and CPU time (`time.process_time`) is reported beside wall time (examples per CPU-second is the less
load-sensitive figure). With ``--dense`` every measurement is paired with one of the dense path
(`TrainConfig.sparse_embeddings = False`: dense gradients and dense Adam over the whole embedding tables)
taken right before it, and the table gives the sparse/dense ratio from the same run.
Prints a Rich table and writes benchmarks/results/local_throughput.json atomically.

    .venv/bin/python benchmarks/local_throughput.py [--steps 300] [--warmup 10] [--threads 1 2] [--dense]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from shared.atomic import atomic_write_text
from shared.features import ShopTensors, build_shop_tensors
from shared.model import build_model
from shared.scenario import Scenario, load_scenario
from shared.train import evaluate_shop, train_shop

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "local_throughput.json"
MIXES: dict[str, list[str]] = {
    "ctr": ["ctr"],
    "ctr+cvr": ["ctr", "cvr"],
    "ctr+cvr+ranking": ["ctr", "cvr", "ranking"],
    "all four": ["ctr", "cvr", "ranking", "sales"],
}


def rows_per_step(tensors: ShopTensors, tasks: list[str], batch_size: int) -> int:
    """Training rows one optimiser step reads: a batch from each source the tasks draw on.

    Impressions feed CTR and CVR together, clicked rows feed ranking, sales rows feed sales (see
    shared/train.py); a source smaller than the batch contributes all its rows.
    """
    train = tensors.rows["train"]
    sizes = {}
    if {"ctr", "cvr"} & set(tasks):
        sizes["impressions"] = int(train["user"].shape[0])
    if "ranking" in tasks:
        sizes["positives"] = int((train["clicked"] == 1).sum())
    if "sales" in tasks and tensors.sales is not None:
        sizes["sales"] = int(tensors.sales["train"]["item"].shape[0])
    return sum(min(batch_size, n) for n in sizes.values())


def largest_shop(scenario: Scenario) -> tuple[str, ShopTensors]:
    """The training shop with the most interaction rows, as cached tensors."""
    shop = max(scenario.training_shops(), key=lambda s: len(s.interactions))
    return shop.name, build_shop_tensors(shop, scenario.features)


def measure(scenario: Scenario, tensors: ShopTensors, tasks: list[str], threads: int, steps: int,
            warmup: int, sparse: bool = True) -> dict[str, Any]:
    """Time ``steps`` optimiser steps of one task mix at one thread count (after ``warmup`` steps).

    ``sparse`` picks the trainer's path: row-sparse lazy Adam on the hashed tables, or dense Adam.
    """
    missing = sorted(set(tasks) - set(tensors.tasks))
    if missing:
        raise ValueError(f"the shop {tensors.name!r} lacks task(s) {missing}; pick a scenario whose largest "
                         "shop has every task")
    torch.set_num_threads(threads)
    shop = replace(tensors, tasks=list(tasks))
    model = build_model(shop, scenario.model, scenario.features, seed=scenario.seed)
    # Many epochs so that max_steps, not the epoch length, ends each call.
    cfg = replace(scenario.train, epochs=10_000, seed=scenario.seed, sparse_embeddings=sparse)
    train_shop(model, shop, replace(cfg, max_steps=warmup))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    train_shop(model, shop, replace(cfg, max_steps=steps))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    examples = steps * rows_per_step(shop, tasks, cfg.batch_size)
    return {
        "tasks": list(tasks), "path": "sparse" if sparse else "dense", "threads": threads, "steps": steps,
        "examples": examples,
        "wall_s": wall, "cpu_s": cpu, "examples_per_s": examples / wall, "steps_per_s": steps / wall,
        "examples_per_cpu_s": examples / cpu, "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }


def ctr_auc(scenario_name: str, seed: int, sparse: bool, epochs: int) -> float:
    """Test CTR AUC of the largest shop trained alone for ``epochs`` rounds of one local epoch, at its best
    validation epoch (the reports' rule), on the world and model drawn from ``seed``."""
    torch.set_num_threads(1)
    scenario = load_scenario(scenario_name, {"seed": seed})
    _, tensors = largest_shop(scenario)
    model = build_model(tensors, scenario.model, scenario.features, seed=seed)
    best_val, test_at_best = -1.0, float("nan")
    for epoch in range(epochs):
        train_shop(model, tensors, replace(scenario.train, epochs=1, seed=seed * 1000 + epoch,
                                           sparse_embeddings=sparse))
        val = evaluate_shop(model, tensors, "val").get("ctr", {}).get("auc", float("nan"))
        if val > best_val:
            best_val, test_at_best = val, evaluate_shop(model, tensors, "test")["ctr"]["auc"]
    return test_at_best


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def speedups(results: list[dict[str, Any]]) -> dict[str, float]:
    """Sparse over dense examples per CPU-second for every (mix, threads) measured both ways: "mix|threads"."""
    by = {(r["mix"], r["threads"], r["path"]): r["examples_per_cpu_s"] for r in results}
    return {f"{m}|{t}": v / by[(m, t, "dense")] for (m, t, path), v in by.items()
            if path == "sparse" and (m, t, "dense") in by}


def main() -> None:
    """Run every task mix at every thread count, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default", help="scenario name or path (default: default)")
    parser.add_argument("--steps", type=int, default=300, help="timed optimiser steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--dense", action="store_true",
                        help="also time the dense path before each measurement and report the sparse/dense ratio")
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES), metavar="MIX",
                        help=f"task mixes to time (default: all of {list(MIXES)})")
    parser.add_argument("--auc-seeds", type=int, default=0,
                        help="also train the largest shop alone on this many seeds, sparse and dense, and "
                             "report test CTR AUC mean +- sd (0 = skip)")
    parser.add_argument("--auc-epochs", type=int, default=6, help="local epochs per AUC run")
    parser.add_argument("--out", type=Path, default=RESULT, help="JSON result path")
    args = parser.parse_args()

    console = Console()
    scenario = load_scenario(args.scenario)
    start_load = os.getloadavg()
    name, tensors = largest_shop(scenario)
    report: dict[str, Any] = {
        "benchmark": "local_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenario": scenario.name, "shop": name,
        "train_impressions": int(tensors.rows["train"]["user"].shape[0]),
        "n_users": tensors.n_users, "n_items": tensors.n_items,
        "model": asdict(scenario.model), "batch_size": scenario.train.batch_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_at_start": list(start_load)},
        "note": "examples = optimiser steps x rows read per step (one batch per task source); the machine is "
                "shared, so compare examples_per_cpu_s across runs and read wall-clock figures with the load",
        "results": [],
    }
    paths = [False, True] if args.dense else [True]
    for threads in args.threads:
        for label in args.mixes:
            for sparse in paths:  # dense right before sparse: the pair sees nearly the same load
                path = "sparse" if sparse else "dense"
                console.print(f"[dim]{label}, {threads} thread(s), {path}: {args.steps} steps ...[/dim]")
                result = measure(scenario, tensors, MIXES[label], threads, args.steps, args.warmup, sparse)
                report["results"].append({"mix": label, **result})
                report["machine"]["loadavg_at_end"] = list(os.getloadavg())
                # Rewritten after every measurement: an interrupted run on a busy machine keeps its numbers.
                atomic_write_text(args.out, json.dumps(report, indent=2))
    report["speedup_cpu"] = speedups(report["results"])
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if args.auc_seeds:
        aucs: dict[str, list[float]] = {"dense": [], "sparse": []}
        for seed in range(args.auc_seeds):
            for path in ("dense", "sparse"):
                console.print(f"[dim]CTR AUC, seed {seed}, {path}, {args.auc_epochs} epochs ...[/dim]")
                aucs[path].append(ctr_auc(args.scenario, seed, path == "sparse", args.auc_epochs))
        report["ctr_auc"] = {"epochs": args.auc_epochs, "seeds": list(range(args.auc_seeds)), **aucs,
                             **{f"{p}_mean_sd": _mean_sd(v) for p, v in aucs.items()}}
        atomic_write_text(args.out, json.dumps(report, indent=2))

    table = Table(title=f"Local training throughput: {scenario.name} / {name} "
                        f"({report['train_impressions']} training impressions)")
    for col in ("tasks", "threads", "path", "rows/step", "steps/s", "examples/s", "examples/CPU-s",
                "x dense (CPU)", "load (1 min)"):
        table.add_column(col, justify="left" if col in ("tasks", "path") else "right")
    for r in report["results"]:
        ratio = report["speedup_cpu"].get(f"{r['mix']}|{r['threads']}") if r["path"] == "sparse" else None
        table.add_row(r["mix"], str(r["threads"]), r["path"], str(r["examples"] // r["steps"]),
                      f"{r['steps_per_s']:.1f}", f"{r['examples_per_s']:,.0f}",
                      f"{r['examples_per_cpu_s']:,.0f}", f"{ratio:.2f}" if ratio else "",
                      f"{r['loadavg_before'][0]:.1f}")
    console.print(table)
    if "ctr_auc" in report:
        a = report["ctr_auc"]
        console.print(f"test CTR AUC of {name} alone, {a['epochs']} epochs, seeds {a['seeds']}: dense (old path) "
                      f"{a['dense_mean_sd'][0]:.4f} +- {a['dense_mean_sd'][1]:.4f}, sparse "
                      f"{a['sparse_mean_sd'][0]:.4f} +- {a['sparse_mean_sd'][1]:.4f}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
