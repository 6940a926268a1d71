"""MovieLens-100K as federated shops, split by user region (one catalog) or by genre group (disjoint catalogs).

Reads a user's own copy in either of its two public layouts: RecBole atomic files (``ml-100k.inter``,
``.item``, ``.user``; tab-separated, ``name:type`` header) or the original GroupLens files (``u.data``,
``u.item``, ``u.user``). Every rating becomes a click, a rating >= ``rating_threshold`` a purchase, and
``negatives_per_positive`` sampled unrated catalog items per rating become impressions, so one shop carries
CTR, CVR, ranking and (weekly) sales tasks. The file-reading and rating-log helpers here are reused by
the Amazon and Alibaba adapters.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from shared.schema import ShopData, ShopDataError, check_file_size

# GroupLens u.item genre flag order; a movie's primary genre is its first genre in this order.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")

# Shop -> genres whose movies it sells (by primary genre). Ratings per shop on ML-100K: 31.3k, 23.2k,
# 27.1k, 6.5k, 11.9k; catalogs 362, 457, 538, 93, 232 movies.
GENRE_GROUPS: dict[str, tuple[str, ...]] = {
    "ml-action": ("Action", "Adventure", "Sci-Fi", "Thriller"),
    "ml-comedy": ("Comedy", "Romance"),
    "ml-drama": ("Drama", "War", "unknown"),
    "ml-family": ("Children's", "Animation", "Musical", "Fantasy"),
    "ml-crime-horror": ("Horror", "Crime", "Mystery", "Film-Noir", "Documentary", "Western"),
}

# Shop -> first ZIP digits of its users. Non-numeric (Canadian) postal codes, 18 users, join the
# smallest US group so every shop holds 160-230 users: users/ratings 193/19.7k, 163/16.5k,
# 198/19.7k, 163/17.8k, 226/26.3k on ML-100K.
REGION_GROUPS: dict[str, str] = {
    "ml-zip0-1": "01",
    "ml-zip2-3": "23",
    "ml-zip4-5": "45",
    "ml-zip6-7": "67",
    "ml-zip8-9": "89",
}
NON_NUMERIC_REGION_SHOP = "ml-zip6-7"

# MovieLens-1M's age groups, the usual buckets for this data.
AGE_EDGES = (0, 18, 25, 35, 45, 50, 56, 200)
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")

SECONDS_PER_DAY = 86_400
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


# ---------------------------------------------------------------- reading files with precise errors

def read_delimited(path: Path, *, sep: str, names: list[str] | None = None, header: bool = True,
                   encoding: str = "utf-8", numeric: Iterable[str] = ()) -> pd.DataFrame:
    """Read a delimited text file, turning parser failures into ShopDataError.

    Columns in ``numeric`` are parsed as float64 by pandas' C parser (fast on large logs); if any value
    does not parse, the whole file is re-read as strings so `parse_numbers` can name the bad line.
    Other columns are strings.
    """
    check_file_size(path)  # a file above $FEDSHOP_MAX_FILE_MB is refused before pandas reads it whole
    kwargs = dict(sep=sep, header=0 if header else None, names=names, keep_default_na=False,
                  encoding=encoding, quoting=csv.QUOTE_NONE)
    try:
        numeric = list(numeric)
        if numeric:
            try:
                types = defaultdict(lambda: str, {c: np.float64 for c in numeric})
                return pd.read_csv(path, dtype=types, **kwargs)
            except ValueError as exc:
                if isinstance(exc, pd.errors.ParserError):
                    raise
        return pd.read_csv(path, dtype=str, **kwargs)
    except pd.errors.ParserError as exc:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if match:
            want, line, saw = (int(g) for g in match.groups())
            raise ShopDataError(str(path), f"expected {want} fields, found {saw}",
                                f"make every row hold exactly {want} '{sep}'-separated fields",
                                row=line) from exc
        raise ShopDataError(str(path), f"cannot parse the file ({exc})",
                            f"check that fields are separated by {sep!r}") from exc
    except UnicodeDecodeError as exc:
        raise ShopDataError(str(path), f"not valid {encoding} text ({exc.reason} at byte {exc.start})",
                            f"save the file as {encoding}") from exc
    except pd.errors.EmptyDataError as exc:
        raise ShopDataError(str(path), "the file is empty", "supply a file with data rows") from exc


def parse_numbers(values: pd.Series, *, file: Path, column: str, first_line: int,
                  integer: bool = False, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Parse a column to float64, raising ShopDataError at the first bad value's file line."""
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(dtype=np.float64)
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if integer:
        bad |= np.isfinite(numbers) & (numbers != np.floor(numbers))
    if low is not None:
        bad |= numbers < low
    if high is not None:
        bad |= numbers > high
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "an integer" if integer else "a number"
        if low is not None or high is not None:
            kind += f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        value = values.iloc[i]
        shown = repr(value) if isinstance(value, str) else f"{float(value):g}"
        raise ShopDataError(str(file), f"value {shown} is not {kind}",
                            f"correct or remove that row (expected {kind})", row=first_line + i, column=column)
    return numbers


def require_nonempty(values: pd.Series, *, file: Path, column: str, first_line: int) -> None:
    """Raise ShopDataError at the first empty ID value."""
    empty = (values.str.strip() == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ShopDataError(str(file), "empty value", "fill in the ID or remove the row",
                            row=first_line + i, column=column)


# ---------------------------------------------------------------- rating log -> canonical shop tables

def sample_negatives(user_codes: np.ndarray, item_codes: np.ndarray, n_items: int, per_row: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_row`` catalog items per rating, uniformly among items that user never rated.

    Returns (rating row of each negative, negative item code). Exact and vectorised: draw rank r among
    the user's free items, then shift r past the rated items at or below it (counted by searchsorted on
    ``rated_sorted[j] - j``), so no rejection loop is needed. Users who rated the whole catalog get none.
    """
    user_codes = user_codes.astype(np.int64)
    pairs = np.unique(user_codes * n_items + item_codes.astype(np.int64))  # sorted by user, then item
    pair_user, pair_item = np.divmod(pairs, n_items)
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    rated = np.bincount(pair_user, minlength=n_users)
    start = np.cumsum(rated) - rated
    shifted = pair_item - (np.arange(len(pairs)) - start[pair_user])  # non-decreasing within a user
    keys = pair_user * (n_items + 1) + shifted

    rows = np.repeat(np.arange(len(user_codes)), per_row)
    users = user_codes[rows]
    free = n_items - rated[users]
    keep = free > 0
    rows, users, free = rows[keep], users[keep], free[keep]
    rank = rng.integers(0, free) if len(rows) else np.zeros(0, dtype=np.int64)
    below = np.searchsorted(keys, users * (n_items + 1) + rank, side="right") - start[users]
    return rows, rank + below


def ratings_to_interactions(ratings: pd.DataFrame, catalog: np.ndarray, *, rating_threshold: float,
                            negatives_per_positive: int, rng: np.random.Generator) -> pd.DataFrame:
    """Ratings -> canonical interactions: each rating a click, high ratings purchases, plus sampled impressions."""
    item_codes = pd.Index(catalog).get_indexer(ratings["item_id"])
    assert (item_codes >= 0).all(), "every rated item must be in the shop's catalog"
    user_codes, _ = pd.factorize(ratings["user_id"])
    timestamps = ratings["timestamp"].to_numpy(dtype=np.int64)
    bought = (ratings["rating"].to_numpy() >= rating_threshold).astype(np.int8)
    positives = pd.DataFrame({
        "user_id": ratings["user_id"].to_numpy(), "item_id": ratings["item_id"].to_numpy(),
        "timestamp": timestamps, "clicked": np.ones(len(ratings), np.int8), "carted": bought,
        "purchased": bought, "quantity": bought.astype(np.float32),
    })
    rows, negative_codes = sample_negatives(user_codes, item_codes, len(catalog), negatives_per_positive, rng)
    zeros = np.zeros(len(rows), np.int8)
    negatives = pd.DataFrame({
        "user_id": ratings["user_id"].to_numpy()[rows], "item_id": np.asarray(catalog)[negative_codes],
        "timestamp": timestamps[rows], "clicked": zeros, "carted": zeros, "purchased": zeros,
        "quantity": zeros.astype(np.float32),
    })
    inter = pd.concat([positives, negatives], ignore_index=True)
    inter = inter.iloc[np.argsort(inter["timestamp"].to_numpy(), kind="stable")].reset_index(drop=True)
    inter["user_id"] = inter["user_id"].astype(str)
    inter["item_id"] = inter["item_id"].astype(str)
    return inter


def weekly_sales(item_ids: pd.Series, timestamps: np.ndarray) -> pd.DataFrame:
    """Weekly counts per item, zero weeks included, from the item's first event to the shop's last week.

    ``day`` is the Monday starting the week, in days since the epoch; ``promo`` is 0 (no promotion data).
    """
    days = np.asarray(timestamps, dtype=np.int64) // SECONDS_PER_DAY
    weeks = days - (days + 3) % 7  # 1970-01-01 was a Thursday
    codes, uniques = pd.factorize(item_ids, sort=True)
    first = np.full(len(uniques), np.iinfo(np.int64).max)
    np.minimum.at(first, codes, weeks)
    n_weeks = (weeks.max() - first) // 7 + 1 if len(weeks) else first
    grid_start = np.cumsum(n_weeks) - n_weeks
    units = np.bincount(grid_start[codes] + (weeks - first[codes]) // 7, minlength=int(n_weeks.sum()))
    item_of_row = np.repeat(np.arange(len(uniques)), n_weeks)
    offset = np.arange(len(units)) - grid_start[item_of_row]
    return pd.DataFrame({
        "item_id": pd.Series(np.asarray(uniques)[item_of_row], dtype=str),
        "day": (first[item_of_row] + 7 * offset).astype(np.int32),
        "units": units.astype(np.float32),
        "promo": np.zeros(len(units), np.int8),
    })


def rating_shop(name: str, ratings: pd.DataFrame, catalog: np.ndarray, *, rating_threshold: float,
                negatives_per_positive: int, rng: np.random.Generator, items: pd.DataFrame | None = None,
                users: pd.DataFrame | None = None, meta: dict | None = None) -> ShopData:
    """Assemble one ShopData from a rating log (columns user_id, item_id, rating, timestamp) and its catalog."""
    inter = ratings_to_interactions(ratings, catalog, rating_threshold=rating_threshold,
                                    negatives_per_positive=negatives_per_positive, rng=rng)
    sales = weekly_sales(ratings["item_id"], ratings["timestamp"].to_numpy())
    return ShopData(name=name, interactions=inter, items=items, users=users, sales=sales, meta=meta or {})


# ---------------------------------------------------------------- MovieLens files

def _fields_from_header(frame: pd.DataFrame, file: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Strip RecBole's ``:type`` header suffixes and check the required fields are present."""
    frame = frame.rename(columns=lambda c: str(c).split(":", 1)[0])
    for field in required:
        if field not in frame.columns:
            raise ShopDataError(str(file), f"missing field '{field}' (found {list(frame.columns)})",
                                f"add a '{field}:<type>' column to the header", column=field)
    return frame


def _primary_genre_from_tokens(genres: pd.Series, file: Path) -> np.ndarray:
    """First genre in GroupLens flag order among a movie's space-separated genre tokens."""
    order = {g: i for i, g in enumerate(GENRES)}
    tokens = genres.str.split().explode()
    rank = tokens.map(order)
    unknown = tokens.notna() & rank.isna()
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        line = int(tokens.index[row]) + 2
        raise ShopDataError(str(file), f"unknown genre {tokens.iloc[row]!r}",
                            f"use the MovieLens genre names: {', '.join(GENRES)}", row=line, column="class")
    best = rank.groupby(level=0).min().reindex(genres.index).fillna(0).astype(int)
    return np.asarray(GENRES)[best.to_numpy()]


def _read_recbole(folder: Path, stem: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ratings, movies and people from RecBole atomic files ``<stem>.inter/.item/.user``."""
    inter_file, item_file, user_file = (folder / f"{stem}.{ext}" for ext in ("inter", "item", "user"))
    inter = _fields_from_header(read_delimited(inter_file, sep="\t"), inter_file, RATING_COLUMNS)
    item = _fields_from_header(read_delimited(item_file, sep="\t"), item_file,
                               ("item_id", "release_year", "class"))
    user = _fields_from_header(read_delimited(user_file, sep="\t"), user_file,
                               ("user_id", "age", "gender", "occupation", "zip_code"))
    ratings = _ratings_frame(inter, inter_file, first_line=2)
    movies = pd.DataFrame({
        "item_id": item["item_id"].str.strip(),
        "year": pd.to_numeric(item["release_year"], errors="coerce").astype(np.float32),
        "genre": _primary_genre_from_tokens(item["class"], item_file),
    })
    people = _people_frame(user, user_file, first_line=2)
    _check_unique(movies["item_id"], item_file, "item_id", first_line=2)
    return ratings, movies, people


def _read_grouplens(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ratings, movies and people from the original GroupLens ``u.data``, ``u.item``, ``u.user``."""
    data_file, item_file, user_file = folder / "u.data", folder / "u.item", folder / "u.user"
    inter = read_delimited(data_file, sep="\t", names=list(RATING_COLUMNS), header=False,
                           numeric=("rating", "timestamp"))
    item_names = ["item_id", "title", "release_date", "video_date", "url", *GENRES]
    item = read_delimited(item_file, sep="|", names=item_names, header=False, encoding="latin-1")
    user = read_delimited(user_file, sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"],
                          header=False, encoding="latin-1")
    ratings = _ratings_frame(inter, data_file, first_line=1)
    flags = np.column_stack([parse_numbers(item[g], file=item_file, column=g, first_line=1, low=0, high=1)
                             for g in GENRES])
    primary = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    movies = pd.DataFrame({
        "item_id": item["item_id"].str.strip(),
        "year": pd.to_numeric(item["release_date"].str[-4:], errors="coerce").astype(np.float32),
        "genre": np.asarray(GENRES)[primary],
    })
    people = _people_frame(user, user_file, first_line=1)
    _check_unique(movies["item_id"], item_file, "item_id", first_line=1)
    return ratings, movies, people


def _ratings_frame(raw: pd.DataFrame, file: Path, *, first_line: int) -> pd.DataFrame:
    """Validated ratings: str IDs, float rating, int64 unix-second timestamp."""
    for column in ("user_id", "item_id"):
        require_nonempty(raw[column], file=file, column=column, first_line=first_line)
    rating = parse_numbers(raw["rating"], file=file, column="rating", first_line=first_line)
    # RecBole types the timestamp as float; the values are whole seconds.
    ts = parse_numbers(raw["timestamp"], file=file, column="timestamp", first_line=first_line, low=0)
    if not len(raw):
        raise ShopDataError(str(file), "no ratings", "supply at least one rating row")
    return pd.DataFrame({"user_id": raw["user_id"].str.strip().astype(str),
                         "item_id": raw["item_id"].str.strip().astype(str),
                         "rating": rating, "timestamp": np.floor(ts).astype(np.int64)})


def _people_frame(raw: pd.DataFrame, file: Path, *, first_line: int) -> pd.DataFrame:
    """Validated user table with an age bucket and the region (first ZIP character)."""
    require_nonempty(raw["user_id"], file=file, column="user_id", first_line=first_line)
    age = parse_numbers(raw["age"], file=file, column="age", first_line=first_line, low=0, high=199)
    zip_code = raw["zip_code"].str.strip().str.upper()
    people = pd.DataFrame({
        "user_id": raw["user_id"].str.strip().astype(str),
        "age_bucket": pd.Series(np.asarray(AGE_BUCKETS)[np.searchsorted(AGE_EDGES, age, side="right") - 1],
                                dtype=str),
        "gender": raw["gender"].str.strip().astype(str),
        "region": zip_code.str[:1].astype(str),
        "user_occupation": raw["occupation"].str.strip().astype(str),
    })
    _check_unique(people["user_id"], file, "user_id", first_line=first_line)
    return people


def _check_unique(ids: pd.Series, file: Path, column: str, *, first_line: int) -> None:
    """Raise ShopDataError at the first repeated ID."""
    dup = ids.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ShopDataError(str(file), f"duplicate {column} {ids.iloc[i]!r}", "keep one row per ID",
                            row=first_line + i, column=column)


def _codes_in(ids: pd.Series, known: pd.Series, file: Path, column: str, ref: str, *,
              first_line: int) -> np.ndarray:
    """Position of each ID in ``known``; raise ShopDataError at the first ID missing from it."""
    codes = pd.Index(known).get_indexer(ids)
    missing = codes < 0
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise ShopDataError(str(file), f"{column} {ids.iloc[i]!r} is not in {ref}",
                            f"add it to {ref} or remove the rating", row=first_line + i, column=column)
    return codes


def _detect(folder: Path) -> tuple[str, str]:
    """Which layout the folder holds: ("recbole", stem) or ("grouplens", "u")."""
    if not folder.is_dir():
        raise ShopDataError(str(folder), "not a folder",
                            "pass the folder holding ml-100k.inter/.item/.user or u.data/u.item/u.user")
    for inter in sorted(folder.glob("*.inter")):
        stem = inter.name[: -len(".inter")]
        if (folder / f"{stem}.item").is_file() and (folder / f"{stem}.user").is_file():
            return "recbole", stem
    if all((folder / f).is_file() for f in ("u.data", "u.item", "u.user")):
        return "grouplens", "u"
    raise ShopDataError(str(folder), "no MovieLens files found",
                        "supply RecBole atomic files (ml-100k.inter, ml-100k.item, ml-100k.user) "
                        "or the GroupLens originals (u.data, u.item, u.user) in this folder")


def load_movielens(path: str | Path, *, split_by: str = "region", seed: int = 0,
                   negatives_per_positive: int = 1, rating_threshold: float = 4.0) -> list[ShopData]:
    """Split MovieLens-100K into shops by user region (shared catalog) or genre group (disjoint catalogs)."""
    if split_by not in ("region", "genre"):
        raise ValueError(f"split_by must be 'region' or 'genre', got {split_by!r}")
    if negatives_per_positive < 0:
        raise ValueError(f"negatives_per_positive must be >= 0, got {negatives_per_positive}")
    folder = Path(path).expanduser()
    layout, stem = _detect(folder)
    if layout == "recbole":
        ratings, movies, people = _read_recbole(folder, stem)
        rating_file, first_line = folder / f"{stem}.inter", 2
    else:
        ratings, movies, people = _read_grouplens(folder)
        rating_file, first_line = folder / "u.data", 1
    rating_item = _codes_in(ratings["item_id"], movies["item_id"], rating_file, "item_id", "the item file",
                            first_line=first_line)
    rating_user = _codes_in(ratings["user_id"], people["user_id"], rating_file, "user_id", "the user file",
                            first_line=first_line)

    items = pd.DataFrame({
        "item_id": movies["item_id"].astype(str),
        "global_key": movies["item_id"].astype(str),
        "category": ("Movies>" + movies["genre"].str.replace("unknown", "Unknown")).astype(str),
        "item_year": movies["year"].astype(np.float32),
    })
    if split_by == "region":
        digit_to_shop = {d: shop for shop, digits in REGION_GROUPS.items() for d in digits}
        shop_of_user = people["region"].map(digit_to_shop).fillna(NON_NUMERIC_REGION_SHOP).to_numpy()
        shop_of_rating = shop_of_user[rating_user]
        groups = dict(REGION_GROUPS)
    else:
        genre_to_shop = {g: shop for shop, genres in GENRE_GROUPS.items() for g in genres}
        shop_of_item = movies["genre"].map(genre_to_shop).to_numpy()
        shop_of_rating = shop_of_item[rating_item]
        groups = {shop: "/".join(genres) for shop, genres in GENRE_GROUPS.items()}

    meta_base = {"source": "movielens-100k", "split_by": split_by, "format": layout,
                 "rating_threshold": rating_threshold, "negatives_per_positive": negatives_per_positive,
                 "sales_period_days": 7}
    shops: list[ShopData] = []
    for index, (shop, group) in enumerate(groups.items()):
        in_shop = shop_of_rating == shop
        if not in_shop.any():
            continue
        if split_by == "region":
            shop_users = people[shop_of_user == shop]
            shop_items = items
        else:
            shop_users = people[np.isin(np.arange(len(people)), rating_user[in_shop])]
            shop_items = items[shop_of_item == shop]
        shops.append(rating_shop(
            shop, ratings[in_shop].reset_index(drop=True), shop_items["item_id"].to_numpy(),
            rating_threshold=rating_threshold, negatives_per_positive=negatives_per_positive,
            rng=np.random.default_rng([seed, index]),
            items=shop_items.reset_index(drop=True), users=shop_users.reset_index(drop=True),
            meta={**meta_base, "group": group}))
    return shops
