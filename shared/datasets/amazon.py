"""Amazon product ratings (McAuley et al.) as ID-only shops: no side fields and no global product key.

Input: a headerless CSV ``reviewer_id,asin,rating,unix_ts`` (ratings 1-5). Ratings become clicks,
ratings >= 4 purchases, sampled unrated items impressions, weekly rating counts sales: the same
conventions as the MovieLens adapter, so the system is exercised on a shop with nothing to share but
what the encoder learns from IDs and behaviour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.datasets.movielens import RATING_COLUMNS, parse_numbers, rating_shop, read_delimited, require_nonempty
from shared.schema import ShopData, ShopDataError

PURCHASE_THRESHOLD = 4.0


def read_amazon_ratings(path: str | Path) -> pd.DataFrame:
    """Validated rating log (user_id, item_id str; rating float64; timestamp int64) from the CSV."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "ratings.csv"
    if not file.is_file():
        raise ShopDataError(str(file), "file not found",
                            "pass the ratings CSV (reviewer_id,asin,rating,unix_ts, no header)")
    raw = read_delimited(file, sep=",", names=list(RATING_COLUMNS), header=False, numeric=("rating", "timestamp"))
    if raw.empty:
        raise ShopDataError(str(file), "no ratings", "supply at least one row reviewer_id,asin,rating,unix_ts")
    for column in ("user_id", "item_id"):
        require_nonempty(raw[column], file=file, column=column, first_line=1)
    rating = parse_numbers(raw["rating"], file=file, column="rating", first_line=1, low=1, high=5)
    ts = parse_numbers(raw["timestamp"], file=file, column="timestamp", first_line=1, integer=True, low=0)
    return pd.DataFrame({"user_id": raw["user_id"].str.strip().astype(str),
                         "item_id": raw["item_id"].str.strip().astype(str),
                         "rating": rating, "timestamp": ts.astype(np.int64)})


def load_amazon_ratings(path: str | Path, *, name: str = "amazon", seed: int = 0, negatives_per_positive: int = 1,
                        n_shops: int = 1) -> list[ShopData]:
    """Amazon ratings as ``n_shops`` ID-only shops, users assigned to shops by a stable hash of their ID."""
    if n_shops < 1:
        raise ValueError(f"n_shops must be >= 1, got {n_shops}")
    if negatives_per_positive < 0:
        raise ValueError(f"negatives_per_positive must be >= 0, got {negatives_per_positive}")
    ratings = read_amazon_ratings(path)
    # pandas' hash is a keyed SipHash with a fixed key: the same ID lands in the same shop on every machine.
    shop_of_rating = pd.util.hash_pandas_object(ratings["user_id"], index=False).to_numpy() % np.uint64(n_shops)
    meta_base = {"source": "amazon-ratings", "file": str(path), "n_shops": n_shops,
                 "rating_threshold": PURCHASE_THRESHOLD, "negatives_per_positive": negatives_per_positive,
                 "sales_period_days": 7}
    shops: list[ShopData] = []
    for k in range(n_shops):
        in_shop = shop_of_rating == np.uint64(k)
        if not in_shop.any():
            continue
        shop_ratings = ratings[in_shop].reset_index(drop=True)
        catalog = np.sort(shop_ratings["item_id"].unique().astype(object))
        shops.append(rating_shop(
            name if n_shops == 1 else f"{name}-{k}", shop_ratings, catalog,
            rating_threshold=PURCHASE_THRESHOLD, negatives_per_positive=negatives_per_positive,
            rng=np.random.default_rng([seed, k]), meta={**meta_base, "shop_index": k}))
    return shops
