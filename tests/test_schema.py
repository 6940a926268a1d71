"""Shop directory loading, validation errors (file, row, column, fix) and the write/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.schema import (
    INTERACTION_COLUMNS,
    ShopData,
    ShopDataError,
    derive_sales,
    load_shop_dir,
    write_shop_dir,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z

EVENT_LOG = f"""user_id,item_id,timestamp,event,device
007,A1,2024-01-01T10:00:00Z,impression,web
007,A1,2024-01-01T10:01:00Z,click,web
007,A1,{T0 + 10 * 3600 + 300},purchase,app
007,A1,{T0 + 10 * 3600 + 400},purchase,app
8,A2,{T0 + 3600},impression,web
8,A2,2024-01-02,cart,web
"""
ITEMS = "item_id,category,brand,price\nA1,Electronics>Phones,acme,3.5\nA2,,,0\n"


def make_dir(root: Path, **files: str | bytes) -> Path:
    """A shop directory with the given files (name with dots written as keyword with __)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = root / name.replace("__", ".")
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return root


def error_of(path: Path) -> ShopDataError:
    """The ShopDataError that loading ``path`` raises (fails the test if none is raised)."""
    with pytest.raises(ShopDataError) as info:
        load_shop_dir(path)
    return info.value


def label_shop(n: int = 40, seed: int = 0) -> ShopData:
    """A small canonical shop with every table and context column, for round trips."""
    rng = np.random.default_rng(seed)
    purchased = rng.integers(0, 2, n).astype("int8")
    carted = np.maximum(purchased, rng.integers(0, 2, n)).astype("int8")
    clicked = np.maximum(carted, rng.integers(0, 2, n)).astype("int8")
    items = pd.DataFrame({"item_id": [f"00{i}" for i in range(6)], "global_key": ["", "4006381333931"] * 3,
                          "category": ["A>B", "A>C", "", "D", "D", "A>B"], "brand": list("xyzxyz"),
                          "price": [0.0, 1.5, 2.25, 10.0, 3.0, 7.5], "item_color": list("rgbrgb")})
    inter = pd.DataFrame({
        "user_id": pd.Series([f"u{i:03d}" for i in rng.integers(0, 9, n)], dtype=str),
        "item_id": pd.Series([f"00{i}" for i in rng.integers(0, 6, n)], dtype=str),
        "timestamp": (T0 + rng.integers(0, 20 * DAY, n)).astype("int64"),
        "clicked": clicked, "carted": carted, "purchased": purchased,
        "quantity": (purchased * rng.integers(1, 4, n)).astype("float32"),
        "device": pd.Series(rng.choice(["web", "app"], n), dtype=str),
        "hour": rng.integers(0, 24, n).astype("int8"),
        "ctx_page": pd.Series(rng.choice(["home", "search"], n), dtype=str),
    })
    users = pd.DataFrame({"user_id": pd.Series([f"u{i:03d}" for i in range(9)], dtype=str),
                          "age_bucket": ["18-24"] * 9, "gender": list("fmfmfmfmf"), "region": ["EU"] * 9,
                          "user_score": np.linspace(0, 1, 9)})
    return ShopData("round trip", inter, items=items, users=users, sales=derive_sales(inter),
                    currency="USD", meta={"source": "test", "seed": seed})


# ----------------------------------------------------------------------------- happy paths
def test_event_log_collapses_to_one_exposure_row_per_user_item_day(tmp_path: Path) -> None:
    shop_dir = make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv=ITEMS)
    shop = load_shop_dir(shop_dir)
    inter = shop.interactions.set_index(["user_id", "item_id", "timestamp"])
    assert list(shop.interactions.columns) == [*INTERACTION_COLUMNS, "device"]
    # user 007 / A1 on Jan 1: impression, click, two purchases -> one row, earliest time, quantity 2
    row = inter.loc[("007", "A1", T0 + 10 * 3600)]
    assert (row["clicked"], row["carted"], row["purchased"], row["quantity"]) == (1, 1, 1, 2.0)
    assert row["device"] == "web"  # context of the earliest event
    # user 8 / A2: impression on Jan 1, cart on Jan 2 (ISO date) -> two days, cart implies click
    assert inter.loc[("8", "A2", T0 + 3600)][["clicked", "carted", "purchased"]].tolist() == [0, 0, 0]
    assert inter.loc[("8", "A2", T0 + DAY)][["clicked", "carted", "purchased"]].tolist() == [1, 1, 0]
    assert shop.interactions["user_id"].tolist().count("007") == 1  # "007" stays a string
    assert shop.interactions.dtypes["timestamp"] == np.int64
    assert shop.available_tasks() == ["ctr", "cvr", "ranking", "sales"]


def test_event_log_quantity_column_sums_purchase_rows_only(tmp_path: Path) -> None:
    log = f"user_id,item_id,timestamp,event,quantity\nu,i,{T0 + 10},click,\nu,i,{T0 + 20},purchase,3\n" \
          f"u,i,{T0 + 30},purchase,2\n"
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=log))
    assert shop.interactions["quantity"].tolist() == [5.0]
    assert shop.interactions["timestamp"].tolist() == [T0 + 10]


def test_label_form_purchase_implies_cart_and_click(tmp_path: Path) -> None:
    labels = f"user_id,item_id,timestamp,clicked,purchased\nu1,i1,{T0 + 5},0,1\nu1,i2,{T0 + 6},1,0\nu2,i1,{T0},0,0\n"
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=labels))
    inter = shop.interactions
    assert inter["clicked"].tolist() == [1, 1, 0]
    assert inter["carted"].tolist() == [1, 0, 0]
    assert inter["quantity"].tolist() == [1.0, 0.0, 0.0]


def test_shop_toml_maps_columns_and_names_the_shop(tmp_path: Path) -> None:
    log = "customer,sku,when,what\nc1,s1,1700000000,click\nc2,s2,1700000100,purchase\n"
    toml = 'name = "Corner shop"\ncurrency = "GBP"\n[columns]\nuser_id = "customer"\nitem_id = "sku"\n' \
           'timestamp = "when"\nevent = "what"\n'
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=log, shop__toml=toml,
                                  users__csv="customer,region\nc1,EU\nc2,US\n"))
    assert (shop.name, shop.currency) == ("Corner shop", "GBP")
    assert shop.users["user_id"].tolist() == ["c1", "c2"]
    assert shop.interactions["item_id"].tolist() == ["s1", "s2"]


def test_iso_and_unix_timestamps_agree(tmp_path: Path) -> None:
    iso = "user_id,item_id,timestamp,clicked\nu,i,2024-01-01T01:00:00+01:00,1\nu,j,2024-01-01 00:00:05,1\n"
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=iso))
    assert shop.interactions["timestamp"].tolist() == [T0, T0 + 5]


def test_unused_columns_are_reported_not_kept(tmp_path: Path) -> None:
    items = "item_id,price,title,item_color\nA1,1,Phone,red\nA2,2,Case,blue\n"
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv=items))
    assert "title" not in shop.items.columns and shop.items["item_color"].tolist() == ["red", "blue"]
    assert shop.meta["ignored_columns"] == {"items": ["title"]}


def test_derive_sales_zero_fills_from_each_items_first_sale_to_the_shops_last_day() -> None:
    inter = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "a", "b", "c"],
                          "timestamp": [T0, T0 + 2 * DAY, T0 + 3 * DAY, T0 + DAY],
                          "clicked": [1, 1, 1, 1], "carted": [1, 1, 0, 1], "purchased": [1, 1, 0, 1],
                          "quantity": [2.0, 1.0, 0.0, 4.0]})
    sales = derive_sales(inter)
    first = T0 // DAY
    assert sales["item_id"].tolist() == ["a"] * 4 + ["c"] * 3  # b was never bought; c first sold on day 1
    assert sales["day"].tolist() == list(range(first, first + 4)) + list(range(first + 1, first + 4))
    assert sales["units"].tolist() == [2, 0, 1, 0, 4, 0, 0]
    assert sales.dtypes.astype(str).to_dict() == {"item_id": "str", "day": "int32", "units": "float32",
                                                  "promo": "int8"}


def test_derive_sales_uses_weeks_for_long_logs_and_stops_a_few_periods_after_the_last_sale() -> None:
    years = 3 * 365 * DAY
    inter = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "a", "z"],
                          "timestamp": [T0, T0 + 8 * DAY, T0 + years], "clicked": [1, 1, 1], "carted": [1, 1, 1],
                          "purchased": [1, 1, 1], "quantity": [1.0, 3.0, 1.0]})
    sales = derive_sales(inter)
    a = sales[sales["item_id"] == "a"]
    assert len(a) == 2 + 8  # two weeks with sales, then SALES_TAIL_PERIODS zero weeks, not 3 years of days
    assert (np.diff(a["day"].to_numpy()) == 7).all()
    assert a["units"].tolist()[:2] == [1.0, 3.0]


def test_sales_file_with_iso_dates(tmp_path: Path) -> None:
    sales = "item_id,day,units,promo\nA1,2024-01-01,3,1\nA1,19724,0,0\n"
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv=ITEMS,
                                  sales__csv=sales))
    assert shop.sales["day"].tolist() == [T0 // DAY, 19724]
    assert shop.sales["promo"].tolist() == [1, 0] and shop.meta["sales_derived"] is False


# ----------------------------------------------------------------------------- round trip and writing
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_then_load_round_trips(tmp_path: Path, fmt: str) -> None:
    shop = label_shop()
    back = load_shop_dir(write_shop_dir(shop, tmp_path / "shop", fmt=fmt))
    assert (back.name, back.currency, back.meta["seed"]) == (shop.name, shop.currency, shop.meta["seed"])
    pd.testing.assert_frame_equal(back.interactions, shop.interactions)
    pd.testing.assert_frame_equal(back.items, shop.items)
    pd.testing.assert_frame_equal(back.users, shop.users)
    pd.testing.assert_frame_equal(back.sales, shop.sales)
    assert sorted(p.name for p in (tmp_path / "shop").iterdir()) == sorted(
        [f"{t}.{fmt}" for t in ("interactions", "items", "users", "sales")] + ["shop.toml"])


def test_write_refuses_a_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    target = make_dir(tmp_path / "shop", keep__txt="mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shop_dir(label_shop(), target)
    assert (target / "keep.txt").read_text() == "mine"
    write_shop_dir(label_shop(), target, fmt="parquet", overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "interactions.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shop"]  # no temp folders left behind


def test_write_into_an_existing_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    write_shop_dir(label_shop(), tmp_path / "shop")
    assert (tmp_path / "shop" / "interactions.csv").exists()


def test_validation_writes_nothing(tmp_path: Path) -> None:
    shop_dir = make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv="item_id,price\nA1,-1\n")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    error_of(shop_dir)
    load_shop_dir(make_dir(tmp_path / "ok", interactions__csv=EVENT_LOG))
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "ok" not in p.parts}
    assert before == after


# ----------------------------------------------------------------------------- one test per error kind
def test_missing_interactions_file_lists_what_was_found(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", items__csv=ITEMS))
    assert "missing interactions file" in str(err) and "items.csv" in str(err)
    assert "interactions.parquet" in err.fix


def test_missing_directory(tmp_path: Path) -> None:
    assert "no such shop directory" in str(error_of(tmp_path / "nope"))


def test_missing_column_suggests_columns_mapping(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv="customer_id,item_id,timestamp,event\nc,i,1,click\n"))
    assert err.file.endswith("interactions.csv") and err.column == "user_id"
    assert "customer_id" in err.problem  # lists what was found
    assert '[columns] user_id = "customer_id"' in err.fix


def test_mapping_to_a_column_not_in_the_file_says_so(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv="user_id,item_id,timestamp,what\nc,i,1,click\n",
                            shop__toml='[columns]\nevent = "action"\n'))
    assert (err.column, err.field) == ("action", "event") and 'maps event = "action"' in err.problem
    assert "column 'action' (field event)" in str(err)


def test_reversed_mapping_in_shop_toml(tmp_path: Path) -> None:
    toml = "[columns]\ncustomer = \"user_id\"\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, shop__toml=toml))
    assert err.file.endswith("shop.toml") and 'did you mean user_id = "customer"' in err.problem


def test_bad_toml(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, shop__toml="name = \n"))
    assert err.file.endswith("shop.toml") and "not valid TOML" in err.problem


def test_semicolon_csv_gets_a_delimiter_hint(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv="user_id;item_id;timestamp;event\nu;i;1;click\n"))
    assert "comma-separated" in err.fix


def test_unparseable_timestamp(tmp_path: Path) -> None:
    log = "user_id,item_id,timestamp,event\nu,i,1700000000,click\nu,i,yesterday,click\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=log))
    assert (err.row, err.column) == (3, "timestamp") and "'yesterday'" in err.problem
    assert "ISO-8601" in err.fix and "unix seconds" in err.fix


def test_millisecond_timestamps_are_caught(tmp_path: Path) -> None:
    log = "user_id,item_id,timestamp,event\nu,i,1700000000000,click\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=log))
    assert err.row == 2 and "milliseconds" in err.problem


@pytest.mark.parametrize(("price", "problem"), [("-2.5", "negative"), ("", "missing"), ("NaN", "missing"),
                                                ("cheap", "not a number")])
def test_bad_price(tmp_path: Path, price: str, problem: str) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG,
                            items__csv=f"item_id,price\nA1,1\nA2,{price}\n"))
    assert err.file.endswith("items.csv") and (err.row, err.column) == (3, "price")
    assert problem in err.problem and ">= 0" in err.fix


def test_unknown_event_lists_allowed_ones(tmp_path: Path) -> None:
    log = f"user_id,item_id,timestamp,event\nu,i,{T0},click\nu,i,{T0},click\nu,i,{T0},view\nu,i,{T0},wish\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=log))
    assert (err.row, err.column) == (4, "event") and "'view'" in err.problem and "1 more row" in err.problem
    assert all(e in err.fix for e in ("impression", "click", "cart", "purchase"))


def test_non_binary_label(tmp_path: Path) -> None:
    log = f"user_id,item_id,timestamp,clicked\nu,i,{T0},1\nu,i,{T0},2\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=log))
    assert (err.row, err.column) == (3, "clicked") and "0 or 1" in err.fix


def test_label_form_needs_clicked(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv="user_id,item_id,timestamp,rating\nu,i,1,5\n"))
    assert err.column == "clicked" and "event" in err.problem


@pytest.mark.parametrize(("file", "content", "column"), [
    ("interactions__csv", f"user_id,item_id,timestamp,clicked,purchased,quantity\nu,A1,{T0},1,1,-1\n", "quantity"),
    ("sales__csv", "item_id,day,units\nA1,19723,-3\n", "units"),
])
def test_negative_quantity_or_units(tmp_path: Path, file: str, content: str, column: str) -> None:
    files = {"interactions__csv": EVENT_LOG, "items__csv": ITEMS, file: content}
    err = error_of(make_dir(tmp_path / "s", **files))
    assert (err.row, err.column) == (2, column) and "negative" in err.problem


@pytest.mark.parametrize(("file", "content", "column", "row"), [
    ("items__csv", "item_id,price\nA1,1\nA2,2\nA1,3\n", "item_id", 4),
    ("users__csv", "user_id,region\n007,EU\n7,EU\n007,US\n", "user_id", 4),
])
def test_duplicate_rows_name_both_rows(tmp_path: Path, file: str, content: str, column: str, row: int) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, **{file: content}))
    assert (err.row, err.column) == (row, column) and "already on row 2" in err.problem


def test_duplicate_sales_day(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv=ITEMS,
                            sales__csv="item_id,day,units\nA1,19723,1\nA1,2024-01-01,2\n"))
    assert err.row == 3 and "duplicate" in err.problem


@pytest.mark.parametrize("content", ["user_id,item_id,timestamp,event\n", "", "\n\n"])
def test_empty_shop(tmp_path: Path, content: str) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=content))
    assert err.file.endswith("interactions.csv") and "empty" in err.problem


def test_interactions_naming_unknown_items(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG, items__csv="item_id\nA1\n"))
    assert err.file.endswith("interactions.csv") and (err.row, err.column) == (6, "item_id")
    assert "items.csv" in err.problem and "'A2'" in err.problem and "add the missing" in err.fix


def test_empty_id(tmp_path: Path) -> None:
    log = "user_id,item_id,timestamp,event\nu,i,1,click\n ,i,2,click\n"
    err = error_of(make_dir(tmp_path / "s", interactions__csv=log))
    assert (err.row, err.column) == (3, "user_id") and "empty ID" in err.problem


def test_non_utf8_bytes_name_the_row(tmp_path: Path) -> None:
    data = b"user_id,item_id,timestamp,event\nu,i,1,click\n" + "Müller,i,2,click\n".encode("latin-1")
    err = error_of(make_dir(tmp_path / "s", interactions__csv=data))
    assert err.row == 3 and "not UTF-8" in err.problem and "UTF-8" in err.fix


def test_unreadable_parquet(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__parquet=b"PAR1 this is not parquet"))
    assert err.file.endswith("interactions.parquet") and "unreadable Parquet" in err.problem


def test_unknown_extension(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__xlsx=b"PK\x03\x04"))
    assert err.file.endswith("interactions.xlsx") and ".csv or interactions.parquet" in err.fix


def test_two_interaction_files_are_ambiguous(tmp_path: Path) -> None:
    shop_dir = make_dir(tmp_path / "s", interactions__csv=EVENT_LOG)
    pd.read_csv(shop_dir / "interactions.csv").to_parquet(shop_dir / "interactions.parquet")
    assert "several interactions files" in str(error_of(shop_dir))


def test_parquet_typed_columns_load(tmp_path: Path) -> None:
    shop_dir = make_dir(tmp_path / "s")
    pd.DataFrame({"user_id": [7, 8], "item_id": [1.0, 2.0], "event": ["click", "purchase"],
                  "timestamp": pd.to_datetime(["2024-01-01", "2024-01-02"])}).to_parquet(
        shop_dir / "interactions.parquet")
    inter = load_shop_dir(shop_dir).interactions
    assert inter["user_id"].tolist() == ["7", "8"] and inter["item_id"].tolist() == ["1", "2"]
    assert inter["timestamp"].tolist() == [T0, T0 + DAY]


# ----------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (REAL_DATA / "amazon-ratings" / "ratings.csv").exists(),
                    reason="real data samples not present at ../shared/data (outside the repo)")
def test_amazon_ratings_as_a_merchant_export(tmp_path: Path) -> None:
    raw = pd.read_csv(REAL_DATA / "amazon-ratings" / "ratings.csv", header=None, dtype=str,
                      names=["reviewer", "asin", "rating", "unix"], nrows=5000)
    raw["bought"] = (raw["rating"].astype(float) >= 4).astype(int)
    raw["seen"] = 1
    shop_dir = make_dir(tmp_path / "amazon", shop__toml='name = "amazon"\n[columns]\nuser_id = "reviewer"\n'
                        'item_id = "asin"\ntimestamp = "unix"\nclicked = "seen"\npurchased = "bought"\n')
    raw.to_csv(shop_dir / "interactions.csv", index=False)
    shop = load_shop_dir(shop_dir)
    assert len(shop.interactions) == 5000 and shop.meta["ignored_columns"] == {"interactions": ["rating"]}
    assert shop.interactions["item_id"].isin(raw["asin"]).all()
    assert "ranking" in shop.available_tasks() and "ctr" not in shop.available_tasks()



def test_per_file_mapping_leaves_other_files_alone(tmp_path: Path) -> None:
    inter = f"user_id,item_id,timestamp,clicked,purchased,quantity\nu,A1,{T0},1,1,2\n"
    toml = '[columns.sales]\nunits = "quantity"\n'
    shop = load_shop_dir(make_dir(tmp_path / "s", interactions__csv=inter, shop__toml=toml,
                                  sales__csv="item_id,day,quantity\nA1,19723,2\n"))
    assert shop.interactions["quantity"].tolist() == [2.0] and shop.sales["units"].tolist() == [2.0]


def test_missing_units_suggests_a_per_file_mapping(tmp_path: Path) -> None:
    err = error_of(make_dir(tmp_path / "s", interactions__csv=EVENT_LOG,
                            sales__csv="item_id,day,quantity\nA1,0,2\n"))
    assert err.column == "units" and '[columns.sales] units = "quantity"' in err.fix


def test_a_typed_table_skips_the_header_search_but_numeric_header_names_are_still_checked() -> None:
    """Parquet columns arrive typed: a numeric column cannot hold a text header, unless the name reads as a number."""
    from shared.schema import ShopDataError, _refuse_doubled_file

    _refuse_doubled_file(pd.DataFrame({"user": [1, 2, 3], "item": [4, 5, 6]}), Path("t.parquet"))
    with pytest.raises(ShopDataError, match="row 3 repeats the header row"):
        _refuse_doubled_file(pd.DataFrame({"2024": [1, 2024, 3], "7": [5, 7, 6]}), Path("t.parquet"))
