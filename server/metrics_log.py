"""The run's per-shop metric log: every shop's per-task metrics each round, rewritten atomically.

The coordinator keeps every shop's numbers (not only the average) so reports can show who gains
from federating. Columns match `simulations.rundir.METRIC_COLUMNS`; the server cannot import
`simulations`, so it writes the CSV itself with `shared.atomic`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from shared.atomic import atomic_write_csv
from shared.protocol import DP_EPSILON, LOSS, SPLIT_SEPARATOR, SPLITS, TASK_LOSS_PREFIX

METRIC_COLUMNS = ["method", "round", "shop", "task", "split", "metric", "value"]
ALL_TASKS = "all"  # task label of a shop's total training loss
PRIVACY_TASK = "privacy"  # task label of privacy rows (a shop's DP-SGD epsilon, the coordinator's central DP)


SPLIT_SEP = SPLIT_SEPARATOR  # evaluation keys may carry their split: 'test/ctr.auc'


def split_metric_key(key: str) -> tuple[str, str] | None:
    """`'[<split>/]<task>.<metric>'` -> (task, metric); None for keys that are not per-task metrics."""
    prefix, sep, rest = key.partition(SPLIT_SEP)
    if sep and prefix in SPLITS:
        key = rest
    task, sep, metric = key.partition(".")
    return (task, metric) if sep and task and metric else None


def key_split(key: str, default: str) -> str:
    """The split an evaluation key belongs to: its prefix, else ``default``."""
    prefix, sep, _ = key.partition(SPLIT_SEP)
    return prefix if sep and prefix in SPLITS else default


def train_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """(task, metric, value) rows from a training reply: `loss`, `loss-<task>` and the shop's DP-SGD epsilon."""
    rows = []
    for key, value in metrics.items():
        if key == LOSS:
            rows.append((ALL_TASKS, "loss", float(value)))
        elif key.startswith(TASK_LOSS_PREFIX):
            rows.append((key[len(TASK_LOSS_PREFIX):], "loss", float(value)))
        elif key == DP_EPSILON:  # the shop's own DP-SGD spend so far
            rows.append((PRIVACY_TASK, "epsilon", float(value)))
    return rows


def eval_rows_by_split(metrics: Mapping[str, float], default_split: str) -> dict[str, list[tuple[str, str, float]]]:
    """Evaluation rows grouped by split (keys like 'test/ctr.auc'; unprefixed keys go to ``default_split``)."""
    out: dict[str, list[tuple[str, str, float]]] = {}
    for key, value in metrics.items():
        parts = split_metric_key(key)
        if parts is not None:
            out.setdefault(key_split(key, default_split), []).append((parts[0], parts[1], float(value)))
    return out


def mean_by_key(per_shop: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each `<task>.<metric>` over the shops that report it (NaN ignored)."""
    sums: dict[str, list[float]] = {}
    for metrics in per_shop.values():
        for key, value in metrics.items():
            if split_metric_key(key) is not None and not math.isnan(float(value)):
                sums.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


class MetricsLog:
    """Rows of (method, round, shop, task, split, metric, value) kept in memory and on disk."""

    def __init__(self, path: Path, method: str) -> None:
        self.path = Path(path)
        self.method = method
        self.rows: list[dict] = []

    def resume(self, last_round: int) -> None:
        """Reload rows written by an earlier, interrupted run, dropping rounds after ``last_round``."""
        if not self.path.exists():
            return
        frame = pd.read_csv(self.path)
        missing = set(METRIC_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{self.path}: missing columns {sorted(missing)}; "
                             f"expected {METRIC_COLUMNS}. Fix: move the file away to start a fresh log")
        frame = frame[frame["round"] <= last_round]
        self.rows = frame[METRIC_COLUMNS].to_dict("records")

    def add(self, server_round: int, shop: str, split: str, rows: list[tuple[str, str, float]]) -> None:
        """Record one shop's (task, metric, value) rows for a round and split."""
        for task, metric, value in rows:
            self.rows.append({"method": self.method, "round": server_round, "shop": shop, "task": task,
                              "split": split, "metric": metric, "value": value})

    def write(self) -> Path:
        """Rewrite the whole CSV atomically (a crash never leaves half a file)."""
        return atomic_write_csv(self.path, pd.DataFrame(self.rows, columns=METRIC_COLUMNS))
