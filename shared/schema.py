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

Merchant shop directory (`load_shop_dir` reads it, `write_shop_dir` writes the canonical label form):
``interactions.csv|.parquet`` (required), ``items.*``, ``users.*``, ``sales.*`` and ``shop.toml``
(``name``, ``currency``, ``timestamp_format``, ``[columns]`` mapping our field names to the merchant's,
``[events]`` mapping the merchant's event values to ours, ``[meta]``).
Interactions are an event log (``event`` in EVENTS; collapsed to one exposure per user, item and UTC
day, a later stage implying the earlier ones) or label columns (``clicked``, optional ``carted``,
``purchased``, ``quantity``; purchased implies carted implies clicked). Timestamps are unix seconds
or ISO-8601 (naive = UTC); sales days are days since epoch or ISO dates. CSV files must be UTF-8 and
every cell is read as text, so IDs keep leading zeros. Error rows count the header as row 1; columns
the canonical form does not keep are listed in ``ShopData.meta["ignored_columns"]``. Refused (see
docs/bad-input.md): timestamps before 1990 or in the future, outliers that empty a temporal split,
Excel-rounded values, IDs with outer spaces or float IDs above 2^53, repeated headers, header-only
files, unsafe shop names, non-regular files and files above ``$FEDSHOP_MAX_FILE_MB`` (512).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import os
import re
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
from pandas.api.types import is_object_dtype, is_string_dtype

from shared.atomic import atomic_write_parquet, atomic_write_text

SALES_WEEKLY_AFTER_DAYS = 180  # derived sales use weekly periods beyond this log span
SALES_TAIL_PERIODS = 8  # zero periods kept after an item's last sale
EVENTS = ("impression", "click", "cart", "purchase")
TASKS = ("ctr", "cvr", "ranking", "sales")

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "clicked", "carted", "purchased", "quantity")
ITEM_SIDE_COLUMNS = ("category", "brand", "price")
USER_SIDE_COLUMNS = ("age_bucket", "gender", "region")
SALES_COLUMNS = ("item_id", "day", "units", "promo")


class ShopDataError(ValueError):
    """Bad shop data: the message names the file, row, column and the fix."""

    def __init__(self, file: str, problem: str, fix: str, *, row: int | None = None,
                 column: str | None = None, field: str | None = None) -> None:
        self.file, self.problem, self.fix, self.row, self.column = file, problem, fix, row, column
        self.field = field  # our field name when the merchant's column (``column``) is named otherwise
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
            if field is not None and field != column:
                where += f" (field {field})"
        # Control and bidi characters from a header or a shop.toml key are shown escaped, so the
        # message cannot rewrite the merchant's terminal or hide part of itself.
        text = f"{where}: {problem}. Fix: {fix}"
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))

    def in_merchant_terms(self, mapping: dict[str, str]) -> ShopDataError:
        """The same error with the column named as the merchant's file names it (shop.toml ``[columns]``)."""
        if self.column is None or self.column not in mapping or self.field is not None:
            return self
        return ShopDataError(self.file, self.problem, self.fix, row=self.row, column=mapping[self.column],
                             field=self.column)


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


# ----------------------------------------------------------------------------- writing a shop directory
FORMATS = ("csv", "parquet")
LABEL_COLUMNS = ("clicked", "carted", "purchased")
_TOML_SCALARS = (str, int, float, bool)


def _context_columns(frame: pd.DataFrame) -> list[str]:
    """Optional context columns present in an interactions table, in a stable order."""
    return [c for c in frame.columns if c in ("device", "hour") or c.startswith("ctx_")]


def _toml_safe(meta: dict) -> dict:
    """Keep only the meta entries TOML can hold (scalars and lists of scalars)."""
    safe = {}
    for key, value in meta.items():
        if isinstance(value, _TOML_SCALARS) or (
            isinstance(value, list) and all(isinstance(v, _TOML_SCALARS) for v in value)
        ):
            safe[str(key)] = value
    return safe


def _canonical_interactions(inter: pd.DataFrame) -> pd.DataFrame:
    """Interactions in the canonical label form with the canonical dtypes, ready to write."""
    missing = [c for c in INTERACTION_COLUMNS if c not in inter.columns]
    if missing:
        raise ShopDataError("ShopData.interactions", f"missing columns {missing}",
                            f"build the frame with all of {list(INTERACTION_COLUMNS)}")
    out = inter[list(INTERACTION_COLUMNS) + _context_columns(inter)].copy()
    out["user_id"] = out["user_id"].astype(str)
    out["item_id"] = out["item_id"].astype(str)
    out["timestamp"] = out["timestamp"].astype("int64")
    for col in LABEL_COLUMNS:
        out[col] = out[col].astype("int8")
    out["quantity"] = out["quantity"].astype("float32")
    return out.reset_index(drop=True)


def write_shop_dir(shop: ShopData, path: str | Path, fmt: str = "csv", *, overwrite: bool = False) -> Path:
    """Write a shop as a merchant directory (canonical label form) that `load_shop_dir` reads back.

    The files go into a temp sibling folder that is renamed into place, so a reader never sees a
    half-written shop. An existing non-empty directory is replaced only with ``overwrite=True``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is a non-empty directory; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = {"interactions": _canonical_interactions(shop.interactions), "items": shop.items,
              "users": shop.users, "sales": shop.sales}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for stem, frame in tables.items():
            if frame is None:
                continue
            if fmt == "parquet":
                atomic_write_parquet(tmp / f"{stem}.parquet", frame.reset_index(drop=True))
            else:  # quote every string: pandas leaves a lone "\r" unquoted, which readers take as a line break
                text = frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
                atomic_write_text(tmp / f"{stem}.csv", text)
        info: dict = {"name": shop.name, "currency": shop.currency}
        meta = _toml_safe(shop.meta)
        if meta:
            info["meta"] = meta
        atomic_write_text(tmp / "shop.toml", tomli_w.dumps(info))
        if path.is_dir() and any(path.iterdir()):
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)  # rename(2) may replace an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------- reading a shop directory
SHOP_TOML = "shop.toml"
TABLES = ("interactions", "items", "users", "sales")
EXTENSIONS = {".csv": "csv", ".parquet": "parquet"}
SECONDS_PER_DAY = 86_400
_EPOCH = pd.Timestamp(0, tz="UTC")
_STAGE = {event: stage for stage, event in enumerate(EVENTS)}  # a later stage implies the earlier ones
_FIELDS = frozenset(
    {"event", "device", "hour", "global_key", "item_id", "user_id", "day", "units", "promo"}
    | set(INTERACTION_COLUMNS) | set(ITEM_SIDE_COLUMNS) | set(USER_SIDE_COLUMNS)
)
_EXTRA_PREFIXES = ("ctx_", "item_", "user_")
# Common merchant spellings, used only to suggest a `[columns]` line in an error message.
_SYNONYMS = {
    "user_id": ("user", "userid", "uid", "customer", "customer_id", "client_id", "visitor_id", "reviewer_id"),
    "item_id": ("item", "itemid", "product", "product_id", "sku", "asin", "article_id", "offer_id"),
    "timestamp": ("time", "ts", "datetime", "date", "event_time", "created_at", "unix_time"),
    "event": ("event_type", "action", "behavior", "behaviour", "type", "interaction"),
    "clicked": ("click", "is_click"),
    "purchased": ("purchase", "conversion", "is_purchase", "bought", "buy"),
    "carted": ("cart", "add_to_cart", "is_cart"),
    "quantity": ("qty", "amount", "count"),
    "price": ("unit_price", "list_price", "cost"),
    "units": ("quantity", "qty", "sold", "sales"),
}
_STRING_DTYPES = ("object", "str", "string")
SHOP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
SHOP_NAME_RULE = ("1-64 characters: ASCII letters, digits, space, '.', '_' or '-', starting with a letter or digit, "
                  "no '..', no trailing space")
CURRENCY_RE = re.compile(r"[A-Z]{3}")
MAX_TOML_BYTES = 64 * 1024
MAX_FILE_MB_ENV = "FEDSHOP_MAX_FILE_MB"
MAX_FILE_MB = 512  # default cap per data file: pandas holds a CSV as Python strings, ~5-10x its size
# Excel's "General" format shows long numbers as 1.70407E+09: the digits after the 6th are gone.
_EXCEL_SCIENTIFIC = re.compile(r"\s*[+-]?\d\.\d+E[+-]\d{2,}\s*")
EARLIEST = pd.Timestamp("1990-01-01", tz="UTC")  # before this, a timestamp is an Excel serial or days
FUTURE_SLACK_S = 2 * 86_400  # clocks and time zones: up to 2 days "in the future" is allowed
SPLIT_FRACTIONS = (0.1, 0.1)  # validation and test shares of the time span: FeatureConfig's defaults
SPLIT_CHECK_MIN_ROWS = 50  # smaller logs are too small to split either way; `fedshop validate` shows counts


def _row(position: int) -> int:
    """Row number as a spreadsheet shows the file: the header is row 1, the first data row is row 2."""
    return int(position) + 2


def _fail_where(mask: pd.Series | np.ndarray, file: str, column: str, problem: str, fix: str,
                values: pd.Series | None = None) -> None:
    """Raise a ShopDataError at the first row where ``mask`` is true, counting the other bad rows."""
    bad = np.flatnonzero(np.asarray(mask, dtype=bool))
    if not len(bad):
        return
    first = int(bad[0])
    if values is not None:
        found = values.iloc[first]
        problem = f"{problem} (found {found.item() if isinstance(found, np.generic) else found!r})"
    if len(bad) > 1:
        problem += f"; {len(bad) - 1} more row(s) have the same problem"
    raise ShopDataError(file, problem, fix, row=_row(first), column=column)


def _is_text(series: pd.Series) -> bool:
    """Whether a column holds text (CSV columns always do; Parquet ones may be typed)."""
    return str(series.dtype) in _STRING_DTYPES or isinstance(series.dtype, pd.StringDtype)


_TOP_LEVEL = frozenset({"name", "currency", "timestamp_format", "columns", "events", "meta"})


def _check_mapping(mapping: dict, path: Path, table: str) -> None:
    """Each `[columns]` entry maps one of our field names to a column name of the merchant's."""
    for ours, theirs in mapping.items():
        if not isinstance(theirs, str) or not theirs:
            raise ShopDataError(str(path), f"[{table}] {ours} must name a column as a string",
                                f'write {ours} = "<your column name>"', column=ours)
        if ours not in _FIELDS and not ours.startswith(_EXTRA_PREFIXES):
            hint = f" (did you mean {theirs} = \"{ours}\"?)" if theirs in _FIELDS else ""
            if ours in _TOP_LEVEL:
                hint = f" ('{ours}' is a top-level key: move it above the first [table] line)"
            raise ShopDataError(str(path), f"[{table}] maps unknown field '{ours}'{hint}",
                                f"keys are our field names ({', '.join(sorted(_FIELDS))}), "
                                "values are your column names", column=ours)


def _mapping_for(info: dict, stem: str) -> dict[str, str]:
    """The column mapping for one file: global `[columns]` entries, overridden by `[columns.<stem>]`."""
    columns = info.get("columns", {})
    mapping = {ours: theirs for ours, theirs in columns.items() if isinstance(theirs, str)}
    return mapping | columns.get(stem, {})


def check_shop_name(name: str, where: str = SHOP_TOML) -> str:
    """Return ``name`` if it is a safe shop name; it becomes a folder name (``shop-state/<name>``), so a
    path, ``..``, control characters or an empty name would put state outside the run directory."""
    if not isinstance(name, str) or not SHOP_NAME_RE.fullmatch(name) or ".." in name or name != name.strip():
        raise ShopDataError(where, f"shop name {name!r} is not a safe name (it becomes a folder name)",
                            f"use {SHOP_NAME_RULE}, e.g. name = \"corner-shop\"", column="name")
    return name


def _read_toml(root: Path) -> dict:
    """Read and check the optional shop.toml (name, currency, timestamp_format, [columns], [events], [meta])."""
    path = root / SHOP_TOML
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.is_file():
        raise ShopDataError(str(path), "not a regular file", "make shop.toml a plain text file")
    if path.stat().st_size > MAX_TOML_BYTES:
        raise ShopDataError(str(path), f"{path.stat().st_size:,} bytes, more than a shop.toml needs "
                            f"(limit {MAX_TOML_BYTES:,})", "keep only name, currency, [columns], [events] and [meta]")
    try:
        info = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise ShopDataError(str(path), f"cannot read the file ({exc.strerror})",
                            "make shop.toml readable by this user") from None
    except UnicodeDecodeError as exc:
        raise ShopDataError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "save shop.toml as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ShopDataError(str(path), f"not valid TOML ({exc})",
                            'write it as TOML, e.g. name = "My shop"') from None
    allowed = _TOP_LEVEL
    for key in info:
        if key not in allowed:
            raise ShopDataError(str(path), f"unknown key '{key}'", f"use only {sorted(allowed)}",
                                column=key)
    for key in ("name", "currency", "timestamp_format"):
        if key in info and (not isinstance(info[key], str) or not info[key].strip()):
            raise ShopDataError(str(path), f"'{key}' must be a non-empty string", f'write {key} = "..."',
                                column=key)
    if "name" in info:
        check_shop_name(info["name"], str(path))
    if "currency" in info and not CURRENCY_RE.fullmatch(info["currency"]):
        raise ShopDataError(str(path), f"currency {info['currency']!r} is not an ISO 4217 code",
                            'write three capital letters, e.g. currency = "EUR"', column="currency")
    if "timestamp_format" in info and "%" not in info["timestamp_format"]:
        raise ShopDataError(str(path), f"timestamp_format {info['timestamp_format']!r} has no % directive",
                            'write a strftime format, e.g. timestamp_format = "%Y-%m-%d %H:%M:%S"',
                            column="timestamp_format")
    columns = info.get("columns", {})
    if not isinstance(columns, dict):
        raise ShopDataError(str(path), "'columns' must be a table", 'write [columns] then lines like '
                            'user_id = "customer"', column="columns")
    for ours, theirs in columns.items():
        if ours in TABLES and isinstance(theirs, dict):  # [columns.<file>]: a mapping for one file only
            _check_mapping(theirs, path, f"columns.{ours}")
        else:
            _check_mapping({ours: theirs}, path, "columns")
    for stem in TABLES:
        taken: dict[str, str] = {}
        for ours, theirs in _mapping_for(info, stem).items():
            if theirs in taken:
                raise ShopDataError(str(path), f"[columns] maps both {taken[theirs]} and {ours} to column "
                                    f"'{theirs}'", "map each field to its own column", column=ours)
            taken[theirs] = ours
    events = info.get("events", {})
    if not isinstance(events, dict):
        raise ShopDataError(str(path), "'events' must be a table", 'write [events] then lines like '
                            'view = "impression"', column="events")
    for theirs, ours in events.items():
        if ours not in EVENTS:
            raise ShopDataError(str(path), f"[events] maps '{theirs}' to {ours!r}, not one of our events",
                                f'write <your event value> = "<one of {", ".join(EVENTS)}>"', column=theirs)
    if "meta" in info and not isinstance(info["meta"], dict):
        raise ShopDataError(str(path), "'meta' must be a table", "write [meta] then key = value lines",
                            column="meta")
    return info


def _find_file(root: Path, stem: str) -> Path | None:
    """The one file named ``stem.<ext>`` in the shop directory, or None if there is none."""
    found = sorted(p for p in root.iterdir() if p.name.startswith(f"{stem}.") and not p.is_dir())
    for path in found:
        if not path.is_file():  # a FIFO or device would block or stream forever; a dangling link is empty
            raise ShopDataError(str(path), "not a regular file (a pipe, device or broken link)",
                                f"replace it with the exported {stem}.csv or {stem}.parquet file")
    if not found:
        return None
    for path in found:
        if path.name[len(stem):].lower() not in EXTENSIONS:
            raise ShopDataError(str(path), f"unknown file extension '{path.name[len(stem):]}'",
                                f"save {stem} as {stem}.csv or {stem}.parquet")
    if len(found) > 1:
        raise ShopDataError(str(root), f"several {stem} files: {[p.name for p in found]}",
                            f"keep exactly one {stem} file (.csv or .parquet)")
    return found[0]


def max_file_bytes() -> int:
    """The size cap per data file: ``$FEDSHOP_MAX_FILE_MB`` megabytes, else MAX_FILE_MB."""
    raw = os.environ.get(MAX_FILE_MB_ENV, "")
    try:
        mb = float(raw) if raw.strip() else MAX_FILE_MB
    except ValueError:
        raise ShopDataError(f"${MAX_FILE_MB_ENV}", f"{raw!r} is not a number of megabytes",
                            f"export {MAX_FILE_MB_ENV}=1024 (or unset it for {MAX_FILE_MB})") from None
    return int(mb * 1024 * 1024)


def check_file_size(path: Path) -> None:
    """Refuse a file above the size cap (``$FEDSHOP_MAX_FILE_MB``) before reading a byte of it."""
    size, cap = path.stat().st_size, max_file_bytes()
    if size > cap:
        raise ShopDataError(str(path), f"the file is {size / 2**20:,.0f} MB, above the {cap / 2**20:,.0f} MB "
                            "limit (loading it whole could exhaust memory)",
                            f"export a shorter period or a sample, or raise the limit with "
                            f"{MAX_FILE_MB_ENV}={int(size / 2**20) + 1} if this machine has the memory")


_check_size = check_file_size  # the name the readers below use
SCAN_CHUNK = 1 << 20  # bytes per read while a CSV's encoding is checked: memory stays bounded at any file size


def _scan_text(path: Path) -> None:
    """Check, one chunk at a time, that a CSV is non-empty UTF-8 text without NUL bytes.

    Streamed so that a file which is not text (a 1 GB file of zeros, say, under a raised size cap) is
    refused at its first bad byte with bounded memory; the first problem in file order is reported.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ShopDataError(str(path), f"cannot read the file ({exc.strerror})",
                            "check that the file exists and is readable") from None
    with handle:
        first = handle.read(SCAN_CHUNK)
        if first[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ShopDataError(str(path), "the file is UTF-16 text (it starts with a UTF-16 byte-order mark)",
                                "re-export the file as UTF-8 (e.g. in a spreadsheet: Save As > CSV UTF-8)")
        data = first[3:] if first.startswith(b"\xef\xbb\xbf") else first  # offsets count after a BOM
        start, rows, text_seen = 0, 0, False  # offset of `data` in the file (after the BOM), newlines before it
        while data:
            chunk = handle.read(SCAN_CHUNK)
            try:
                decoded, used = codecs.utf_8_decode(data, "strict", not chunk)
                bad = None
            except UnicodeDecodeError as exc:
                decoded, used, bad = data[:exc.start].decode("utf-8"), exc.start, exc
            nul = decoded.find("\x00")
            if nul >= 0:
                offset = len(decoded[:nul].encode("utf-8"))
                raise ShopDataError(str(path), "the file holds NUL bytes, so it is not a text CSV",
                                    "export it again as a comma-separated UTF-8 text file",
                                    row=rows + data.count(b"\n", 0, offset) + 1)
            if bad is not None:
                raise ShopDataError(str(path), f"byte {start + bad.start} is not UTF-8 ({bad.reason})",
                                    "re-export the file as UTF-8 (e.g. in a spreadsheet: Save As > CSV UTF-8)",
                                    row=rows + data.count(b"\n", 0, bad.start) + 1)
            text_seen = text_seen or bool(decoded.strip())
            rows += data.count(b"\n", 0, used)
            start += used
            data = data[used:] + chunk  # an undecoded tail (a character cut by the chunk) goes first
    if not text_seen:
        raise ShopDataError(str(path), "the file is empty", "export a header row and at least one data row")


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a UTF-8 CSV with every cell as text, so IDs like "007" stay as written.

    The encoding is checked first, streamed (`_scan_text`); pandas then parses the file itself, so no
    copy of the whole file is held as bytes or as one Python string beside the parsed table.
    """
    _check_size(path)
    _scan_text(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except csv.Error:
        header = []  # pandas reports the malformed CSV below
    seen: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        name = name.strip()
        if name in seen:  # pandas would silently rename the second one to "name.1"
            raise ShopDataError(str(path), f"the header names column '{name}' twice (columns {seen[name]} "
                                f"and {number})", "rename or delete one of the two columns", row=1, column=name,
                                field=name)
        seen[name] = number
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except Exception as exc:  # the C parser raises several types; all mean "not a well-formed CSV"
        raise ShopDataError(str(path), f"not a well-formed CSV ({str(exc).strip()})",
                            "use one header row, commas between fields and double quotes around "
                            "fields that contain commas") from None
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    """Read a Parquet file, wrapping pyarrow's errors."""
    _check_size(path)
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...; all mean "unreadable"
        raise ShopDataError(str(path), f"unreadable Parquet file ({type(exc).__name__}: {exc})",
                            "write it again with pandas/pyarrow, or export it as CSV") from None


def _read_table(path: Path, mapping: dict[str, str]) -> pd.DataFrame:
    """Read one table, strip header whitespace and rename merchant columns to ours."""
    frame = _read_csv(path) if path.suffix.lower() == ".csv" else _read_parquet(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    _refuse_doubled_file(frame, path)  # before renaming: a repeated header holds the merchant's names
    for ours, theirs in mapping.items():
        if theirs not in frame.columns and ours in frame.columns:  # which one did the merchant mean?
            raise ShopDataError(str(path), f"shop.toml maps {ours} = \"{theirs}\", which is not in the file, "
                                f"but the file has a column '{ours}'", f"fix the [columns] line or the header; "
                                f"if this file alone uses '{ours}', add [columns.{path.stem}] {ours} = \"{ours}\"",
                                column=theirs, field=ours)
    rename = {theirs: ours for ours, theirs in mapping.items() if theirs in frame.columns}
    frame = frame.rename(columns=rename).reset_index(drop=True)
    dupes = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if dupes:
        raise ShopDataError(str(path), f"column '{dupes[0]}' appears more than once after the "
                            "shop.toml [columns] mapping (or after trimming spaces from the header)",
                            "keep one column per field", column=dupes[0])
    if len(frame.columns) and not len(frame):
        raise ShopDataError(str(path), "no data rows under the header (the table is empty)",
                            f"export the rows too, or delete {path.name} if you have none")
    return frame


def _refuse_doubled_file(frame: pd.DataFrame, path: Path) -> None:
    """Refuse a file that holds its rows twice (pasted or exported twice): every row would count double.

    Two signs: a data row that repeats the header, or a second half equal to the first, row for row.
    A single repeated row is left alone (two events in one second can be real).
    """
    header_again = np.ones(len(frame), dtype=bool)
    for position, name in enumerate(frame.columns):  # column by column: no copy of the whole table
        column = frame.iloc[:, position]
        if not (is_object_dtype(column) or is_string_dtype(column)) and not _reads_as_number(str(name)):
            return  # a parsed numeric or date column cannot hold a non-numeric header name
        header_again &= (column.astype(str).str.strip() == str(name)).to_numpy()
        if not header_again.any():
            break
    if len(frame.columns) and header_again.any():
        row = _row(int(np.flatnonzero(header_again)[0]))
        raise ShopDataError(str(path), f"row {row} repeats the header row: the file holds two copies "
                            "(pasted or exported twice?)", f"keep one copy: delete row {row} and, if they "
                            "repeat rows above it, the rows after it", row=row)
    half = len(frame) // 2
    if half >= 2 and len(frame) == 2 * half and all(
            np.array_equal(frame.iloc[:half, i].to_numpy(), frame.iloc[half:, i].to_numpy())
            for i in range(len(frame.columns))):
        raise ShopDataError(str(path), f"rows {_row(half)}-{_row(2 * half - 1)} repeat rows 2-{_row(half - 1)} "
                            "exactly: the file holds its rows twice (pasted or exported twice?)",
                            f"keep one copy: delete rows {_row(half)}-{_row(2 * half - 1)}", row=_row(half))


def _reads_as_number(text: str) -> bool:
    """Whether a header name could come back from the CSV reader as a number (e.g. a column named "2024")."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _suggest(field_name: str, found: list[str]) -> str | None:
    """A found column that probably means ``field_name``, for the `[columns]` hint."""
    lowered = {c.lower(): c for c in found}
    for synonym in _SYNONYMS.get(field_name, ()):
        if synonym in lowered:
            return lowered[synonym]
    close = difflib.get_close_matches(field_name, found, n=1, cutoff=0.6)
    return close[0] if close else None


def _require(frame: pd.DataFrame, columns: tuple[str, ...], path: Path, mapping: dict[str, str],
             why: str = "") -> None:
    """Raise a ShopDataError naming the first missing column, what was found and a mapping hint."""
    found = list(frame.columns)
    for col in columns:
        if col in found:
            continue
        problem = f"missing column '{col}'{why}; found {found}"
        if col in mapping:
            problem += f" (shop.toml maps {col} = \"{mapping[col]}\", which is not in the file)"
        if len(found) == 1 and any(sep in found[0] for sep in (";", "\t", "|")):
            fix = "save the file comma-separated (it looks like another delimiter was used)"
        else:
            guess = _suggest(col, found)
            table = f"columns.{path.stem}" if guess in _FIELDS else "columns"  # keep other files' columns
            fix = (f"rename a column to '{col}', or map yours in shop.toml: [{table}] "
                   f"{col} = \"{guess or '<your column name>'}\"")
        raise ShopDataError(str(path), problem, fix, column=col)


def _excel_scientific(text: pd.Series) -> np.ndarray:
    """Which cells look like Excel's rounded scientific notation (``1.70407E+09``)."""
    if not _is_text(text):
        return np.zeros(len(text), dtype=bool)
    mask = np.array(text.str.contains("E", regex=False, na=False), dtype=bool)  # cheap filter first
    if mask.any():
        mask[mask] = np.array(text[mask].str.fullmatch(_EXCEL_SCIENTIFIC, na=False), dtype=bool)
    return mask


def _ids(frame: pd.DataFrame, col: str, path: Path) -> pd.Series:
    """An ID column as text. Empty IDs, IDs with outer spaces and IDs whose digits a float or Excel lost
    are errors: each would silently merge or split users/items."""
    series = frame[col]
    missing = series.isna().to_numpy()
    if pd.api.types.is_float_dtype(series) and not missing.all():
        whole = series[~missing]
        _fail_where(series.abs().to_numpy() >= 2**53, str(path), col,
                    "ID stored as a float above 2^53, so its last digits are rounded away",
                    f"store {col} as text or as a 64-bit integer column", series)
        if (whole == np.floor(whole)).all():
            series = series.astype("Int64")
    text = series.astype(str)
    stripped = text.str.strip()
    empty = missing | (stripped == "").to_numpy()
    _fail_where(empty, str(path), col, "empty ID", f"give every row a {col}, or drop the rows without one")
    _fail_where(_excel_scientific(text), str(path), col,
                "ID in scientific notation: a spreadsheet rounded it, so different IDs became one",
                f"re-export with {col} formatted as text (Excel: Format Cells > Text before pasting)", text)
    _fail_where((text != stripped).to_numpy(), str(path), col,
                "ID with leading or trailing spaces (' a1' and 'a1' would be two different IDs)",
                f"trim the spaces in {col} in every file (spreadsheet: =TRIM(...)); fedshop does not guess", text)
    return text


def _numbers(series: pd.Series, path: Path, col: str, *, fix: str, allow_nan: bool = False,
             integer: bool = False) -> pd.Series:
    """A numeric column (float64): non-numbers, NaN/inf (unless allowed) and negatives are errors."""
    if pd.api.types.is_bool_dtype(series):
        series = series.astype("int8")
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    raw = series
    if _is_text(series) and values.isna().any():
        unparsed = values.isna() & ~series.str.strip().str.lower().isin(["", "nan"])
        _fail_where(unparsed, str(path), col, "not a number", fix, raw)
    if not allow_nan:
        _fail_where(values.isna(), str(path), col, "missing value (empty or NaN)", fix, raw)
    _fail_where(np.isinf(values), str(path), col, "infinite value", fix, raw)
    _fail_where(values < 0, str(path), col, "negative value", fix, raw)
    if integer:
        _fail_where(values.notna() & (values != np.floor(values)), str(path), col, "not a whole number",
                    fix, raw)
    return values


def _labels(series: pd.Series, path: Path, col: str) -> pd.Series:
    """A 0/1 label column as int8 (also accepts true/false)."""
    if pd.api.types.is_bool_dtype(series) and not series.isna().any():
        return series.astype("int8")
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    unparsed = values.isna()
    if _is_text(series) and unparsed.any():
        values[unparsed] = series[unparsed].str.strip().str.lower().map({"true": 1.0, "false": 0.0})
    _fail_where(~values.isin([0.0, 1.0]), str(path), col, "label is not 0 or 1",
                f"write {col} as 0 or 1", series)
    return values.astype("int8")


def _seconds(series: pd.Series, fmt: str | None = None) -> pd.Series:
    """Timestamps (unix seconds, or text in ``fmt`` or else ISO-8601; naive = UTC) as float unix seconds,
    NaN if unparsed."""
    if isinstance(series.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(series):
        stamps = series if isinstance(series.dtype, pd.DatetimeTZDtype) else series.dt.tz_localize("UTC")
        return ((stamps - _EPOCH) // pd.Timedelta(seconds=1)).astype("float64")
    if pd.api.types.is_bool_dtype(series):
        return pd.Series(np.nan, index=series.index)
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    values[np.isinf(values)] = np.nan
    text = values.isna() & series.notna()
    if text.any() and _is_text(series):
        stamps = pd.to_datetime(series[text], format=fmt or "ISO8601", utc=True, errors="coerce")
        values[text] = ((stamps - _EPOCH) // pd.Timedelta(seconds=1)).astype("float64")
    return values


def _plausible_seconds(values: pd.Series, path: Path, col: str, raw: pd.Series, unit: str = "timestamp") -> None:
    """Refuse times before EARLIEST (Excel serial dates, days, row numbers) or in the future: either
    stretches the time span, so the temporal split leaves validation or test without rows."""
    latest = time.time() + FUTURE_SLACK_S
    _fail_where(values.abs() > 1e11, str(path), col, f"{unit} too large (milliseconds?)",
                "give unix time in seconds (divide milliseconds by 1000)", raw)
    serial_days = " (an Excel serial date, counted from 1899-12-30?)" if unit == "day" else ""
    _fail_where(values > latest, str(path), col, f"{unit} in the future "
                f"(after {pd.Timestamp(latest, unit='s'):%Y-%m-%d}){serial_days}",
                "correct the clock or the year of these rows, or remove them", raw)
    serial = (values >= 20_000) & (values <= 80_000)
    _fail_where(serial & (values < EARLIEST.timestamp()), str(path), col,
                f"{unit} before {EARLIEST:%Y-%m-%d}: it looks like an Excel serial date (days since 1899-12-30)",
                "export dates as ISO-8601 text (e.g. 2024-01-31T12:00:00Z) or unix seconds", raw)
    _fail_where(values < EARLIEST.timestamp(), str(path), col, f"{unit} before {EARLIEST:%Y-%m-%d}",
                "give unix seconds (e.g. 1706700000) or ISO-8601; remove rows from before 1990", raw)


def _timestamps(series: pd.Series, path: Path, col: str = "timestamp", fmt: str | None = None) -> pd.Series:
    """A timestamp column as int64 unix seconds; unparseable, Excel-rounded, millisecond, pre-1990 and
    future values are errors."""
    if _is_text(series):
        _fail_where(_excel_scientific(series), str(path), col,
                    "timestamp in scientific notation: a spreadsheet rounded away its last digits",
                    "re-export with the column formatted as a whole number or as text", series)
    values = _seconds(series, fmt)
    fix = (f"write every timestamp as timestamp_format = {fmt!r} says (shop.toml), or unix seconds" if fmt else
           "use unix seconds (e.g. 1706700000) or ISO-8601 (e.g. 2024-01-31T12:00:00Z), or give "
           "timestamp_format = \"%d/%m/%Y %H:%M\" (your format) in shop.toml")
    _fail_where(values.isna(), str(path), col, "unparseable timestamp", fix, series)
    _plausible_seconds(values, path, col, series)
    return np.floor(values).astype("int64")


def temporal_split_counts(timestamps: np.ndarray, val_fraction: float = SPLIT_FRACTIONS[0],
                          test_fraction: float = SPLIT_FRACTIONS[1]) -> dict[str, int]:
    """Rows per split of the temporal split (the rule of `shared.features.assign_splits`: cuts at shares
    of the time span, not of the rows)."""
    ts = np.asarray(timestamps, dtype=np.int64)
    if not len(ts):
        return {"train": 0, "validation": 0, "test": 0}
    t0, span = ts.min(), max(int(ts.max() - ts.min()), 1)
    val_start = t0 + span * (1 - val_fraction - test_fraction)
    test_start = t0 + span * (1 - test_fraction)
    test = int((ts >= test_start).sum())
    val = int((ts >= val_start).sum()) - test
    return {"train": len(ts) - val - test, "validation": val, "test": test}


def _check_split(ts: pd.Series, path: Path, col: str) -> None:
    """Refuse a log whose temporal split leaves a split without rows (an outlying timestamp stretches
    the span): every task would then vanish from that split's report."""
    counts = temporal_split_counts(ts.to_numpy())
    if len(ts) < SPLIT_CHECK_MIN_ROWS or all(counts.values()):
        return
    empty = [name for name, n in counts.items() if n == 0]
    median = float(np.median(ts))
    far = int(np.argmax(np.abs(ts.to_numpy() - median)))
    shown = ", ".join(f"{name} {n:,}" for name, n in counts.items())
    raise ShopDataError(str(path), f"the temporal split (validation and test = the last "
                        f"{SPLIT_FRACTIONS[0]:.0%} and {SPLIT_FRACTIONS[1]:.0%} of the time span) leaves "
                        f"{' and '.join(empty)} without rows ({shown} rows); the most outlying timestamp, "
                        f"{pd.Timestamp(int(ts.iloc[far]), unit='s'):%Y-%m-%d %H:%M}, is "
                        f"{abs(ts.iloc[far] - median) / 86400:,.0f} days from the median",
                        "correct or remove the outlying rows (a wrong year or clock), or export one continuous "
                        "period", row=_row(far), column=col)


def _text(series: pd.Series) -> pd.Series:
    """A categorical side column as text; missing values become the empty string."""
    return series.astype(object).where(series.notna(), "").astype(str)


def _extra(series: pd.Series) -> pd.Series:
    """An extra ``ctx_*``/``item_*``/``user_*`` column: numeric if every value is a number, else text."""
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.astype("float64")
    values = pd.to_numeric(series, errors="coerce")
    if len(series) and values.notna().all():
        return values.astype("float64")
    return _text(series)


def _unique(ids: pd.Series, path: Path, col: str, what: str) -> None:
    """Raise on the first row repeating an ID, naming the row it repeats."""
    dup = ids.duplicated(keep="first").to_numpy()
    if dup.any():
        pos = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((ids == ids.iloc[pos]).to_numpy())[0])
        raise ShopDataError(str(path), f"duplicate {what} row: {col} {ids.iloc[pos]!r} already on row "
                            f"{_row(first)}", f"keep one row per {col} (merge or delete the duplicates)",
                            row=_row(pos), column=col)


def _ignored(frame: pd.DataFrame, kept: set[str], prefixes: tuple[str, ...] = ()) -> list[str]:
    """Columns of ``frame`` the canonical form does not keep (reported in ``ShopData.meta``)."""
    return [c for c in frame.columns if c not in kept and not c.startswith(prefixes)]


def _load_interactions(path: Path, mapping: dict[str, str], items: tuple[pd.Series, Path] | None,
                       info: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate interactions (event log or label form) into the canonical exposure rows.

    ``items`` (the catalog's IDs and file) is checked against before events collapse, so an error
    names the merchant's own row.
    """
    frame = _read_table(path, mapping)
    _require(frame, ("user_id", "item_id", "timestamp"), path, mapping)
    if "event" in mapping:
        _require(frame, ("event",), path, mapping)
    if "event" not in frame.columns:
        _require(frame, ("clicked",), path, mapping,
                 " (give either an 'event' column or label columns 'clicked'/'purchased')")
    if not len(frame):
        raise ShopDataError(str(path), "empty shop: no interaction rows",
                            "export at least one interaction row under the header")
    info = info or {}
    out = pd.DataFrame({"user_id": _ids(frame, "user_id", path), "item_id": _ids(frame, "item_id", path),
                        "timestamp": _timestamps(frame["timestamp"], path, fmt=info.get("timestamp_format"))})
    _check_split(out["timestamp"], path, "timestamp")
    if items is not None:
        _check_known(out["item_id"], items[0], path, "item_id", items[1])
    labels = (_event_stages(frame, path, info.get("events", {})) if "event" in frame.columns
              else _label_columns(frame, path))
    out = pd.concat([out, labels], axis=1)
    if "device" in frame.columns:
        out["device"] = _text(frame["device"])
    if "hour" in frame.columns:
        hour = _numbers(frame["hour"], path, "hour", fix="give hour as a whole number 0..23", integer=True)
        _fail_where(hour > 23, str(path), "hour", "hour above 23", "give hour as a whole number 0..23",
                    frame["hour"])
        out["hour"] = hour.astype("int8")
    for col in frame.columns:
        if col.startswith("ctx_"):
            out[col] = _extra(frame[col])
    kept = {"user_id", "item_id", "timestamp", "event", "device", "hour", *INTERACTION_COLUMNS}
    ignored = _ignored(frame, kept, ("ctx_",))
    if "event" in frame.columns:
        out = _collapse_events(out)
    return out[list(INTERACTION_COLUMNS) + _context_columns(out)], ignored


_QTY_FIX = "give quantity as a number >= 0 (units bought)"


def _quantity(frame: pd.DataFrame, path: Path, bought: pd.Series) -> pd.Series:
    """Units bought per row: the ``quantity`` column on purchase rows (required there), else 0."""
    qty = _numbers(frame["quantity"], path, "quantity", fix=_QTY_FIX, allow_nan=True)
    _fail_where(qty.isna() & bought, str(path), "quantity", "missing quantity on a purchase", _QTY_FIX)
    return qty.fillna(0.0).where(bought, 0.0)


def _event_stages(frame: pd.DataFrame, path: Path, events: dict[str, str] | None = None) -> pd.DataFrame:
    """Event-log rows as ``_stage`` (index into EVENTS) and ``_bought`` (units), collapsed later.

    ``events`` maps the merchant's event values to ours (shop.toml ``[events]``, case-insensitive)."""
    theirs = {str(k).strip().lower(): _STAGE[v] for k, v in (events or {}).items()}
    stage = frame["event"].astype(str).str.strip().str.lower().map(theirs | _STAGE)
    hint = " or map yours in shop.toml, e.g. [events] view = \"impression\""
    _fail_where(stage.isna() | frame["event"].isna(), str(path), "event", "unknown event",
                f"use one of {list(EVENTS)}{'' if events else hint}"
                + (f" or one of the [events] values {sorted(events)} from shop.toml" if events else ""),
                frame["event"])
    purchase = stage == _STAGE["purchase"]
    bought = _quantity(frame, path, purchase) if "quantity" in frame.columns else purchase.astype("float64")
    return pd.DataFrame({"_stage": stage.astype("int8"), "_bought": bought})


def _label_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Label-form rows: 0/1 labels made consistent (purchased implies carted implies clicked)."""
    absent = pd.Series(0, index=frame.index, dtype="int8")
    purchased = _labels(frame["purchased"], path, "purchased") if "purchased" in frame.columns else absent
    carted = _labels(frame["carted"], path, "carted") if "carted" in frame.columns else purchased
    carted = np.maximum(carted, purchased)
    clicked = np.maximum(_labels(frame["clicked"], path, "clicked"), carted)
    qty = _quantity(frame, path, purchased == 1) if "quantity" in frame.columns else purchased
    return pd.DataFrame({"clicked": clicked.astype("int8"), "carted": carted.astype("int8"),
                         "purchased": purchased.astype("int8"), "quantity": qty.astype("float32")})


def _collapse_events(log: pd.DataFrame) -> pd.DataFrame:
    """One exposure row per (user, item, UTC day): furthest stage reached, units bought, first event."""
    log = log.assign(_day=log["timestamp"] // SECONDS_PER_DAY).sort_values("timestamp", kind="stable")
    agg = {"timestamp": "min", "_stage": "max", "_bought": "sum"}
    agg.update({c: "first" for c in _context_columns(log)})
    rows = log.groupby(["user_id", "item_id", "_day"], sort=False).agg(agg).reset_index()
    stage = rows.pop("_stage")
    rows["clicked"] = (stage >= _STAGE["click"]).astype("int8")
    rows["carted"] = (stage >= _STAGE["cart"]).astype("int8")
    rows["purchased"] = (stage >= _STAGE["purchase"]).astype("int8")
    rows["quantity"] = rows.pop("_bought").astype("float32")
    return rows.drop(columns="_day")


def _load_items(path: Path, mapping: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate the item catalog."""
    frame = _read_table(path, mapping)
    _require(frame, ("item_id",), path, mapping)
    out = pd.DataFrame({"item_id": _ids(frame, "item_id", path)})
    _unique(out["item_id"], path, "item_id", "item")
    for col in ("global_key", "category", "brand"):
        if col in frame.columns:
            out[col] = _text(frame[col])
    if "price" in frame.columns:
        out["price"] = _numbers(frame["price"], path, "price",
                                fix="give every price as a number >= 0, or drop the price column")
    for col in frame.columns:
        if col.startswith("item_") and col != "item_id":
            out[col] = _extra(frame[col])
    return out, _ignored(frame, {"item_id", "global_key", *ITEM_SIDE_COLUMNS}, ("item_",))


def _load_users(path: Path, mapping: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate the user table."""
    frame = _read_table(path, mapping)
    _require(frame, ("user_id",), path, mapping)
    out = pd.DataFrame({"user_id": _ids(frame, "user_id", path)})
    _unique(out["user_id"], path, "user_id", "user")
    for col in USER_SIDE_COLUMNS:
        if col in frame.columns:
            out[col] = _text(frame[col])
    for col in frame.columns:
        if col.startswith("user_") and col != "user_id":
            out[col] = _extra(frame[col])
    return out, _ignored(frame, {"user_id", *USER_SIDE_COLUMNS}, ("user_",))


def _load_sales(path: Path, mapping: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate daily sales (day as days since epoch or an ISO date)."""
    frame = _read_table(path, mapping)
    _require(frame, ("item_id", "day", "units"), path, mapping)
    item_id = _ids(frame, "item_id", path)
    raw_day = frame["day"]
    days = _seconds(raw_day)
    if _is_text(raw_day):
        is_number = pd.to_numeric(raw_day, errors="coerce").notna()
    else:
        numeric = pd.api.types.is_numeric_dtype(raw_day) and not pd.api.types.is_bool_dtype(raw_day)
        is_number = pd.Series(numeric, index=raw_day.index)
    # numbers are already days since epoch; ISO dates and datetimes came back as seconds
    days = days.where(is_number, np.floor(days / SECONDS_PER_DAY))
    fix = "give day as days since 1970-01-01 (e.g. 19753) or an ISO date (e.g. 2024-01-31)"
    if _is_text(raw_day):
        _fail_where(_excel_scientific(raw_day), str(path), "day",
                    "day in scientific notation: a spreadsheet rounded it", fix, raw_day)
    _fail_where(days.isna() | (days != np.floor(days)) | (days.abs() > 1e6), str(path), "day",
                "unparseable day", fix, raw_day)
    _plausible_seconds(days * SECONDS_PER_DAY, path, "day", raw_day, unit="day")
    units = _numbers(frame["units"], path, "units", fix="give units sold as a number >= 0")
    promo = (_labels(frame["promo"], path, "promo") if "promo" in frame.columns
             else pd.Series(0, index=frame.index, dtype="int8"))
    out = pd.DataFrame({"item_id": item_id, "day": days.astype("int32"), "units": units.astype("float32"),
                        "promo": promo})
    dup = out.duplicated(["item_id", "day"]).to_numpy()
    _fail_where(dup, str(path), "day", "duplicate (item_id, day) row",
                "keep one row per item and day (sum the units)", raw_day)
    return out, _ignored(frame, set(SALES_COLUMNS))


def derive_sales(interactions: pd.DataFrame) -> pd.DataFrame:
    """Units per item and period from purchases, for shops that supply no sales table.

    Periods are days, or weeks (``day`` = the week's first day) when the log spans more than
    SALES_WEEKLY_AFTER_DAYS. Zero rows fill each item's periods from its first sale to a few periods
    after its last one, not the whole log: long logs of rarely sold items would otherwise explode
    (14 years of Amazon ratings gave 46M daily rows).
    """
    day = (interactions["timestamp"] // SECONDS_PER_DAY).astype("int64")
    bought = interactions["purchased"] == 1
    if not bought.any():
        return pd.DataFrame({"item_id": pd.Series(dtype=str), "day": pd.Series(dtype="int32"),
                             "units": pd.Series(dtype="float32"), "promo": pd.Series(dtype="int8")})
    width = 7 if day.max() - day.min() > SALES_WEEKLY_AFTER_DAYS else 1
    # Weeks start on Monday (day 0 of the epoch was a Thursday).
    period = (day - ((day + 3) % 7)) // 7 if width == 7 else day
    units = interactions.loc[bought, "quantity"].astype("float64").groupby(
        [interactions.loc[bought, "item_id"].to_numpy(), period[bought].to_numpy()]).sum()
    units.index.names = ["item_id", "period"]
    span = units.reset_index().groupby("item_id")["period"].agg(["min", "max"])
    last = int(period.max())
    stop = np.minimum(span["max"].to_numpy() + SALES_TAIL_PERIODS, last)
    lengths = (stop - span["min"].to_numpy() + 1).astype(np.int64)
    item = np.repeat(span.index.to_numpy(), lengths)
    offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    per = np.repeat(span["min"].to_numpy(), lengths) + offset
    full = pd.MultiIndex.from_arrays([item, per], names=["item_id", "period"])
    filled = units.reindex(full, fill_value=0.0).reset_index(name="units")
    first_day = filled["period"] * 7 + 4 if width == 7 else filled["period"]  # Monday of the week
    return pd.DataFrame({"item_id": filled["item_id"].astype(str), "day": first_day.astype("int32"),
                         "units": filled["units"].astype("float32"),
                         "promo": np.zeros(len(filled), dtype="int8")})


def _check_known(ids: pd.Series, known: pd.Series, path: Path, col: str, other: Path) -> None:
    """Raise on the first row whose ID is not in the other table."""
    _fail_where(~ids.isin(known).to_numpy(), str(path), col, f"{col} not found in {other.name}",
                f"add the missing {col}s to {other.name}, or remove those rows", ids)


def load_shop_dir(path: str | Path) -> ShopData:
    """Read and validate a merchant's shop directory (see module docstring); raises ShopDataError.

    Nothing is written; all checks run before a ShopData is returned. Errors name columns as the
    merchant's files do (through shop.toml ``[columns]``).
    """
    root = Path(path)
    if not root.is_dir():
        raise ShopDataError(str(root), "no such shop directory", "pass the folder holding interactions.csv")
    info = _read_toml(root)
    files = {stem: _find_file(root, stem) for stem in TABLES}
    inter_path = files["interactions"]
    if inter_path is None:
        found = sorted(p.name for p in root.iterdir())
        raise ShopDataError(str(root), f"missing interactions file; found {found}",
                            "add interactions.csv or interactions.parquet")
    name = info.get("name")
    if name is None:  # the folder name becomes the shop name, so it must be as safe as a shop.toml name
        try:
            name = check_shop_name(root.resolve().name, str(root))
        except ShopDataError as exc:
            raise ShopDataError(str(root), f"{exc.problem}; shop.toml gives no name, so the folder name is used",
                                f'add name = "corner-shop" to {SHOP_TOML} ({SHOP_NAME_RULE})') from None
    try:
        return _load_tables(root, files, info, name)
    except ShopDataError as exc:
        stem = Path(exc.file).stem
        raise exc.in_merchant_terms(_mapping_for(info, stem) if stem in TABLES else {}) from None


def _load_tables(root: Path, files: dict[str, Path | None], info: dict, name: str) -> ShopData:
    """Read every table of a shop directory whose shop.toml and file set were checked."""
    inter_path = files["interactions"]
    assert inter_path is not None
    tables: dict[str, pd.DataFrame | None] = {"items": None, "users": None, "sales": None}
    ignored: dict[str, list[str]] = {}
    if files["items"] is not None:
        tables["items"], ignored["items"] = _load_items(files["items"], _mapping_for(info, "items"))
    items = tables["items"]
    known = None if items is None else (items["item_id"], files["items"])
    interactions, ignored["interactions"] = _load_interactions(
        inter_path, _mapping_for(info, "interactions"), known, info)
    if files["users"] is not None:
        tables["users"], ignored["users"] = _load_users(files["users"], _mapping_for(info, "users"))
    sales = None
    if files["sales"] is not None:
        sales, ignored["sales"] = _load_sales(files["sales"], _mapping_for(info, "sales"))
        if items is not None:
            _check_known(sales["item_id"], items["item_id"], files["sales"], "item_id", files["items"])
    if sales is None:
        derived = derive_sales(interactions)
        sales = derived if len(derived) else None
    meta = {**info.get("meta", {}), "source": "shop_dir", "path": str(root),
            "sales_derived": files["sales"] is None,
            "ignored_columns": {k: v for k, v in ignored.items() if v}}
    return ShopData(name=name, interactions=interactions, items=items,
                    users=tables["users"], sales=sales, currency=info.get("currency", "EUR"), meta=meta)


def check_unique_names(shops: list[ShopData] | tuple[ShopData, ...]) -> None:
    """Refuse two shops with one name: their metrics and state folders would merge."""
    seen: dict[str, ShopData] = {}
    for shop in shops:
        if shop.name in seen:
            first = seen[shop.name].meta.get("path", "(generated)")
            second = shop.meta.get("path", "(generated)")
            raise ShopDataError(str(second), f"shop name {shop.name!r} is also the name of {first}; their "
                                "metrics and state would merge", f"give each shop its own name = \"...\" in "
                                f"{SHOP_TOML}", column="name")
        seen[shop.name] = shop
