"""Shop data: the canonical in-memory form every loader produces, and the merchant file format.

Every source (a merchant's directory, the synthetic world, the real-data adapters) ends as one
`ShopData`, so features, tasks and training never care where data came from.

Canonical tables (pandas, one row per record):

* ``interactions`` — one row per *exposure* of an item to a user:
  ``user_id: str, item_id: str, timestamp: int64 (unix seconds), clicked: int8 {0,1},
  carted: int8 {0,1}, purchased: int8 {0,1}, quantity: float32 >= 0``, optional context columns
  ``device: str``, ``hour: int8 0..23`` and any extra ``ctx_*`` columns (str = categorical,
  number = numeric). A shop whose log holds only positives (ratings, purchases) has ``clicked`` all
  1 and no CTR task, unless an adapter samples non-interactions as impressions.
* ``items`` (optional) — ``item_id: str`` unique, optional ``global_key: str`` (GTIN/EAN/catalog ID;
  empty string = none), ``category: str`` (global taxonomy path, ``"Electronics>Phones"``),
  ``brand: str``, ``price: float >= 0``, extra ``item_*`` side columns.
* ``users`` (optional) — ``user_id: str`` unique, optional ``age_bucket, gender, region: str``, extra
  ``user_*`` side columns.
* ``sales`` (optional) — daily units per item: ``item_id: str, day: int32 (days since epoch),
  units: float32 >= 0, promo: int8 {0,1}``. Derived from purchases when a shop supplies none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

EVENTS = ("impression", "click", "cart", "purchase")
TASKS = ("ctr", "cvr", "ranking", "sales")

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "clicked", "carted", "purchased", "quantity")
ITEM_SIDE_COLUMNS = ("category", "brand", "price")
USER_SIDE_COLUMNS = ("age_bucket", "gender", "region")
SALES_COLUMNS = ("item_id", "day", "units", "promo")


class ShopDataError(ValueError):
    """Bad shop data: the message names the file, row, column and the fix."""

    def __init__(self, file: str, problem: str, fix: str, *, row: int | None = None,
                 column: str | None = None) -> None:
        self.file, self.problem, self.fix, self.row, self.column = file, problem, fix, row, column
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


@dataclass
class ShopData:
    """One shop's data in canonical form (see module docstring for the columns)."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    sales: pd.DataFrame | None = None
    currency: str = "EUR"
    meta: dict = field(default_factory=dict)  # free-form provenance (source, region, ...)

    def available_tasks(self) -> list[str]:
        """Tasks this shop's data supports: CTR needs non-clicks, CVR needs clicks and purchases."""
        inter = self.interactions
        tasks: list[str] = []
        clicked = inter["clicked"]
        if (clicked == 0).any() and (clicked == 1).any():
            tasks.append("ctr")
        clicks = inter[clicked == 1]
        if len(clicks) and (clicks["purchased"] == 1).any() and (clicks["purchased"] == 0).any():
            tasks.append("cvr")
        if (clicked == 1).sum() >= 2 and inter["item_id"].nunique() >= 2:
            tasks.append("ranking")
        if self.sales is not None and len(self.sales) and self.sales["units"].sum() > 0:
            tasks.append("sales")
        return tasks
