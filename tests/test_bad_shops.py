"""A catalogue of malformed shop directories: each is refused with a specific message, both by
`load_shop_dir` and by `fedshop validate` (exit 1, no traceback), and nothing is written.

Threat model: a merchant's export is damaged (spreadsheets, encodings, clocks) or hostile (a shop name
that is a path, a pipe or a huge file where a CSV should be). Whatever the directory holds, fedshop
either loads a shop that meets the canonical contract or says what is wrong, where, and how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from shared.features import FeatureConfig
from shared.scenario import ScenarioError, scenario_from_dict
from shared.schema import (
    MAX_FILE_MB_ENV,
    SPLIT_FRACTIONS,
    ShopDataError,
    check_shop_name,
    load_shop_dir,
    temporal_split_counts,
)
from shared.settings import ShopRoundSettings
from simulations.commands import validate

DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
N_ROWS = 60
EVENTS = ("impression", "click", "cart", "purchase")
BASE_TOML = 'name = "base-shop"\ncurrency = "EUR"\n[columns]\nuser_id = "customer"\n'


def base_frames() -> dict[str, pd.DataFrame]:
    """A valid shop (event log over 30 days, catalog, users, sales) whose user column is 'customer'."""
    rng = np.random.default_rng(0)
    inter = pd.DataFrame({
        "customer": [f"c{i % 12:02d}" for i in range(N_ROWS)],
        "item_id": [f"A{i % 7}" for i in range(N_ROWS)],
        "timestamp": [str(T0 + i * DAY // 2) for i in range(N_ROWS)],
        "event": [EVENTS[i % 4] for i in range(N_ROWS)],
        "quantity": ["1" if i % 4 == 3 else "" for i in range(N_ROWS)],
        "hour": [str(int(h)) for h in rng.integers(0, 24, N_ROWS)],
    })
    items = pd.DataFrame({"item_id": [f"A{i}" for i in range(7)], "price": [f"{1.5 * i:.2f}" for i in range(7)],
                          "category": ["Home>Lamps"] * 7})
    users = pd.DataFrame({"customer": [f"c{i:02d}" for i in range(12)], "region": ["EU"] * 12})
    sales = pd.DataFrame({"item_id": ["A1", "A2"], "day": ["19723", "2024-01-02"], "units": ["3", "0"]})
    return {"interactions": inter, "items": items, "users": users, "sales": sales}


def write_base(root: Path) -> Path:
    """Write the valid base shop into ``root`` (CSV files and shop.toml)."""
    root.mkdir(parents=True)
    for stem, frame in base_frames().items():
        frame.to_csv(root / f"{stem}.csv", index=False)
    (root / "shop.toml").write_text(BASE_TOML, encoding="utf-8")
    return root


def set_cell(root: Path, stem: str, column: str, row: int, value: str) -> None:
    """Rewrite one cell of a CSV file of the shop (``row`` counts data rows from 0)."""
    frame = pd.read_csv(root / f"{stem}.csv", dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(root / f"{stem}.csv", index=False)


def header_only(root: Path, stem: str) -> None:
    """Keep only the header line of a CSV file."""
    path = root / f"{stem}.csv"
    path.write_text(path.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")


def toml(text: str) -> Callable[[Path], None]:
    """A damage that replaces shop.toml."""
    return lambda root: (root / "shop.toml").write_text(text, encoding="utf-8")


def cell(stem: str, column: str, value: str, row: int = 4) -> Callable[[Path], None]:
    """A damage that sets one cell."""
    return lambda root: set_cell(root, stem, column, row, value)


def raw(name: str, data: bytes) -> Callable[[Path], None]:
    """A damage that replaces one file's bytes."""
    return lambda root: (root / name).write_bytes(data)


def as_parquet_too(root: Path) -> None:
    pd.read_csv(root / "interactions.csv", dtype=str).to_parquet(root / "interactions.parquet")


def parquet_not_parquet(root: Path) -> None:
    (root / "interactions.csv").unlink()
    (root / "interactions.parquet").write_bytes(b"PAR1 this is not parquet")


def float_ids_above_2_53(root: Path) -> None:
    frame = pd.read_csv(root / "interactions.csv", dtype=str, keep_default_na=False)
    frame["customer"] = [1e19 + 4096.0 * (i % 3) for i in range(len(frame))]  # three users, one float
    (root / "interactions.csv").unlink()
    (root / "users.csv").unlink()
    frame.to_parquet(root / "interactions.parquet")


def outlier(when: int) -> Callable[[Path], None]:
    return cell("interactions", "timestamp", str(when), row=N_ROWS - 1)


def huge_sparse_file(root: Path) -> None:
    with open(root / "interactions.csv", "r+b") as handle:  # a sparse 1 GiB file: no disk is written
        handle.truncate(2**30)


def fifo(root: Path) -> None:
    (root / "interactions.csv").unlink()
    os.mkfifo(root / "interactions.csv")


def dangling_link(root: Path) -> None:
    (root / "items.csv").unlink()
    (root / "items.csv").symlink_to(root / "nowhere.csv")


def unsafe_folder(root: Path) -> None:
    (root / "shop.toml").write_text('[columns]\nuser_id = "customer"\n', encoding="utf-8")


def toml_is_a_folder(root: Path) -> None:
    (root / "shop.toml").unlink()
    (root / "shop.toml").mkdir()


def two_mapped_to_one(root: Path) -> None:
    toml(BASE_TOML + 'item_id = "customer"\n')(root)


def header_edit(old: str, new: str, stem: str = "interactions") -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / f"{stem}.csv"
        lines = path.read_text(encoding="utf-8").split("\n")
        lines[0] = lines[0].replace(old, new)
        path.write_text("\n".join(lines), encoding="utf-8")
    return change


def reencode(encoding: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        set_cell(root, "users", "region", 2, "Zürich")
        (root / "users.csv").write_bytes((root / "users.csv").read_text(encoding="utf-8").encode(encoding))
    return change


def file_twice(with_header: bool) -> Callable[[Path], None]:
    """A damage that pastes interactions.csv's rows (and, if asked, its header) under themselves."""
    def change(root: Path) -> None:
        lines = (root / "interactions.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "interactions.csv").write_text("".join(lines + (lines if with_header else lines[1:])),
                                               encoding="utf-8")
    return change


@dataclass(frozen=True)
class Case:
    """One malformed directory: how to damage the base shop, the message fragment and where it points."""

    id: str
    damage: Callable[[Path], None]
    fragment: str
    file: str | None = None  # the file name the error must name
    column: str | None = None  # the column as the merchant's file names it
    row: int | None = None


LAST = N_ROWS + 1  # spreadsheet row of the last data row
CASES = [
    # time: far future / past, Excel damage, outliers that empty a split
    Case("future-timestamp", cell("interactions", "timestamp", "4102444800"), "in the future",
         "interactions.csv", "timestamp", 6),
    Case("future-iso-timestamp", cell("interactions", "timestamp", "2099-03-01T10:00:00Z"), "in the future",
         "interactions.csv", "timestamp", 6),
    Case("past-timestamp", cell("interactions", "timestamp", "86400"), "before 1990-01-01",
         "interactions.csv", "timestamp", 6),
    Case("negative-timestamp", cell("interactions", "timestamp", "-5"), "before 1990-01-01",
         "interactions.csv", "timestamp", 6),
    Case("excel-serial-date", cell("interactions", "timestamp", "45292"), "Excel serial date",
         "interactions.csv", "timestamp", 6),
    Case("excel-serial-datetime", cell("interactions", "timestamp", "45292.4375"), "Excel serial date",
         "interactions.csv", "timestamp", 6),
    Case("excel-scientific-timestamp", cell("interactions", "timestamp", "1.70407E+09"), "scientific notation",
         "interactions.csv", "timestamp", 6),
    Case("millisecond-timestamp", cell("interactions", "timestamp", str(T0 * 1000)), "milliseconds",
         "interactions.csv", "timestamp", 6),
    Case("unparseable-timestamp", cell("interactions", "timestamp", "31/01/2024"), "unparseable timestamp",
         "interactions.csv", "timestamp", 6),
    Case("nan-timestamp", cell("interactions", "timestamp", "NaN"), "unparseable timestamp",
         "interactions.csv", "timestamp", 6),
    Case("inf-timestamp", cell("interactions", "timestamp", "inf"), "unparseable timestamp",
         "interactions.csv", "timestamp", 6),
    Case("old-outlier-empties-validation", outlier(T0 - 5 * 365 * DAY), "leaves validation without rows",
         "interactions.csv", "timestamp", LAST),
    Case("late-outlier-empties-validation", outlier(T0 + 2 * 365 * DAY), "leaves validation without rows",
         "interactions.csv", "timestamp", LAST),
    Case("sales-day-excel-serial", cell("sales", "day", "45292", row=0), "day in the future", "sales.csv", "day", 2),
    Case("sales-day-far-past", cell("sales", "day", "100", row=0), "day before 1990-01-01", "sales.csv", "day", 2),
    Case("sales-day-scientific", cell("sales", "day", "1.9723E+04", row=0), "scientific notation",
         "sales.csv", "day", 2),
    # IDs
    Case("excel-scientific-user-id", cell("interactions", "customer", "1.00000E+19"), "scientific notation",
         "interactions.csv", "customer", 6),
    Case("excel-scientific-item-id", cell("items", "item_id", "4.00638E+12", row=0), "scientific notation",
         "items.csv", "item_id", 2),
    Case("float-ids-above-2^53", float_ids_above_2_53, "above 2^53", "interactions.parquet", "customer", 2),
    Case("id-trailing-space", cell("interactions", "customer", "c04 "), "leading or trailing spaces",
         "interactions.csv", "customer", 6),
    Case("id-leading-space-in-catalog", cell("items", "item_id", " A0", row=0), "leading or trailing spaces",
         "items.csv", "item_id", 2),
    Case("empty-id", cell("interactions", "item_id", ""), "empty ID", "interactions.csv", "item_id", 6),
    Case("unknown-item", cell("interactions", "item_id", "Z9"), "not found in items.csv",
         "interactions.csv", "item_id", 6),
    Case("duplicate-item-row", cell("items", "item_id", "A0", row=3), "duplicate item row", "items.csv", "item_id", 5),
    Case("duplicate-user-row", cell("users", "customer", "c00", row=1), "duplicate user row", "users.csv",
         "customer", 3),
    Case("sales-unknown-item", cell("sales", "item_id", "Z9", row=0), "not found in items.csv", "sales.csv",
         "item_id", 2),
    # headers and columns
    Case("file-twice-with-header", file_twice(True), "repeats the header row: the file holds two copies",
         "interactions.csv", None, N_ROWS + 2),
    Case("file-twice-rows-only", file_twice(False), "exactly: the file holds its rows twice", "interactions.csv",
         None, N_ROWS + 2),
    Case("duplicate-header", header_edit("hour", "event"), "names column 'event' twice", "interactions.csv",
         "event", 1),
    Case("duplicate-header-after-trim", header_edit("hour", " event "), "names column 'event' twice",
         "interactions.csv", "event", 1),
    Case("terminal-escape-in-header", raw("interactions.csv", f"customer,item_id,timestamp,x\x1b[2J\u202e,"
                                          f"x\x1b[2J\u202e\nc00,A0,{T0},1,2\n".encode()),
         "names column 'x\\x1b[2J\\u202e' twice", "interactions.csv", None, 1),
    Case("missing-column", header_edit("item_id", "product"), "missing column 'item_id'", "interactions.csv",
         "item_id"),
    Case("mapping-to-missing-column", toml(BASE_TOML + 'event = "action"\n'), "which is not in the file",
         "interactions.csv", "action"),
    Case("two-fields-one-column", two_mapped_to_one, "maps both user_id and item_id", "shop.toml", "item_id"),
    Case("semicolon-csv", raw("items.csv", b"item_id;price\nA0;1\n"), "missing column 'item_id'", "items.csv"),
    Case("ragged-row", raw("items.csv", b"item_id,price\nA0,1\nA1,2,3,4\n"), "not a well-formed CSV", "items.csv"),
    Case("unknown-event", cell("interactions", "event", "view"), "unknown event", "interactions.csv", "event", 6),
    Case("label-not-binary", raw("interactions.csv", f"customer,item_id,timestamp,clicked\nc00,A0,{T0},2\n".encode()),
         "label is not 0 or 1", "interactions.csv", "clicked", 2),
    Case("mixed-type-hour", cell("interactions", "hour", "ten"), "not a number", "interactions.csv", "hour", 6),
    Case("hour-out-of-range", cell("interactions", "hour", "24"), "hour above 23", "interactions.csv", "hour", 6),
    # quantities and prices
    Case("negative-quantity", cell("interactions", "quantity", "-1", row=3), "negative value",
         "interactions.csv", "quantity", 5),
    Case("nan-quantity-on-purchase", cell("interactions", "quantity", "NaN", row=3), "missing quantity",
         "interactions.csv", "quantity", 5),
    Case("text-quantity", cell("interactions", "quantity", "two", row=3), "not a number", "interactions.csv",
         "quantity", 5),
    Case("negative-price", cell("items", "price", "-3", row=1), "negative value", "items.csv", "price", 3),
    Case("nan-price", cell("items", "price", "NaN", row=1), "missing value", "items.csv", "price", 3),
    Case("inf-price", cell("items", "price", "inf", row=1), "infinite value", "items.csv", "price", 3),
    Case("comma-decimal-price", cell("items", "price", "1,50", row=1), "not a number", "items.csv", "price", 3),
    Case("negative-units", cell("sales", "units", "-2", row=0), "negative value", "sales.csv", "units", 2),
    # files
    Case("csv-and-parquet", as_parquet_too, "several interactions files"),
    Case("unknown-extension", raw("items.xlsx", b"PK\x03\x04"), "unknown file extension", "items.xlsx"),
    Case("empty-file", raw("interactions.csv", b""), "the file is empty", "interactions.csv"),
    Case("empty-optional-file", raw("users.csv", b""), "the file is empty", "users.csv"),
    Case("header-only-interactions", lambda root: header_only(root, "interactions"), "no data rows",
         "interactions.csv"),
    Case("header-only-items", lambda root: header_only(root, "items"), "no data rows", "items.csv"),
    Case("header-only-sales", lambda root: header_only(root, "sales"), "no data rows", "sales.csv"),
    Case("binary-garbage-csv", raw("interactions.csv", bytes(range(0, 128)) * 4), "NUL bytes", "interactions.csv"),
    Case("png-as-csv", raw("items.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "not UTF-8", "items.csv"),
    Case("parquet-not-parquet", parquet_not_parquet, "unreadable Parquet", "interactions.parquet"),
    Case("latin-1-csv", reencode("latin-1"), "not UTF-8", "users.csv", row=4),
    Case("utf-16-csv", reencode("utf-16"), "UTF-16", "users.csv"),
    Case("huge-file", huge_sparse_file, "above the 512 MB limit", "interactions.csv"),
    Case("fifo-as-csv", fifo, "not a regular file", "interactions.csv"),
    Case("dangling-link", dangling_link, "not a regular file", "items.csv"),
    # shop.toml
    Case("toml-name-absolute-path", toml('name = "/tmp/x"\n'), "not a safe name", "shop.toml", "name"),
    Case("toml-name-parent-dirs", toml('name = "../../"\n'), "not a safe name", "shop.toml", "name"),
    Case("toml-name-dotdot-inside", toml('name = "a..b"\n'), "not a safe name", "shop.toml", "name"),
    Case("toml-name-empty", toml('name = ""\n'), "must be a non-empty string", "shop.toml", "name"),
    Case("toml-name-control-char", toml('name = "shop\\u0007\\n"\n'), "not a safe name", "shop.toml", "name"),
    Case("toml-name-too-long", toml(f'name = "{"a" * 65}"\n'), "not a safe name", "shop.toml", "name"),
    Case("folder-name-unsafe", unsafe_folder, "folder name is used"),
    Case("toml-invalid", toml("name = \n"), "not valid TOML", "shop.toml"),
    Case("toml-name-not-string", toml("name = 3\n"), "must be a non-empty string", "shop.toml", "name"),
    Case("toml-currency-not-iso", toml('currency = "euro"\n'), "not an ISO 4217 code", "shop.toml", "currency"),
    Case("toml-columns-not-table", toml("columns = 3\n"), "'columns' must be a table", "shop.toml", "columns"),
    Case("toml-column-not-string", toml("[columns]\nuser_id = 5\n"), "must name a column as a string",
         "shop.toml", "user_id"),
    Case("toml-meta-not-table", toml("meta = 1\n"), "'meta' must be a table", "shop.toml", "meta"),
    Case("toml-unknown-key", toml('nmae = "x"\n'), "unknown key 'nmae'", "shop.toml", "nmae"),
    Case("toml-reversed-mapping", toml('[columns]\ncustomer = "user_id"\n'), 'did you mean user_id = "customer"',
         "shop.toml"),
    Case("toml-not-utf8", raw("shop.toml", 'name = "Café"\n'.encode("latin-1")), "not UTF-8", "shop.toml"),
    Case("toml-is-a-folder", toml_is_a_folder, "not a regular file", "shop.toml"),
    Case("toml-events-unknown-target", toml(BASE_TOML + '[events]\nview = "look"\n'), "not one of our events",
         "shop.toml", "view"),
    Case("toml-timestamp-format-no-directive", toml('timestamp_format = "YYYY-MM-DD"\n' + BASE_TOML),
         "no % directive", "shop.toml", "timestamp_format"),
    Case("toml-top-level-key-under-a-table", toml(BASE_TOML + 'timestamp_format = "%Y"\n'),
         "move it above the first [table] line", "shop.toml", "timestamp_format"),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime, to prove nothing was written."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()
    root.callback()(lambda: None)
    validate.register(root)
    return root


def make_case(tmp_path: Path, case: Case) -> Path:
    name = "bad\x01name" if case.id == "folder-name-unsafe" else "shop"
    root = write_base(tmp_path / name)
    case.damage(root)
    return root


def test_base_shop_is_valid(tmp_path: Path) -> None:
    shop = load_shop_dir(write_base(tmp_path / "shop"))
    assert shop.name == "base-shop" and len(shop.interactions) > 0
    assert shop.available_tasks() == ["ctr", "cvr", "ranking", "sales"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_load_shop_dir_refuses(tmp_path: Path, case: Case) -> None:
    root = make_case(tmp_path, case)
    before = _tree(tmp_path)
    with pytest.raises(ShopDataError) as info:
        load_shop_dir(root)
    err = info.value
    assert case.fragment in str(err), str(err)
    assert err.fix and "Fix:" in str(err)
    if case.file is not None:
        assert Path(err.file).name == case.file, str(err)
    if case.column is not None:
        assert err.column == case.column, str(err)
    if case.row is not None:
        assert err.row == case.row, str(err)
    assert _tree(tmp_path) == before  # nothing written, nothing touched


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validate_cli_refuses(tmp_path: Path, case: Case, app: typer.Typer) -> None:
    root = make_case(tmp_path, case)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["validate", "--json", str(root)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    report = json.loads(result.output)[0]
    assert report["ok"] is False and case.fragment in report["error"]["message"]
    assert "Traceback" not in result.output and "\x1b" not in result.output  # no raw terminal escapes
    text = CliRunner().invoke(app, ["validate", str(root)])
    assert text.exit_code == 1 and case.fragment in " ".join(text.output.split())
    assert _tree(tmp_path) == before


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 65 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- accepted, and how
@pytest.mark.parametrize("target", ["interactions.csv", "shop.toml"])
def test_utf8_bom_is_accepted(tmp_path: Path, target: str) -> None:
    root = write_base(tmp_path / "shop")
    (root / target).write_bytes(b"\xef\xbb\xbf" + (root / target).read_bytes())
    shop = load_shop_dir(root)
    assert shop.name == "base-shop" and shop.interactions["user_id"].iloc[0] == "c00"


def test_size_cap_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_base(tmp_path / "shop")
    monkeypatch.setenv(MAX_FILE_MB_ENV, "0.001")  # ~1 KB: the base interactions file is larger
    err = pytest.raises(ShopDataError, load_shop_dir, root).value
    assert "above the 0 MB limit" in err.problem and f"{MAX_FILE_MB_ENV}=" in err.fix
    monkeypatch.setenv(MAX_FILE_MB_ENV, "lots")
    assert "not a number of megabytes" in str(pytest.raises(ShopDataError, load_shop_dir, root).value)
    monkeypatch.setenv(MAX_FILE_MB_ENV, "2048")
    huge_sparse_file(root)  # 1 GiB under a 2 GiB cap is scanned, not read whole: its zeros are NUL bytes
    assert "NUL bytes" in str(pytest.raises(ShopDataError, load_shop_dir, root).value)


def test_outlier_check_matches_the_training_split() -> None:
    cfg = FeatureConfig()
    assert SPLIT_FRACTIONS == (cfg.val_fraction, cfg.test_fraction)
    ts = np.array([T0 + i * 3600 for i in range(100)] + [T0 + 400 * DAY])
    from shared.features import TEST, TRAIN, VAL, assign_splits
    from shared.schema import ShopData

    inter = pd.DataFrame({"user_id": ["u"] * len(ts), "item_id": ["i"] * len(ts), "timestamp": ts,
                          "clicked": 1, "carted": 0, "purchased": 0, "quantity": 0.0})
    splits, _ = assign_splits(ShopData("s", inter), cfg)
    expected = {"train": int((splits == TRAIN).sum()), "validation": int((splits == VAL).sum()),
                "test": int((splits == TEST).sum())}
    assert temporal_split_counts(ts) == expected == {"train": 100, "validation": 0, "test": 1}


def test_small_logs_skip_the_split_check_but_validate_warns(tmp_path: Path, app: typer.Typer) -> None:
    root = tmp_path / "tiny"
    root.mkdir()
    (root / "interactions.csv").write_text(
        f"user_id,item_id,timestamp,clicked,purchased\nu1,i1,{T0},0,0\nu1,i2,{T0 + 10},1,1\nu2,i1,{T0 + 20},1,0\n"
        f"u2,i2,{T0 + 5000},0,0\n", encoding="utf-8")
    assert len(load_shop_dir(root).interactions) == 4
    result = CliRunner().invoke(app, ["validate", "--json", str(root)])
    report = json.loads(result.output)[0]
    assert result.exit_code == 0 and report["splits"] == {"train": 3, "validation": 0, "test": 1}
    assert any(w.startswith("task ctr has nothing to score in the validation") for w in report["warnings"])
    text = " ".join(CliRunner().invoke(app, ["validate", str(root)]).output.split())
    assert "warning tiny: task ctr" in text and "rows per split: train 3, validation 0, test 1" in text


def test_validate_counts_splits_with_a_scenarios_split_rule(tmp_path: Path, app: typer.Typer) -> None:
    root = write_base(tmp_path / "shop")
    default = json.loads(CliRunner().invoke(app, ["validate", "--json", str(root)]).output)[0]
    assert default["splits"] == temporal_split_counts([T0 + i * DAY // 2 for i in range(N_ROWS)])
    scenario = tmp_path / "loo.toml"
    scenario.write_text('[features]\nsplit = "leave-last-out"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", "--json", "--scenario", str(scenario), str(root)])
    loo = json.loads(result.output)[0]
    assert result.exit_code == 0 and loo["splits"] != default["splits"]
    from shared.features import SPLITS, assign_splits

    splits, _ = assign_splits(load_shop_dir(root), FeatureConfig(split="leave-last-out"))
    assert list(loo["splits"].values()) == [int((splits == code).sum()) for code in SPLITS.values()]


def test_errors_name_the_merchants_column(tmp_path: Path) -> None:
    root = make_case(tmp_path, next(c for c in CASES if c.id == "id-trailing-space"))
    err = pytest.raises(ShopDataError, load_shop_dir, root).value
    assert (err.column, err.field) == ("customer", "user_id")
    assert "column 'customer' (field user_id)" in str(err)


def test_timestamp_format_and_event_values_from_shop_toml(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "interactions.csv").write_text(
        "Kunde,Artikel,Zeit,Aktion\nk1,a1,31/01/2024 10:00,view\nk1,a1,31/01/2024 10:05,Cart\n"
        "k2,a1,01/02/2024 09:00,buy\n", encoding="utf-8")
    (root / "shop.toml").write_text(
        'name = "laden"\ntimestamp_format = "%d/%m/%Y %H:%M"\n[columns]\nuser_id = "Kunde"\nitem_id = "Artikel"\n'
        'timestamp = "Zeit"\nevent = "Aktion"\n[events]\nview = "impression"\ncart = "cart"\nBuy = "purchase"\n',
        encoding="utf-8")
    inter = load_shop_dir(root).interactions
    jan31 = int(pd.Timestamp("2024-01-31T10:00Z").timestamp())
    assert inter["timestamp"].tolist() == [jan31, jan31 + 23 * 3600]
    assert inter[["clicked", "carted", "purchased"]].values.tolist() == [[1, 1, 0], [1, 1, 1]]
    set_cell(root, "interactions", "Zeit", 1, "2024-01-31T10:05")  # ISO is not the declared format
    err = pytest.raises(ShopDataError, load_shop_dir, root).value
    assert (err.row, err.column, err.field) == (3, "Zeit", "timestamp") and "%d/%m/%Y %H:%M" in err.fix
    set_cell(root, "interactions", "Zeit", 1, "31/01/2024 10:05")
    set_cell(root, "interactions", "Aktion", 2, "wishlist")
    err = pytest.raises(ShopDataError, load_shop_dir, root).value
    assert (err.row, err.column) == (4, "Aktion") and "[events] values" in err.fix


def test_state_folder_name_is_checked() -> None:
    assert check_shop_name("shop_00") == "shop_00" and check_shop_name("ml-zip0-1") == "ml-zip0-1"
    for bad in ("/tmp/x", "../..", "..", ".hidden", "a/b", "a\\b", "", "x\x00", "tab\there", "trailing "):
        with pytest.raises(ShopDataError, match="not a safe name"):
            check_shop_name(bad)


def test_two_shops_with_one_name(tmp_path: Path, app: typer.Typer) -> None:
    first, second = write_base(tmp_path / "one"), write_base(tmp_path / "two")
    result = CliRunner().invoke(app, ["validate", "--json", str(first), str(second)])
    reports = json.loads(result.output)
    assert result.exit_code == 1 and [r["ok"] for r in reports] == [True, False]
    message = reports[1]["error"]["message"]
    assert str(second) in message and str(first) in message and "'base-shop'" in message
    scenario = scenario_from_dict({"data": {"source": "shop-dirs", "paths": [str(first), str(second)]}})
    with pytest.raises(ShopDataError, match="also the name of") as info:
        scenario.shops()
    assert str(first) in str(info.value) and str(second) in str(info.value)
    assert not issubclass(ShopDataError, ScenarioError)  # callers catch ValueError, the common base


def test_client_refuses_to_turn_an_unsafe_shop_name_into_a_state_path(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters and generators name shops without shop.toml: the client checks the name before using it."""
    from flwr.app import Context, RecordDict

    import client.local_state as local_state
    import shared.scenario as scenario_module

    shop = load_shop_dir(write_base(tmp_path / "shop"))
    shop.name = "../../escaped"
    monkeypatch.setattr(scenario_module, "_load_shops", lambda data_json, seed: (shop,))
    monkeypatch.setattr(local_state, "_SHOPS", {})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    run_dir = tmp_path / "run"
    with pytest.raises(ShopDataError, match="not a safe name"):
        local_state.resolve_shop(context, ShopRoundSettings.from_message(
            {}, {"scenario": "default", "run-dir": str(run_dir), "seed": 0}))
    assert not run_dir.exists() and not (tmp_path / "escaped").exists()


def test_a_file_may_keep_our_column_name_through_its_own_mapping(tmp_path: Path) -> None:
    root = write_base(tmp_path / "shop")
    users = pd.read_csv(root / "users.csv", dtype=str).rename(columns={"customer": "user_id"})
    users.to_csv(root / "users.csv", index=False)
    err = pytest.raises(ShopDataError, load_shop_dir, root).value
    assert Path(err.file).name == "users.csv" and '[columns.users] user_id = "user_id"' in err.fix
    (root / "shop.toml").write_text(BASE_TOML + '[columns.users]\nuser_id = "user_id"\n', encoding="utf-8")
    assert load_shop_dir(root).users["user_id"].tolist()[:2] == ["c00", "c01"]


# Rows of the docs table whose message no case fragment spells out, and the test that backs each.
ROWS_BACKED_ELSEWHERE = {
    "UTF-8 BOM": "test_utf8_bom_is_accepted",
    "control or bidi characters": "terminal-escape-in-header",
    "two shops with one name": "test_two_shops_with_one_name",
}


def test_every_row_of_the_shop_table_is_a_tested_case() -> None:
    """docs/bad-input.md's shop table and the catalogue agree: no row without a case, no case without a row."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text(encoding="utf-8")
    table = doc.split("## Shop directories: bad input -> what fedshop says")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| bad input")]
    assert len(rows) >= 45
    covered: set[str] = set()
    for bad_input, says, _where in rows:
        hits = {c.id for c in CASES if c.fragment in says or c.fragment in bad_input}
        backed = next((t for prefix, t in ROWS_BACKED_ELSEWHERE.items() if bad_input.startswith(prefix)), None)
        if backed is not None:
            assert backed in globals() or backed in {c.id for c in CASES}, backed
            hits |= {backed} & {c.id for c in CASES}
        else:
            assert hits, f"no case asserts the message of the row '{bad_input}'"
        covered |= hits
    assert {c.id for c in CASES} - covered == set(), "cases without a row in docs/bad-input.md"
