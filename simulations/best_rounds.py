"""Reading metric rows: each shop's best-validation round, final tables, and Rich output."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from shared.protocol import SELECTION_METRICS

# The metric that picks a round per (method, shop, task) on validation, and whether higher is better.
PRIMARY: dict[str, tuple[str, bool]] = SELECTION_METRICS
HEADLINE = {"ctr": ["auc"], "cvr": ["auc", "ctcvr_auc"], "ranking": ["hr@10", "ndcg@10", "hr@10_s99", "ndcg@10_s99"],
            "sales": ["wape", "rmse"]}


def final_table(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Test metrics at the round each (method, shop, task) scored best on validation.

    Early stopping on a shop's own validation split is what a merchant would do; every method gets
    the same rule, so the comparison stays fair. Only rounds with test rows for the task are eligible:
    shops test only in rounds whose validation score is a new best (and the last round), which always
    include the first best-validation round (`client.best_val`). Returns columns method, shop, task,
    metric, value, round.
    """
    df = pd.DataFrame(rows)
    df = df[df["task"].isin(list(PRIMARY))]
    if df.empty:
        return pd.DataFrame(columns=["method", "shop", "task", "metric", "value", "round"])
    picks = []
    for (_method, _shop, task), grp in df.groupby(["method", "shop", "task"], sort=True):
        metric, higher = PRIMARY[task]
        tested = grp.loc[grp["split"] == "test", "round"].unique()
        val = grp[(grp["split"] == "val") & (grp["metric"] == metric) & grp["round"].isin(tested)]
        val = val.dropna(subset=["value"])
        if val.empty:  # no round has both splits (e.g. test only after the last round): the last tested round
            best_round = tested.max() if len(tested) else grp["round"].max()
        else:
            best_round = (val.loc[val["value"].idxmax()] if higher else val.loc[val["value"].idxmin()])["round"]
        test = grp[(grp["split"] == "test") & (grp["round"] == best_round)]
        picks.append(test.assign(round=best_round)[["method", "shop", "task", "metric", "value", "round"]])
    return pd.concat(picks, ignore_index=True)


def print_final_table(console: Console, table: pd.DataFrame, *, title: str) -> None:
    """One row per shop and task with the headline metrics of every method side by side."""
    if table.empty:
        console.print("[yellow]no metrics[/yellow]")
        return
    wide = table.pivot_table(index=["shop", "task", "metric"], columns="method", values="value")
    keep = [i for i in wide.index if i[2] in HEADLINE.get(i[1], [])]
    wide = wide.loc[keep]
    out = Table(title=title)
    for col in ["shop", "task", "metric", *wide.columns]:
        out.add_column(str(col), justify="right" if col in wide.columns else "left")
    for (shop, task, metric), values in wide.iterrows():
        out.add_row(shop, task, metric, *[f"{v:.4f}" if pd.notna(v) else "-" for v in values])
    console.print(out)
