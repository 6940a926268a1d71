"""Features: turn a shop's canonical tables into cached tensors, once per shop.

Shared fields (category, brand, user sides, context, the global product key) are hashed with their
field name into *fixed* buckets, so every shop lands in the same encoder index space without sharing
vocabularies. User and item IDs get a local vocabulary (index 0 = unknown/padding) whose embeddings
never leave the shop. Numeric fields are normalised with statistics computed on the shop's own
training rows. Everything is vectorised; the tensors are built once and reused every epoch and round.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from shared.protocol import SPLITS as SPLIT_NAMES
from shared.schema import USER_SIDE_COLUMNS, ShopData

TRAIN, VAL, TEST = 0, 1, 2
SPLITS = dict(zip(SPLIT_NAMES, (TRAIN, VAL, TEST), strict=True))  # split name -> row code
SECONDS_PER_DAY = 86_400


@dataclass
class FeatureConfig:
    """How shop tables become tensors; identical across shops of one federation."""

    hash_buckets: int = 1 << 14  # shared categorical fields (category, brand, user sides, context)
    product_buckets: int = 1 << 15  # global product key; bucket 0 = "no key"
    history_len: int = 20  # behaviour sequence length (clicked items before the row)
    split: str = "temporal"  # "temporal" (by time span) or "leave-last-out" (per user, literature protocol)
    val_fraction: float = 0.1  # temporal split: share of the time span for validation
    test_fraction: float = 0.1  # ... and for test
    sampled_negatives: int = 99  # leave-one-out ranking protocol
    seed: int = 0  # fixes sampled negatives so every method ranks the same candidates


def hash_field(field_name: str, values: pd.Series | np.ndarray, buckets: int) -> np.ndarray:
    """Stable hash of ``field=value`` into [1, buckets); missing/empty values map to 0 (padding)."""
    values = pd.Series(values, copy=False)
    missing = values.isna().to_numpy() | (values.astype(str).to_numpy() == "")
    keyed = (field_name + "=" + values.astype(str)).to_numpy(dtype=object)
    # pandas' hash_array is stable across processes and platforms (unlike Python's hash()).
    hashed = pd.util.hash_array(keyed, categorize=True).astype(np.uint64)
    out = (hashed % np.uint64(buckets - 1)).astype(np.int64) + 1
    out[missing] = 0
    return out


def _row_key(values: np.ndarray, seed: int) -> np.ndarray:
    """A per-row uniform number in [0, 1) fixed by the row's identity and the seed (nested subsets)."""
    # pandas needs a hash key of exactly 16 bytes; derive one from the seed so every seed gets its own.
    key16 = f"{hash_int(f'fedshop-rows-{seed}') % 10**16:016d}"
    hashed = pd.util.hash_array(np.asarray(values, dtype=object), hash_key=key16)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(shop: ShopData, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Split labels (TRAIN/VAL/TEST) for every interaction row and every sales row."""
    inter = shop.interactions
    ts = inter["timestamp"].to_numpy(np.int64)
    if cfg.split == "temporal":
        t0, t1 = ts.min(), ts.max()
        span = max(t1 - t0, 1)
        val_start = t0 + span * (1 - cfg.val_fraction - cfg.test_fraction)
        test_start = t0 + span * (1 - cfg.test_fraction)
        splits = np.where(ts >= test_start, TEST, np.where(ts >= val_start, VAL, TRAIN))
    elif cfg.split == "leave-last-out":
        splits = _leave_last_out(inter)
        val_start = test_start = None
    else:
        raise ValueError(f"features.split must be 'temporal' or 'leave-last-out', got {cfg.split!r}")
    sales_split = None
    if shop.sales is not None and len(shop.sales):
        day = shop.sales["day"].to_numpy(np.int64)
        if cfg.split == "temporal":
            d0, d1 = day.min(), day.max()
            dspan = max(d1 - d0, 1)
            v = d0 + dspan * (1 - cfg.val_fraction - cfg.test_fraction)
            t = d0 + dspan * (1 - cfg.test_fraction)
        else:  # align the sales split with the last 20% of days, as leave-last-out has no global cut
            v, t = np.quantile(day, [0.8, 0.9])
        sales_split = np.where(day >= t, TEST, np.where(day >= v, VAL, TRAIN))
    return splits.astype(np.int8), None if sales_split is None else sales_split.astype(np.int8)


def _leave_last_out(inter: pd.DataFrame) -> np.ndarray:
    """Per user: rows at/after the last click are test, at/after the second-last click are validation."""
    user = inter["user_id"].to_numpy()
    ts = inter["timestamp"].to_numpy(np.int64)
    clicks = inter[inter["clicked"].to_numpy() == 1]
    ranked = clicks.assign(_r=clicks.groupby("user_id")["timestamp"].rank(method="first", ascending=False))
    last = ranked[ranked["_r"] == 1].set_index("user_id")["timestamp"]
    second = ranked[ranked["_r"] == 2].set_index("user_id")["timestamp"]
    t_last = pd.Series(user).map(last).to_numpy(dtype=np.float64)
    t_second = pd.Series(user).map(second).to_numpy(dtype=np.float64)
    splits = np.full(len(inter), TRAIN, dtype=np.int8)
    splits[(ts >= t_second) & ~np.isnan(t_second)] = VAL
    # Users with a single click keep it for training: nothing to learn them from otherwise.
    splits[(ts >= t_last) & ~np.isnan(t_second)] = TEST
    return splits


@dataclass
class ShopTensors:
    """A shop's cached tensors: vocabularies, side features and per-task split rows."""

    name: str
    tasks: list[str]
    n_users: int  # local user vocabulary size incl. index 0
    n_items: int
    n_ctx_num: int  # numeric context columns (local projection)
    item_cat: torch.Tensor  # (I, F_item) hashed shared fields
    item_key: torch.Tensor  # (I,) global product key bucket (0 = none)
    item_num: torch.Tensor  # (I, 3) normalised log price, has-price flag, price relative to its category
    user_cat: torch.Tensor  # (U, F_user)
    catalog: torch.Tensor  # item indices eligible for ranking
    rows: dict[str, dict[str, torch.Tensor]]  # split -> impression rows (user, item, hist, ctx_cat, ctx_num, labels)
    sales: dict[str, dict[str, torch.Tensor]] | None  # split -> sales rows
    ranking_eval: dict[str, dict[str, torch.Tensor]]  # split -> per-user eval (user, hist, positives, negatives)
    source: ShopData | None = field(default=None, repr=False)
    cfg: FeatureConfig | None = field(default=None, repr=False)
    shop_index: int = 0

    def num_train_examples(self) -> int:
        """Training rows across the shop's tasks (impressions + sales rows)."""
        n = int(self.rows["train"]["user"].shape[0])
        if self.sales is not None:
            n += int(self.sales["train"]["item"].shape[0])
        return n

    def subsample_train(self, fraction: float, seed: int) -> ShopTensors:
        """The same shop with only ``fraction`` of its training rows; val/test rows unchanged.

        Subsets are nested: for one seed, a larger fraction keeps every row a smaller one keeps.
        The shop is rebuilt so behaviour histories also see only the kept rows.
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if self.source is None or self.cfg is None:
            raise ValueError("subsample_train needs tensors built by build_shop_tensors")
        if fraction == 1:
            return self
        shop = self.source
        inter = shop.interactions
        key = _row_key(inter["user_id"].astype(str) + "|" + inter["item_id"].astype(str) + "|"
                       + inter["timestamp"].astype(str), seed)
        keep = (inter["_split"].to_numpy() != TRAIN) | (key < fraction)
        sales = shop.sales
        if sales is not None:
            skey = _row_key(sales["item_id"].astype(str) + "|" + sales["day"].astype(str), seed)
            sales = sales[(sales["_split"].to_numpy() != TRAIN) | (skey < fraction)]
        sub = replace(shop, interactions=inter[keep], sales=sales)
        out = build_shop_tensors(sub, self.cfg, vocab_from=shop)
        out.tasks = [t for t in self.tasks if t in out.tasks]
        return out


def _vocab(ids: pd.Series) -> pd.Index:
    return pd.Index(np.sort(ids.astype(str).unique()))


def _lookup(vocab: pd.Index, values: pd.Series) -> np.ndarray:
    idx = vocab.get_indexer(values.astype(str))
    return (idx + 1).astype(np.int64)  # 0 = unknown


def _item_features(shop: ShopData, items_vocab: pd.Index, cfg: FeatureConfig):
    n = len(items_vocab) + 1
    item_cat = np.zeros((n, 3), dtype=np.int64)
    item_key = np.zeros(n, dtype=np.int64)
    item_num = np.zeros((n, 3), dtype=np.float32)
    items = shop.items
    if items is None or not len(items):
        return item_cat, item_key, item_num
    idx = _lookup(items_vocab, items["item_id"])
    ok = idx > 0
    items, idx = items[ok], idx[ok]
    if "category" in items:
        cat = items["category"].astype(str)
        item_cat[idx, 0] = hash_field("category", items["category"], cfg.hash_buckets)
        item_cat[idx, 1] = hash_field("category_top", cat.str.split(">").str[0].where(items["category"].notna()),
                                      cfg.hash_buckets)
    if "brand" in items:
        item_cat[idx, 2] = hash_field("brand", items["brand"], cfg.hash_buckets)
    extra = [c for c in items.columns if c.startswith("item_") and c != "item_id"]
    if extra:
        more = np.stack([hash_field(c, items[c], cfg.hash_buckets) for c in extra], axis=1)
        full = np.zeros((n, len(extra)), dtype=np.int64)
        full[idx] = more
        item_cat = np.concatenate([item_cat, full], axis=1)
    if "global_key" in items:
        item_key[idx] = hash_field("global_key", items["global_key"], cfg.product_buckets)
    if "price" in items:
        price = items["price"].to_numpy(np.float64)
        has = ~np.isnan(price)
        logp = np.log1p(np.where(has, price, 0.0))
        # Statistics from this shop's items only: they never leave the shop.
        mu, sd = (logp[has].mean(), logp[has].std() + 1e-6) if has.any() else (0.0, 1.0)
        item_num[idx, 0] = np.where(has, (logp - mu) / sd, 0.0)
        item_num[idx, 1] = has.astype(np.float32)
        if "category" in items:
            # Price relative to the item's category in this shop: what a shopper compares against.
            cat_mean = pd.Series(np.where(has, logp, np.nan)).groupby(items["category"].astype(str).to_numpy()
                                                                       ).transform("mean").to_numpy()
            item_num[idx, 2] = np.where(has, (logp - np.nan_to_num(cat_mean)) / sd, 0.0)
    return item_cat, item_key, item_num


def _user_features(shop: ShopData, users_vocab: pd.Index, cfg: FeatureConfig) -> np.ndarray:
    n = len(users_vocab) + 1
    users = shop.users
    if users is None or not len(users):
        return np.zeros((n, 1), dtype=np.int64)
    cols = [c for c in USER_SIDE_COLUMNS if c in users] + [
        c for c in users.columns if c.startswith("user_") and c != "user_id"]
    if not cols:
        return np.zeros((n, 1), dtype=np.int64)
    idx = _lookup(users_vocab, users["user_id"])
    ok = idx > 0
    out = np.zeros((n, len(cols)), dtype=np.int64)
    out[idx[ok]] = np.stack([hash_field(c, users[c][ok], cfg.hash_buckets) for c in cols], axis=1)
    return out


def _histories(user: np.ndarray, item: np.ndarray, ts: np.ndarray, clicked: np.ndarray, length: int) -> np.ndarray:
    """For every row, the last ``length`` clicked items of its user strictly before the row's time.

    Vectorised: one sort, one searchsorted, one gather.
    """
    pos = np.flatnonzero(clicked == 1)
    order = pos[np.lexsort((ts[pos], user[pos]))]
    p_user, p_ts, p_item = user[order], ts[order], item[order]
    big = np.int64(ts.max() - ts.min() + 2) if len(ts) else np.int64(1)
    base = ts.min() if len(ts) else 0
    p_key = p_user.astype(np.int64) * big + (p_ts - base)
    r_key = user.astype(np.int64) * big + (ts - base)
    end = np.searchsorted(p_key, r_key, side="left")  # clicks strictly before the row
    start = np.searchsorted(p_key, user.astype(np.int64) * big, side="left")  # user's first click
    offs = end[:, None] - np.arange(1, length + 1)[None, :]  # (N, L) most recent first
    valid = offs >= start[:, None]
    hist = np.zeros((len(user), length), dtype=np.int64)
    if len(p_item):
        hist[valid] = p_item[offs[valid]]
    return hist


def _ctx_features(inter: pd.DataFrame, cfg: FeatureConfig, train: np.ndarray):
    ts = inter["timestamp"].to_numpy(np.int64)
    cols = [hash_field("weekday", pd.Series((ts // SECONDS_PER_DAY + 4) % 7), cfg.hash_buckets)]
    hour = inter["hour"] if "hour" in inter else pd.Series((ts % SECONDS_PER_DAY) // 3600)
    cols.append(hash_field("hour", hour, cfg.hash_buckets))
    if "device" in inter:
        cols.append(hash_field("device", inter["device"], cfg.hash_buckets))
    num_cols = []
    for c in (c for c in inter.columns if c.startswith("ctx_")):
        if pd.api.types.is_numeric_dtype(inter[c]):
            num_cols.append(c)
        else:
            cols.append(hash_field(c, inter[c], cfg.hash_buckets))
    ctx_cat = np.stack(cols, axis=1)
    if num_cols:
        raw = inter[num_cols].to_numpy(np.float64)
        raw = np.where(np.isfinite(raw), raw, np.nan)
        mu = np.nanmean(raw[train], axis=0) if train.any() else np.zeros(len(num_cols))
        sd = np.nanstd(raw[train], axis=0) + 1e-6 if train.any() else np.ones(len(num_cols))
        ctx_num = np.nan_to_num((raw - np.nan_to_num(mu)) / np.nan_to_num(sd, nan=1.0)).astype(np.float32)
    else:
        ctx_num = np.zeros((len(inter), 0), dtype=np.float32)
    return ctx_cat, ctx_num


def _ranking_eval(user, item, clicked, splits, hist, catalog, n_items, cfg: FeatureConfig, seed_text: str):
    """Per evaluation user: history as of their first held-out click, held-out items, 99 sampled negatives."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    interacted = np.unique(user.astype(np.int64) * n_items + item)
    rng = np.random.default_rng(abs(hash_int(seed_text + str(cfg.seed))))
    for name, code in (("val", VAL), ("test", TEST)):
        rows = np.flatnonzero((splits == code) & (clicked == 1))
        if not len(rows):
            out[name] = {}
            continue
        order = rows[np.lexsort((rows, user[rows]))]
        users, first = np.unique(user[order], return_index=True)
        first_rows = order[first]
        pos_items = item[first_rows]
        neg = _sample_negatives(users, catalog, interacted, n_items, cfg.sampled_negatives, rng)
        # Held-out positives per user as a padded matrix; earlier-split positives are excluded at ranking time.
        held_user, held_item = user[order], item[order]
        counts = np.bincount(np.searchsorted(users, held_user), minlength=len(users))
        width = int(counts.max())
        held = np.zeros((len(users), width), dtype=np.int64)
        slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        held[np.searchsorted(users, held_user), slot] = held_item
        prior = (splits < code) & (clicked == 1)
        out[name] = {
            "user": torch.from_numpy(users.astype(np.int64)),
            "hist": torch.from_numpy(hist[first_rows]),
            "pos": torch.from_numpy(pos_items),
            "neg": torch.from_numpy(neg),
            "held": torch.from_numpy(held),
            "seen_user": torch.from_numpy(user[prior].astype(np.int64)),
            "seen_item": torch.from_numpy(item[prior].astype(np.int64)),
        }
    return out


def hash_int(text: str) -> int:
    """A stable 63-bit integer from text (seeds derived from names)."""
    return int(pd.util.hash_array(np.array([text], dtype=object))[0] >> np.uint64(1))


def _sample_negatives(users, catalog, interacted, n_items, k, rng) -> np.ndarray:
    """k catalog items per user that the user never interacted with (rejection sampling, vectorised)."""
    out = np.zeros((len(users), k), dtype=np.int64)
    filled = np.zeros(len(users), dtype=np.int64)
    for _ in range(50):
        need = filled < k
        if not need.any():
            break
        before = int(filled.sum())
        cand = catalog[rng.integers(0, len(catalog), size=(int(need.sum()), 2 * k))]
        u = users[need][:, None]
        ok = ~np.isin(u.astype(np.int64) * n_items + cand, interacted)
        for j, row in enumerate(np.flatnonzero(need)):
            take = np.unique(cand[j][ok[j]])
            take = take[~np.isin(take, out[row, : filled[row]])]
            take = take[: k - filled[row]]
            out[row, filled[row]: filled[row] + len(take)] = take
            filled[row] += len(take)
        if int(filled.sum()) == before:  # small catalogs: what is left unfilled stays padding (0)
            break
    return out


def _sales_rows(shop: ShopData, items_vocab: pd.Index, sales_split: np.ndarray) -> dict[str, dict[str, torch.Tensor]]:
    """Next-period units per item with lag features computed from the item's own past periods."""
    sales = shop.sales.assign(_split=sales_split)
    sales = sales.sort_values(["item_id", "day"], kind="stable")
    units = sales["units"].to_numpy(np.float64)
    item = sales["item_id"].astype(str).to_numpy()
    new_item = np.r_[True, item[1:] != item[:-1]]
    grp = np.cumsum(new_item) - 1
    start = np.flatnonzero(new_item)
    pos = np.arange(len(units)) - start[grp]
    csum = np.cumsum(units)
    before = np.r_[0.0, csum[:-1]]  # units strictly before each row (within the whole frame)
    grp_base = before[start][grp]

    def window_mean(w: int) -> np.ndarray:
        lo = np.maximum(pos - w, 0)
        first = before[start[grp] + lo]
        n = np.minimum(pos, w)
        return np.where(n > 0, (before - first) / np.maximum(n, 1), 0.0)

    lag1 = np.where(pos > 0, np.r_[0.0, units[:-1]], 0.0)
    feats = np.stack([np.log1p(lag1), np.log1p(window_mean(7)), np.log1p(window_mean(28)),
                      np.log1p((before - grp_base) / np.maximum(pos, 1)), (pos == 0).astype(float)], axis=1)
    day = sales["day"].to_numpy(np.int64)
    promo = sales["promo"].to_numpy(np.float64) if "promo" in sales else np.zeros(len(sales))
    weekday = (day + 4) % 7
    cal = np.concatenate([np.eye(7)[weekday], promo[:, None]], axis=1)
    x = np.concatenate([feats, cal], axis=1).astype(np.float32)
    split = sales["_split"].to_numpy()
    train = split == TRAIN
    mu, sd = x[train].mean(0) if train.any() else 0.0, x[train].std(0) + 1e-6 if train.any() else 1.0
    x = ((x - mu) / sd).astype(np.float32)
    item_idx = _lookup(items_vocab, sales["item_id"])
    out = {}
    for name, code in SPLITS.items():
        m = split == code
        out[name] = {"item": torch.from_numpy(item_idx[m]), "x": torch.from_numpy(x[m]),
                     "units": torch.from_numpy(units[m].astype(np.float32))}
    return out


def build_shop_tensors(shop: ShopData, cfg: FeatureConfig | None = None, *,
                       vocab_from: ShopData | None = None) -> ShopTensors:
    """Build every tensor a shop trains and evaluates on; called once per shop per process.

    ``vocab_from`` fixes the ID vocabularies to another (larger) version of the same shop, so a
    subsample keeps index-compatible local embeddings.
    """
    cfg = cfg or FeatureConfig()
    inter = shop.interactions
    if "_split" not in inter:
        splits, sales_split = assign_splits(shop, cfg)
        inter = inter.assign(_split=splits)
        sales = shop.sales.assign(_split=sales_split) if sales_split is not None else shop.sales
        shop = replace(shop, interactions=inter, sales=sales)
    splits = inter["_split"].to_numpy(np.int8)
    sales_split = shop.sales["_split"].to_numpy(np.int8) if shop.sales is not None and len(shop.sales) else None

    vsrc = vocab_from or shop
    users_vocab = _vocab(pd.concat([vsrc.interactions["user_id"]] + (
        [vsrc.users["user_id"]] if vsrc.users is not None else [])))
    item_sources = [vsrc.interactions["item_id"]]
    if vsrc.items is not None:
        item_sources.append(vsrc.items["item_id"])
    if vsrc.sales is not None:
        item_sources.append(vsrc.sales["item_id"])
    items_vocab = _vocab(pd.concat(item_sources))
    n_items = len(items_vocab) + 1

    user = _lookup(users_vocab, inter["user_id"])
    item = _lookup(items_vocab, inter["item_id"])
    ts = inter["timestamp"].to_numpy(np.int64)
    clicked = inter["clicked"].to_numpy(np.int64)
    purchased = inter["purchased"].to_numpy(np.int64)
    train = splits == TRAIN
    item_cat, item_key, item_num = _item_features(vsrc, items_vocab, cfg)
    user_cat = _user_features(vsrc, users_vocab, cfg)
    # Histories may use earlier held-out clicks (a deployed model sees them) but never the row itself.
    hist = _histories(user, item, ts, clicked, cfg.history_len)
    ctx_cat, ctx_num = _ctx_features(inter, cfg, train)

    rows = {}
    for name, code in SPLITS.items():
        m = splits == code
        rows[name] = {
            "user": torch.from_numpy(user[m]), "item": torch.from_numpy(item[m]),
            "hist": torch.from_numpy(hist[m]), "ctx_cat": torch.from_numpy(ctx_cat[m]),
            "ctx_num": torch.from_numpy(ctx_num[m]),
            "clicked": torch.from_numpy(clicked[m].astype(np.float32)),
            "purchased": torch.from_numpy(purchased[m].astype(np.float32)),
        }
    if "_shop_items" in shop.meta:
        catalog = _lookup(items_vocab, pd.Series(shop.meta["_shop_items"]))
    else:
        catalog = np.arange(1, n_items, dtype=np.int64)
    catalog = np.unique(catalog[catalog > 0])
    ranking_eval = _ranking_eval(user, item, clicked, splits, hist, catalog, n_items, cfg, shop.name)
    sales = _sales_rows(shop, items_vocab, sales_split) if sales_split is not None else None

    tasks = [t for t in shop.available_tasks() if t != "sales" or sales is not None]
    return ShopTensors(
        name=shop.name, tasks=tasks, n_users=len(users_vocab) + 1, n_items=n_items,
        n_ctx_num=ctx_num.shape[1], item_cat=torch.from_numpy(item_cat), item_key=torch.from_numpy(item_key),
        item_num=torch.from_numpy(item_num), user_cat=torch.from_numpy(user_cat),
        catalog=torch.from_numpy(catalog), rows=rows, sales=sales, ranking_eval=ranking_eval,
        source=shop, cfg=cfg,
    )


def _prefixed(shop: ShopData, index: int, cfg: FeatureConfig) -> ShopData:
    """The shop with IDs made unique across shops and its split fixed, for pooling."""
    splits, sales_split = assign_splits(shop, cfg)
    p = f"{shop.name}::"
    inter = shop.interactions.assign(user_id=p + shop.interactions["user_id"].astype(str),
                                     item_id=p + shop.interactions["item_id"].astype(str), _split=splits,
                                     _shop=index)
    items = None if shop.items is None else shop.items.assign(item_id=p + shop.items["item_id"].astype(str))
    users = None if shop.users is None else shop.users.assign(user_id=p + shop.users["user_id"].astype(str))
    sales = None
    if shop.sales is not None and sales_split is not None:
        sales = shop.sales.assign(item_id=p + shop.sales["item_id"].astype(str), _split=sales_split, _shop=index)
    own_items = [inter["item_id"]] + [f["item_id"] for f in (items, sales) if f is not None]
    meta = {**shop.meta, "_shop_items": np.unique(pd.concat(own_items).astype(str).to_numpy())}
    return replace(shop, interactions=inter, items=items, users=users, sales=sales, meta=meta)


def pool_shops(shops: list[ShopData], cfg: FeatureConfig | None = None) -> tuple[ShopTensors, list[ShopTensors]]:
    """The centralized oracle's data: all shops pooled, plus per-shop views in the pooled index space.

    Each view keeps its shop's own split, catalog and sampled negatives, so the oracle is scored on
    exactly the rows and candidates a shop scores itself on.
    """
    cfg = cfg or FeatureConfig()
    parts = [_prefixed(s, i, cfg) for i, s in enumerate(shops)]
    def cat(frames: list[pd.DataFrame | None]) -> pd.DataFrame | None:
        present = [f for f in frames if f is not None]
        return pd.concat(present, ignore_index=True) if present else None

    pooled = ShopData(name="pooled", interactions=cat([p.interactions for p in parts]),
                      items=cat([p.items for p in parts]), users=cat([p.users for p in parts]),
                      sales=cat([p.sales for p in parts]))
    tensors = build_shop_tensors(pooled, cfg)
    views = []
    for i, part in enumerate(parts):
        # Views slice the pooled frames so context columns line up with the pooled model's.
        inter = pooled.interactions[pooled.interactions["_shop"].to_numpy() == i]
        sales = None if part.sales is None else pooled.sales[pooled.sales["_shop"].to_numpy() == i]
        view = build_shop_tensors(replace(part, interactions=inter, sales=sales), cfg, vocab_from=pooled)
        view.shop_index = i
        views.append(view)
    return tensors, views
