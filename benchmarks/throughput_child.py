"""One arm of the local-throughput comparison, run in its own process against whichever tree is on PYTHONPATH.

`benchmarks/local_throughput.py --baseline-ref REF` runs this script twice per repeat: once with PYTHONPATH
set to an export of REF (the trainer before a change) and once with the current tree, so both arms import
their own `shared` package and nothing of one leaks into the other. It uses only the API both trees have
(`load_scenario`, `build_shop_tensors`, `build_model`, `train_shop`, `evaluate_shop`, `TrainConfig`) and
prints one JSON object on stdout.

    PYTHONPATH=<tree> python benchmarks/throughput_child.py throughput --tasks ctr cvr --steps 300
    PYTHONPATH=<tree> python benchmarks/throughput_child.py auc --seed 0 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import shared
from shared.features import ShopTensors, build_shop_tensors
from shared.model import build_model
from shared.scenario import Scenario, load_scenario
from shared.train import evaluate_shop, train_shop


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


def throughput(scenario_name: str, tasks: list[str], threads: int, steps: int, warmup: int) -> dict[str, Any]:
    """Examples per CPU-second (and per wall second) of ``steps`` trainer steps after ``warmup`` untimed ones."""
    torch.set_num_threads(threads)
    scenario = load_scenario(scenario_name)
    name, tensors = largest_shop(scenario)
    missing = sorted(set(tasks) - set(tensors.tasks))
    if missing:
        raise SystemExit(f"throughput_child: the shop {name!r} lacks task(s) {missing}; pick a scenario whose "
                         "largest shop has every task")
    shop = replace(tensors, tasks=list(tasks))
    model = build_model(shop, scenario.model, scenario.features, seed=scenario.seed)
    cfg = replace(scenario.train, epochs=10_000, seed=scenario.seed)  # max_steps, not the epoch, ends each call
    train_shop(model, shop, replace(cfg, max_steps=warmup))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    train_shop(model, shop, replace(cfg, max_steps=steps))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    examples = steps * rows_per_step(shop, tasks, cfg.batch_size)
    return {"shop": name, "tasks": list(tasks), "threads": threads, "steps": steps, "examples": examples,
            "wall_s": wall, "cpu_s": cpu, "examples_per_s": examples / wall, "examples_per_cpu_s": examples / cpu,
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def ctr_auc(scenario_name: str, seed: int, epochs: int) -> dict[str, Any]:
    """Test CTR AUC of the largest shop trained alone for ``epochs`` rounds of one local epoch, at its best
    validation epoch (the reports' rule), on the world and model drawn from ``seed``."""
    torch.set_num_threads(1)
    scenario = load_scenario(scenario_name, {"seed": seed})
    _, tensors = largest_shop(scenario)
    model = build_model(tensors, scenario.model, scenario.features, seed=seed)
    best_val, test_at_best, cpu = -1.0, float("nan"), time.process_time()
    for epoch in range(epochs):
        train_shop(model, tensors, replace(scenario.train, epochs=1, seed=seed * 1000 + epoch))
        val = evaluate_shop(model, tensors, "val").get("ctr", {}).get("auc", float("nan"))
        if val > best_val:
            best_val, test_at_best = val, evaluate_shop(model, tensors, "test")["ctr"]["auc"]
    return {"seed": seed, "epochs": epochs, "val_auc": best_val, "test_auc": test_at_best,
            "cpu_s": time.process_time() - cpu}


def main(argv: list[str] | None = None) -> None:
    """Run one measurement and print it as JSON on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["throughput", "auc"])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--tasks", nargs="+", default=["ctr"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    if args.what == "throughput":
        out = throughput(args.scenario, args.tasks, args.threads, args.steps, args.warmup)
    else:
        out = ctr_auc(args.scenario, args.seed, args.epochs)
    out["shared_from"] = str(Path(shared.__file__).resolve().parent)  # which tree this arm really ran
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
