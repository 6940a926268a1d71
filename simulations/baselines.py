"""Non-federated runners: each shop alone (local-only) and all shops pooled (the centralized oracle).

Both evaluate validation after every epoch and test in the epochs a report can pick (each task's new
best validation score, and the last epoch; every epoch with `federation.test_every_round`), like the
federation's shops, so reports pick each shop's epoch by validation and compare methods on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from client.best_val import Record, next_tests
from shared.features import ShopTensors, build_shop_tensors, pool_shops
from shared.model import build_model
from shared.scenario import Scenario
from shared.train import evaluate_shop, train_shop

Progress = Callable[[str, int, int], None]


def metric_rows(method: str, round_: int, shop: str, results: dict[str, dict[str, float]], split: str
                ) -> list[dict[str, Any]]:
    """Flatten ``task -> metric -> value`` into metrics.csv rows."""
    return [{"method": method, "round": round_, "shop": shop, "task": task, "split": split, "metric": m,
             "value": float(v)} for task, metrics in results.items() for m, v in metrics.items()]


def compute_epochs(scenario: Scenario) -> int:
    """Epochs that match the federation's compute: rounds x local epochs."""
    return int(scenario.federation["rounds"]) * int(scenario.federation["local_epochs"])


def evaluate_val_then_test(model, view: ShopTensors, records: dict[str, Record], epoch: int, *, last: bool,
                           every: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Val, then test for the tasks a report can pick (`client.best_val`): the federation's shops' rule.

    Every task is tested in the ``last`` epoch and with ``every`` (`test_every_round`); ``records`` holds each
    view's validation primaries by epoch and is updated in place.
    """
    val = evaluate_shop(model, view, "val")
    tasks = None  # test every task: with test_every_round, and after the last epoch
    if not every and not last:  # the same rule as the federation's shops
        wanted, records[view.name] = next_tests(records.get(view.name, {}), epoch, val)
        tasks = [t for t in view.tasks if t not in set(val) - wanted]
    return val, evaluate_shop(model, view, "test", tasks=tasks)


def _train_and_log(method: str, model, train_on: ShopTensors, views: list[ShopTensors], epochs: int, seed: int,
                   scenario: Scenario, progress: Progress | None, label: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    every = bool(scenario.federation.get("test_every_round", False))
    records: dict[str, Record] = {}  # per view: its validation primaries by epoch (client.best_val)
    for epoch in range(1, epochs + 1):
        losses = train_shop(model, train_on, replace(scenario.train, epochs=1, seed=seed * 1000 + epoch))
        for view in views:
            val, test = evaluate_val_then_test(model, view, records, epoch, last=epoch == epochs, every=every)
            rows += metric_rows(method, epoch, view.name, val, "val")
            rows += metric_rows(method, epoch, view.name, test, "test")
            rows += [{"method": method, "round": epoch, "shop": view.name, "task": "all", "split": "train",
                      "metric": k, "value": v} for k, v in losses.items() if k.startswith("loss")]
        if progress:
            progress(label, epoch, epochs)
    return rows


def run_local_only(scenario: Scenario, *, epochs: int | None = None, progress: Progress | None = None
                   ) -> list[dict[str, Any]]:
    """Every training shop trains its own model on its own data only."""
    epochs = epochs or compute_epochs(scenario)
    rows: list[dict[str, Any]] = []
    for shop in scenario.training_shops():
        tensors = build_shop_tensors(shop, scenario.features)
        model = build_model(tensors, scenario.model, scenario.features, seed=scenario.seed)
        rows += _train_and_log("local", model, tensors, [tensors], epochs, scenario.seed, scenario, progress,
                               shop.name)
    return rows


def run_central(scenario: Scenario, *, epochs: int | None = None, progress: Progress | None = None
                ) -> list[dict[str, Any]]:
    """One model on all training shops' pooled data (the oracle privacy forbids), scored per shop."""
    epochs = epochs or compute_epochs(scenario)
    shops = scenario.training_shops()
    pooled, views = pool_shops(shops, scenario.features)
    for view, shop in zip(views, shops, strict=True):
        view.name = shop.name
    model = build_model(pooled, scenario.model, scenario.features, seed=scenario.seed)
    torch.manual_seed(scenario.seed)
    return _train_and_log("central", model, pooled, views, epochs, scenario.seed, scenario, progress, "pooled")
