"""Property tests: any damage to a valid shop directory gives a ShopData or a ShopDataError, nothing else.

Damage covers cells (spreadsheet-mangled values included), headers, rows, bytes, whole files and
shop.toml. Examples are bounded (40-60 per test, no deadline) so the file runs in well under 30 s.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.schema import (
    EARLIEST,
    FUTURE_SLACK_S,
    INTERACTION_COLUMNS,
    ShopData,
    ShopDataError,
    check_shop_name,
    load_shop_dir,
    write_shop_dir,
)

FILES = ("interactions", "items", "users", "sales")
BASE = {
    "interactions": pd.DataFrame({
        "user_id": ["007", "8", "8", "9"], "item_id": ["A1", "A2", "A1", "A2"],
        "timestamp": ["1704067200", "2024-01-01T10:00:00Z", "1704153600", "1704240000"],
        "event": ["impression", "click", "cart", "purchase"], "device": ["web", "app", "web", "app"],
        "hour": ["1", "10", "23", "0"], "ctx_page": ["home", "search", "home", "cart"],
    }),
    "items": pd.DataFrame({"item_id": ["A1", "A2"], "category": ["A>B", ""], "brand": ["x", "y"],
                           "price": ["1.5", "0"], "global_key": ["0123", ""]}),
    "users": pd.DataFrame({"user_id": ["007", "8", "9"], "region": ["EU", "US", "EU"]}),
    "sales": pd.DataFrame({"item_id": ["A1", "A2"], "day": ["19723", "2024-01-02"], "units": ["1", "0"],
                           "promo": ["0", "1"]}),
}
BAD_VALUES = ["", " ", "NaN", "nan", "-1", "-0.5", "inf", "1e400", "1.5", "2", "true", "view", "purchase",
              "yesterday", "2024-13-45", "1700000000000", "0", "007", "A9", "\u00fc", "a,b", '"', "\r",
              # spreadsheet and clock damage
              "1.70407E+09", "1.00000E+19", "45292", "45292.5", "4102444800", "86400", "2099-01-01", " 8", "A1 ",
              "1,5", "\ufeff", "\x00", "1e19"]
cell_value = st.one_of(st.sampled_from(BAD_VALUES), st.text(max_size=6), st.integers(-10**12, 10**12),
                       st.floats(allow_nan=True, allow_infinity=True))
mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(FILES), st.integers(0, 10)),
    st.tuples(st.just("rename"), st.sampled_from(FILES), st.integers(0, 10), st.text(max_size=8)),
    st.tuples(st.just("cell"), st.sampled_from(FILES), st.integers(0, 10), st.integers(0, 10), cell_value),
    st.tuples(st.just("empty_rows"), st.sampled_from(FILES)),
    st.tuples(st.just("dup_row"), st.sampled_from(FILES), st.integers(0, 10)),
    st.tuples(st.just("unknown_item"), st.text(min_size=1, max_size=4)),
    st.tuples(st.just("remove_file"), st.sampled_from(FILES)),
    st.tuples(st.just("dup_header"), st.sampled_from(FILES), st.integers(0, 10), st.integers(0, 10)),
    st.tuples(st.just("drop_row"), st.sampled_from(FILES), st.integers(0, 10)),
)
byte_damage = st.one_of(
    st.tuples(st.just("empty_file"), st.sampled_from(FILES)),
    st.tuples(st.just("replace"), st.sampled_from(FILES), st.binary(max_size=64)),
    st.tuples(st.just("insert"), st.sampled_from(FILES), st.integers(0, 400), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.integers(0, 400)),
)


def mutate(frames: dict[str, pd.DataFrame | None], change: tuple) -> None:
    """Apply one table-level change to ``frames`` in place."""
    kind, *args = change
    if kind == "unknown_item":
        inter = frames["interactions"]
        if inter is not None and len(inter.columns):
            row = inter.iloc[[0]].copy() if len(inter) else pd.DataFrame(columns=inter.columns)
            if "item_id" in row.columns and len(row):
                row["item_id"] = args[0]
            frames["interactions"] = pd.concat([inter, row], ignore_index=True)
        return
    frame = frames[args[0]]
    if frame is None:
        return
    if kind == "remove_file":
        frames[args[0]] = None
    elif kind == "drop" and len(frame.columns):
        frames[args[0]] = frame.drop(columns=frame.columns[args[1] % len(frame.columns)])
    elif kind == "rename" and len(frame.columns):
        cols = list(frame.columns)
        cols[args[1] % len(cols)] = args[2]
        frame.columns = cols
    elif kind == "cell" and len(frame) and len(frame.columns):
        pos = args[2] % len(frame.columns)  # by position: a damaged header may repeat a name
        frame.isetitem(pos, frame.iloc[:, pos].astype(object))
        frame.iloc[args[1] % len(frame), pos] = args[3]
    elif kind == "empty_rows":
        frames[args[0]] = frame.iloc[0:0]
    elif kind == "dup_header" and len(frame.columns) > 1:
        cols = list(frame.columns)
        cols[args[1] % len(cols)] = cols[args[2] % len(cols)]
        frame.columns = cols
    elif kind == "drop_row" and len(frame):
        frames[args[0]] = frame.drop(index=frame.index[args[1] % len(frame)]).reset_index(drop=True)
    elif kind == "dup_row" and len(frame):
        frames[args[0]] = pd.concat([frame, frame.iloc[[args[1] % len(frame)]]], ignore_index=True)


def write_frames(root: Path, frames: dict[str, pd.DataFrame | None], fmt: str) -> None:
    """Write the (possibly damaged) tables as a shop directory."""
    root.mkdir()
    for stem, frame in frames.items():
        if frame is None:
            continue
        if fmt == "csv":
            (root / f"{stem}.csv").write_bytes(frame.to_csv(index=False).encode("utf-8", "surrogatepass"))
            continue
        typed = frame.copy()
        typed.columns = [str(c) for c in typed.columns]
        if len(set(typed.columns)) < len(typed.columns):
            continue  # Parquet cannot hold two columns of one name
        for col in typed.columns:  # numeric where possible, so Parquet holds typed columns too
            as_num = pd.to_numeric(typed[col], errors="coerce") if typed[col].dtype == object else typed[col]
            typed[col] = as_num if len(typed) and as_num.notna().all() else typed[col].astype(str)
        typed.to_parquet(root / f"{stem}.parquet", index=False)


def damage_bytes(root: Path, change: tuple) -> None:
    """Damage one file's bytes (empty, replace, insert random bytes, truncate)."""
    kind, stem, *args = change
    paths = list(root.glob(f"{stem}.*"))
    if not paths:
        return
    path = paths[0]
    data = path.read_bytes()
    if kind == "empty_file":
        data = b""
    elif kind == "replace":
        data = args[0]
    elif kind == "insert":
        pos = args[0] % (len(data) + 1)
        data = data[:pos] + args[1] + data[pos:]
    elif kind == "truncate":
        data = data[: args[0] % (len(data) + 1)]
    path.write_bytes(data)


TOMLS = ['name = "/tmp/x"\n', 'name = "../../"\n', 'name = ""\n', 'name = "a\\u0000b"\n', "name = 3\n",
         'currency = "euro"\n', "columns = 1\n", '[columns]\nuser_id = "item_id"\n', '[columns]\nevent = "nope"\n',
         '[events]\nimpression = "click"\n', '[events]\nview = "look"\n', 'timestamp_format = "%d/%m/%Y"\n',
         "[meta]\nx = 1\n", 'name = "ok shop"\ncurrency = "USD"\n', "unknown = 1\n", "= broken\n"]
file_damage = st.one_of(
    st.tuples(st.just("toml"), st.one_of(st.sampled_from(TOMLS), st.text(max_size=40))),
    st.tuples(st.just("toml_bytes"), st.binary(max_size=40)),
    st.tuples(st.just("twin"), st.sampled_from(FILES)),  # the same table as .csv and .parquet
    st.tuples(st.just("stray"), st.sampled_from(["items.xlsx", "sales.CSV", "users.parquet.bak", "notes.txt"])),
    st.tuples(st.just("folder"), st.sampled_from(FILES)),  # a folder named like a table file
)


def damage_files(root: Path, change: tuple) -> None:
    """Add, replace or shadow whole files of a shop directory."""
    kind, arg = change
    if kind == "toml":
        (root / "shop.toml").write_text(arg, encoding="utf-8", errors="surrogatepass")
    elif kind == "toml_bytes":
        (root / "shop.toml").write_bytes(arg)
    elif kind == "twin":
        for path in root.glob(f"{arg}.*"):
            frame = pd.read_csv(path, dtype=str) if path.suffix == ".csv" else pd.read_parquet(path)
            twin = path.with_suffix(".parquet" if path.suffix == ".csv" else ".csv")
            frame.to_parquet(twin) if twin.suffix == ".parquet" else frame.to_csv(twin, index=False)
    elif kind == "stray":
        (root / arg).write_bytes(b"x")
    elif kind == "folder":
        for path in root.glob(f"{arg}.*"):
            path.unlink()
        (root / f"{arg}.csv").mkdir()


def check_loads_or_explains(root: Path) -> None:
    """The property: a ShopData that meets the canonical contract, or a ShopDataError with a fix."""
    try:
        shop = load_shop_dir(root)
    except ShopDataError as exc:
        assert exc.file and exc.problem and exc.fix
        return
    assert isinstance(shop, ShopData)
    inter = shop.interactions
    assert list(inter.columns[: len(INTERACTION_COLUMNS)]) == list(INTERACTION_COLUMNS) and len(inter)
    assert inter["timestamp"].dtype == np.int64
    assert (inter["clicked"] >= inter["carted"]).all() and (inter["carted"] >= inter["purchased"]).all()
    assert inter[["clicked", "carted", "purchased"]].isin([0, 1]).all().all()
    assert (inter["quantity"] >= 0).all() and (inter["user_id"].str.strip() != "").all()
    for ids in (inter["user_id"], inter["item_id"]):  # no ID a spreadsheet or stray space damaged
        assert (ids == ids.str.strip()).all() and not ids.str.contains("E+", regex=False).any()
    assert inter["timestamp"].min() >= EARLIEST.timestamp()
    assert inter["timestamp"].max() <= time.time() + FUTURE_SLACK_S
    assert check_shop_name(shop.name) == shop.name
    if shop.items is not None:
        assert shop.items["item_id"].is_unique and inter["item_id"].isin(shop.items["item_id"]).all()
        assert "price" not in shop.items or (shop.items["price"] >= 0).all()
    shop.available_tasks()


# FEDSHOP_FUZZ_EXAMPLES=2000 fuzzes deeper by hand; the default keeps the file fast.
PROPERTY = settings(max_examples=int(os.environ.get("FEDSHOP_FUZZ_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(changes=st.lists(mutation, min_size=1, max_size=3), fmt=st.sampled_from(["csv", "parquet"]))
def test_table_damage_loads_or_raises_shop_data_error(changes: list[tuple], fmt: str) -> None:
    frames = {stem: frame.copy() for stem, frame in BASE.items()}
    for change in changes:
        mutate(frames, change)
    with tempfile.TemporaryDirectory() as tmp:
        write_frames(Path(tmp) / "shop", frames, fmt)
        check_loads_or_explains(Path(tmp) / "shop")


@PROPERTY
@given(change=byte_damage, fmt=st.sampled_from(["csv", "parquet"]))
def test_byte_damage_loads_or_raises_shop_data_error(change: tuple, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_frames(Path(tmp) / "shop", {stem: frame.copy() for stem, frame in BASE.items()}, fmt)
        damage_bytes(Path(tmp) / "shop", change)
        check_loads_or_explains(Path(tmp) / "shop")


@PROPERTY
@given(change=file_damage, fmt=st.sampled_from(["csv", "parquet"]))
def test_file_damage_loads_or_raises_shop_data_error(change: tuple, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_frames(Path(tmp) / "shop", {stem: frame.copy() for stem, frame in BASE.items()}, fmt)
        damage_files(Path(tmp) / "shop", change)
        check_loads_or_explains(Path(tmp) / "shop")


id_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                  max_size=5).filter(lambda s: s.strip() == s != "")  # outer spaces are refused on load


@settings(max_examples=20, deadline=None)
@given(ids=st.lists(id_text, min_size=2, max_size=6, unique=True), n=st.integers(1, 25), seed=st.integers(0, 99),
       fmt=st.sampled_from(["csv", "parquet"]))
def test_any_canonical_shop_round_trips(ids: list[str], n: int, seed: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)
    purchased = rng.integers(0, 2, n).astype("int8")
    inter = pd.DataFrame({
        "user_id": pd.Series(rng.choice(ids, n), dtype=str), "item_id": pd.Series(rng.choice(ids, n), dtype=str),
        "timestamp": rng.integers(int(EARLIEST.timestamp()), int(time.time()), n).astype("int64"),
        "clicked": np.maximum(purchased, rng.integers(0, 2, n)).astype("int8"), "carted": purchased,
        "purchased": purchased, "quantity": (purchased * rng.integers(1, 5, n)).astype("float32"),
    })
    items = pd.DataFrame({"item_id": pd.Series(ids, dtype=str), "price": rng.random(len(ids)) * 100})
    shop = ShopData("s", inter, items=items)
    with tempfile.TemporaryDirectory() as tmp:
        back = load_shop_dir(write_shop_dir(shop, Path(tmp) / "shop", fmt=fmt))
    pd.testing.assert_frame_equal(back.interactions, inter)
    pd.testing.assert_frame_equal(back.items, items)
