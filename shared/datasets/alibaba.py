"""AliExpress and Ali-CCP multi-task logs (CTR + conversion labels) as one shop each.

Both formats are flat CSVs of impressions with a click and a conversion label and anonymised feature
columns. Categorical features become string ``ctx_<name>`` columns and numeric ones float32
``ctx_<name>`` columns on the interactions. Neither format has a time column, so ``timestamp`` is the
row order (0, 1, 2, ... over the files in train, validation, test order): a temporal split of these
shops is a row-order split, which keeps the published train rows before the test rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from shared.datasets.movielens import parse_numbers, read_delimited, require_nonempty
from shared.schema import ShopData, ShopDataError

NO_ID = "na"  # user_id/item_id when a format has none: one pseudo-item means no ranking task
SPLIT_ORDER = ("train", "val", "test")  # files in a folder are concatenated in this order

ALIEXPRESS_CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERICAL = tuple(f"numerical_{i}" for i in range(1, 64))

# Ali-CCP field IDs (ESMM paper's dataset notes): 101 user ID; 121-129 user profile (profile ID, group,
# gender, age, consumption levels, occupation, geography); 205 item ID; 206 category; 207 shop;
# 210 intention node; 216 brand; 508/509/702/853 user x item cross features; 301 position/scene;
# 109_14/110_14/127_14/150_14 the user's recent categories/shops/brands/intentions. Columns starting with
# "D" are their dense (numeric) values.
# Every other column is a categorical field (23 in the published files, IDs included).
ALI_CCP_USER, ALI_CCP_ITEM = "101", "205"


def _split_rank(file: Path) -> tuple[int, str]:
    """Sort key putting train before validation before test files, others last by name."""
    name = file.name.lower()
    for rank, split in enumerate(SPLIT_ORDER):
        if split in name:
            return rank, name
    return len(SPLIT_ORDER), name


def read_log_files(path: str | Path, *, required: tuple[str, ...], is_numeric: Callable[[str], bool],
                   ) -> tuple[pd.DataFrame, list[tuple[Path, int]]]:
    """Read one CSV, or every CSV in a folder (train, val, test order), with ``_file`` and ``_line`` columns.

    Columns for which ``is_numeric(name)`` holds are float64 when they all parse, else strings.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(root.glob("*.csv"), key=_split_rank)
        if not files:
            raise ShopDataError(str(root), "no .csv files in the folder",
                                "put the train/val/test CSV files in this folder or pass one file")
    elif root.is_file():
        files = [root]
    else:
        raise ShopDataError(str(root), "file or folder not found", "pass an existing CSV file or a folder of them")
    frames, sources = [], []
    columns: list[str] | None = None
    for file in files:
        with file.open(encoding="utf-8", errors="replace") as fh:
            header = fh.readline().rstrip("\r\n").split(",")
        frame = read_delimited(file, sep=",", numeric=[c for c in header if is_numeric(c)])
        if columns is not None and list(frame.columns) != columns:
            raise ShopDataError(str(file), "columns differ from the first file's",
                                f"give every file the same header as {files[0].name}")
        missing = [c for c in required if c not in frame.columns]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ShopDataError(str(file), f"missing columns {missing[:3]}{more}",
                                f"the header must hold {', '.join(required[:4])}, ... (see the format's docs)",
                                column=missing[0])
        columns = list(frame.columns)
        frame["_file"] = str(file)
        frame["_line"] = np.arange(2, len(frame) + 2)
        frames.append(frame)
        sources.append((file, len(frame)))
    log = pd.concat(frames, ignore_index=True)
    if log.empty:
        raise ShopDataError(str(root), "no data rows", "supply at least one row below the header")
    return log, sources


def _column_numbers(log: pd.DataFrame, column: str, **bounds: float) -> np.ndarray:
    """Parse one column of a multi-file log, naming the right file and line on a bad value."""
    out = np.empty(len(log), np.float64)
    for file, part in log.groupby("_file", sort=False):
        out[part.index] = parse_numbers(part[column], file=Path(file), column=column,
                                        first_line=int(part["_line"].iloc[0]), **bounds)
    return out


def _labels(log: pd.DataFrame, click: str, purchase: str, repair: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated 0/1 click and purchase labels; purchase without click raises unless repaired."""
    clicked = _column_numbers(log, click, low=0, high=1)
    bought = _column_numbers(log, purchase, low=0, high=1)
    for column, values in ((click, clicked), (purchase, bought)):
        fractional = values != np.round(values)
        if fractional.any():
            i = int(np.flatnonzero(fractional)[0])
            raise ShopDataError(log["_file"].iat[i], f"label {values[i]} is not 0 or 1", "use 0 or 1",
                                row=int(log["_line"].iat[i]), column=column)
    orphan = (bought == 1) & (clicked == 0)
    if orphan.any() and not repair:
        i = int(np.flatnonzero(orphan)[0])
        raise ShopDataError(log["_file"].iat[i], f"{purchase}=1 but {click}=0 ({int(orphan.sum())} such rows)",
                            f"a conversion counts only after a click: fix the row, or pass repair=True to "
                            f"set {purchase}=0 on such rows", row=int(log["_line"].iat[i]), column=purchase)
    # Repair drops the conversion (ESMM's post-click definition) rather than inventing a click.
    bought[orphan] = 0
    return clicked.astype(np.int8), bought.astype(np.int8), int(orphan.sum())


def _ids(log: pd.DataFrame, column: str | None) -> pd.Series:
    """An ID column as str, or the constant NO_ID when the format has none."""
    if column is None:
        return pd.Series([NO_ID] * len(log), dtype=str)
    return log[column].str.strip().astype(str)


def _build_shop(log: pd.DataFrame, sources: list[tuple[Path, int]], *, name: str, source: str,
                user: str | None, item: str | None, categorical: list[str], numerical: list[str],
                click: str, purchase: str, repair: bool) -> ShopData:
    """Canonical interactions (row-order timestamps, ctx_ features) from a validated log."""
    for column in [c for c in (user, item) if c]:
        for file, part in log.groupby("_file", sort=False):
            require_nonempty(part[column], file=Path(file), column=column, first_line=int(part["_line"].iloc[0]))
    clicked, bought, repaired = _labels(log, click, purchase, repair)
    inter = pd.DataFrame({
        "user_id": _ids(log, user),
        "item_id": _ids(log, item),
        "timestamp": np.arange(len(log), dtype=np.int64),
        "clicked": clicked, "carted": bought, "purchased": bought, "quantity": bought.astype(np.float32),
    })
    features = {f"ctx_{c}": log[c].str.strip().astype(str) for c in categorical}
    features |= {f"ctx_{c}": _column_numbers(log, c).astype(np.float32) for c in numerical}
    inter = pd.concat([inter, pd.DataFrame(features)], axis=1)
    meta = {"source": source, "files": [(str(f), n) for f, n in sources], "timestamp": "row order",
            "repaired_rows": repaired}
    return ShopData(name=name, interactions=inter, meta=meta)


def load_aliexpress(path: str | Path, *, name: str, repair: bool = False) -> ShopData:
    """An AliExpress file (or folder of train/test files): search_id, categorical_1..16, numerical_1..63, labels."""
    required = ("search_id", *ALIEXPRESS_CATEGORICAL, *ALIEXPRESS_NUMERICAL, "click", "conversion")
    numeric = {*ALIEXPRESS_NUMERICAL, "click", "conversion"}
    log, sources = read_log_files(path, required=required, is_numeric=numeric.__contains__)
    return _build_shop(log, sources, name=name, source="aliexpress", user="search_id", item=None,
                       categorical=list(ALIEXPRESS_CATEGORICAL), numerical=list(ALIEXPRESS_NUMERICAL),
                       click="click", purchase="conversion", repair=repair)


def load_ali_ccp(path: str | Path, *, name: str, repair: bool = False) -> ShopData:
    """An Ali-CCP file (or folder of train/val/test files): click, purchase, categorical fields, D* numeric."""
    log, sources = read_log_files(path, required=("click", "purchase"),
                                  is_numeric=lambda c: c in ("click", "purchase") or c.startswith("D"))
    fields = [c for c in log.columns if c not in ("click", "purchase", "_file", "_line")]
    if not fields:
        raise ShopDataError(sources[0][0].as_posix(), "no feature columns after click, purchase",
                            "keep the Ali-CCP feature columns (101, 121, ..., 205, ..., D509) in the file")
    user = ALI_CCP_USER if ALI_CCP_USER in fields else None
    item = ALI_CCP_ITEM if ALI_CCP_ITEM in fields else None
    # IDs stay local (user_id/item_id), never shared ctx_ fields.
    categorical = [c for c in fields if not c.startswith("D") and c not in (ALI_CCP_USER, ALI_CCP_ITEM)]
    numerical = [c for c in fields if c.startswith("D")]
    return _build_shop(log, sources, name=name, source="ali-ccp", user=user, item=item,
                       categorical=categorical, numerical=numerical, click="click", purchase="purchase",
                       repair=repair)
