"""Synthetic multi-shop world: N shops drawn over one common latent structure.

The common part (taxonomy, item latent vectors, category/brand/price effects, side-field effects) is
what federation can learn and a small shop alone cannot; the generative model and every knob are
documented in docs/synthetic-world.md. Everything is vectorised numpy and deterministic per seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, logit

from shared.atomic import atomic_write_text
from shared.schema import ShopData, write_shop_dir

TOP_NAMES = ("Electronics", "Home", "Fashion", "Beauty", "Sports", "Toys", "Books", "Garden", "Grocery",
             "Auto", "Health", "Office")
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_PROBS = (0.16, 0.30, 0.24, 0.18, 0.12)
GENDERS = ("f", "m", "u")
GENDER_PROBS = (0.48, 0.47, 0.05)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_PROBS = (0.6, 0.32, 0.08)
# Share of traffic by hour of day (low at night, peaks at lunch and in the evening), normalised below.
HOUR_PROFILE = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 8, 7, 6, 6, 6, 7, 9, 11, 12, 11, 8, 4], float)
SECONDS_PER_DAY = 86_400


@dataclass
class WorldConfig:
    """Every knob of the synthetic world; a scenario's [data.synthetic] table maps 1:1 onto these fields."""

    n_shops: int = 8  # training shops
    seed: int = 0  # one seed fixes the whole world
    n_late_joiners: int = 2  # extra shops held out for transfer; their category mix is unlike the others'
    n_categories: int = 24  # leaf categories of the 2-level taxonomy
    n_top_categories: int = 6  # top-level categories; leaves are split evenly among them
    latent_dim: int = 8  # dimension of user tastes and item latent vectors
    heterogeneity: float = 0.3  # Dirichlet concentration of shop category mixes (smaller = more different)
    overlap: float = 0.5  # share of a shop's products drawn from the global pool (shared global_key)
    pool_size: int = 3_000  # products in the global pool (global_key "GTIN-000123")
    size_exponent: float = 1.2  # power-law exponent of shop sizes (impressions ~ rank^-exponent)
    max_impressions: int = 50_000  # impressions of the largest training shop
    min_impressions: int = 3_000  # impressions of the smallest training shop
    n_small_shops: int = 3  # the smallest shops, flagged data-poor (federation should help them most)
    late_joiner_impressions: int = 10_000  # impressions of each late joiner
    days: int = 60  # length of every log and sales table
    start_date: str = "2024-01-01"  # first day (UTC)
    impressions_per_user: float = 25.0  # users per shop = impressions / this
    impressions_per_item: float = 60.0  # items per shop = impressions / this (at least min_items)
    min_items: int = 100  # smallest catalogue
    n_brands_per_category: int = 6  # brands per leaf category (global brand vocabulary)
    n_regions: int = 6  # user regions (shared vocabulary); each shop has its own region mix
    category_spread: float = 0.8  # sd of a leaf centroid around its top-category centroid
    item_spread: float = 0.6  # sd of an item's latent vector around its category centroid
    user_spread: float = 0.6  # sd of a user's taste around favourite centroid + side-field offsets
    side_taste: float = 0.6  # sd of the taste offsets that age bucket, gender and region add
    base_ctr: float = 0.04  # P(click | impression), calibrated per shop
    cart_rate: float = 0.30  # P(cart | click), calibrated per shop
    base_cvr: float = 0.10  # P(purchase | click), calibrated per shop (so P(purchase | cart) = cvr / cart)
    affinity_scale: float = 1.0  # sd of the taste-match term user·item in the click logit (normalised)
    appeal_sd: float = 0.5  # sd of an item's own appeal (popularity) on top of category and brand
    side_effect_scale: float = 0.5  # sd of age/gender/device x top-category and hour effects on clicks
    price_sensitivity: float = 0.6  # mean coefficient of log price in the logits (users vary around it)
    price_latent: float = 0.5  # how strongly latent dimension 0 (premium taste) sets log price in a category
    click_noise: float = 0.5  # sd of unobserved per-impression logit noise (position, mood)
    extra_quantity: float = 0.3  # quantity = 1 + Poisson(extra_quantity x cheaper-item factor)
    weekly_amplitude: float = 0.25  # weekly seasonality of traffic and sales (peak on Saturday)
    mean_daily_units: float = 1.5  # mean daily units sold per item (sales table)
    promo_rate: float = 0.03  # daily probability that an item starts a promotion
    promo_days: int = 5  # length of a promotion in days
    promo_lift: float = 1.8  # sales multiplier while an item is on promotion
    id_only_joiner: bool = True  # one late joiner has IDs only: no items/users side tables, no global keys
    disjoint_joiner: bool = True  # one late joiner sells only categories no training shop sells
    task_dropout: float = 0.2  # probability a training shop lacks a task (no impression log / no sales)
    # Evaluation top-up: extra impressions in each shop's last eval_days days, so they hold at least
    # eval_impressions (0 = off). The rows before the window and the sales table are unchanged; mostly the
    # validation/test rows of a temporal split grow, so small shops' test metrics become measurable.
    eval_impressions: int = 0
    eval_days: int = 12  # the default temporal split's validation + test share (20%) of 60 days

    def __post_init__(self) -> None:
        """Reject knob values the generator cannot honour, naming the field and the fix."""
        positive_ints = ("n_shops", "n_categories", "n_top_categories", "latent_dim", "pool_size",
                         "max_impressions", "min_impressions", "late_joiner_impressions", "days", "min_items",
                         "n_brands_per_category", "n_regions", "promo_days")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WorldConfig.{name} = {getattr(self, name)}: must be >= 1")
        rates = ("overlap", "base_ctr", "cart_rate", "base_cvr", "promo_rate", "task_dropout")
        for name in rates:
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"WorldConfig.{name} = {getattr(self, name)}: must be in [0, 1]")
        if self.heterogeneity <= 0:
            raise ValueError(f"WorldConfig.heterogeneity = {self.heterogeneity}: must be > 0 (try 0.1 .. 10)")
        if self.base_cvr > self.cart_rate:
            raise ValueError(f"WorldConfig.base_cvr = {self.base_cvr} exceeds cart_rate = {self.cart_rate}: "
                             "a purchase needs a cart, so set base_cvr <= cart_rate")
        if self.eval_impressions < 0:
            raise ValueError(f"WorldConfig.eval_impressions = {self.eval_impressions}: must be >= 0 (0 = no top-up)")
        if self.eval_impressions and not 1 <= self.eval_days < self.days:
            raise ValueError(f"WorldConfig.eval_days = {self.eval_days}: needs 1 <= eval_days < days ({self.days}) "
                             "when eval_impressions > 0; set it to the validation + test days of the split")
        if self.n_categories < self.n_top_categories or self.n_top_categories < 2:
            raise ValueError(f"WorldConfig.n_top_categories = {self.n_top_categories}: needs "
                             f"2 <= n_top_categories <= n_categories ({self.n_categories})")
        if self.min_impressions > self.max_impressions:
            raise ValueError(f"WorldConfig.min_impressions = {self.min_impressions} exceeds max_impressions "
                             f"= {self.max_impressions}; swap or lower it")
        if not 0 <= self.n_small_shops <= self.n_shops or self.n_late_joiners < 0:
            raise ValueError(f"WorldConfig.n_small_shops = {self.n_small_shops}: needs 0 <= n_small_shops "
                             f"<= n_shops ({self.n_shops}); n_late_joiners must be >= 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> WorldConfig:
        """Build from a scenario's [data.synthetic] table, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"[data.synthetic]: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class World:
    """Generated shops (training shops first, then late joiners) and the JSON-serialisable ground truth."""

    shops: list[ShopData]
    late_joiners: list[str]
    truth: dict = field(default_factory=dict)
    # Noise-free click logit per interactions row, by shop: the oracle score for tests; never written.
    click_logit: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def training_shops(self) -> list[ShopData]:
        """The shops that take part in federated training (all but the late joiners)."""
        return [s for s in self.shops if s.name not in self.late_joiners]


@dataclass
class _Globals:
    """The common latent structure every shop draws from."""

    top_of: np.ndarray  # (C,) top-category index of each leaf
    cat_names: list[str]
    top_names: list[str]
    centroid: np.ndarray  # (C, d) leaf category centroids
    cat_logprice: np.ndarray  # (C,) mean log price per leaf
    cat_appeal: np.ndarray  # (C,)
    brand_effect: np.ndarray  # (C, B)
    age_aff: np.ndarray  # (A, T) age bucket x top-category click effect
    gender_aff: np.ndarray  # (G, T)
    device_aff: np.ndarray  # (D, T)
    hour_effect: np.ndarray  # (24,)
    age_taste: np.ndarray  # (A, d) taste offset per age bucket
    gender_taste: np.ndarray  # (G, d)
    region_taste: np.ndarray  # (R, d)
    age_price: np.ndarray  # (A,) log-multiplier of price sensitivity (young users more sensitive)
    pool: dict[str, np.ndarray]  # global product pool: cat, latent, logprice, brand, appeal
    logprice_ref: float  # centring constant of log price


def _calibrate(z: np.ndarray, target: float) -> float:
    """Intercept b such that mean(sigmoid(b + z)) == target (the mean is monotone in b, so one root)."""
    if len(z) == 0:
        return float(logit(target))
    return float(brentq(lambda b: expit(b + z).mean() - target, -40.0, 40.0, xtol=1e-6))


def _match_scale(cfg: WorldConfig) -> float:
    """Sd of user·item for independent draws, so ``affinity_scale`` is the sd of the taste term in logits."""
    centroid_var = 1.0 + cfg.category_spread**2
    item_var = centroid_var + cfg.item_spread**2
    user_var = centroid_var + 2.25 * cfg.side_taste**2 + cfg.user_spread**2  # age + gender + half-sd region
    return math.sqrt(cfg.latent_dim * item_var * user_var)


def _items_from_cats(rng: np.random.Generator, g: _Globals, cfg: WorldConfig, cats: np.ndarray) -> dict:
    """Latent vectors, prices, brands and appeal for items of the given leaf categories."""
    n, d = len(cats), cfg.latent_dim
    offset = cfg.item_spread * rng.standard_normal((n, d))
    latent = g.centroid[cats] + offset
    logprice = g.cat_logprice[cats] + cfg.price_latent * offset[:, 0] + 0.2 * rng.standard_normal(n)
    brand = rng.integers(0, cfg.n_brands_per_category, n)
    appeal = g.cat_appeal[cats] + g.brand_effect[cats, brand] + cfg.appeal_sd * rng.standard_normal(n)
    return {"cat": cats, "latent": latent, "logprice": logprice, "brand": brand, "appeal": appeal}


def _make_globals(rng: np.random.Generator, cfg: WorldConfig) -> _Globals:
    """Draw the taxonomy, category/brand/side-field effects and the global product pool."""
    C, T, d = cfg.n_categories, cfg.n_top_categories, cfg.latent_dim
    top_of = (np.arange(C) * T) // C
    top_names = [TOP_NAMES[t] if t < len(TOP_NAMES) else f"Top{t:02d}" for t in range(T)]
    leaf_rank = np.arange(C) - np.searchsorted(top_of, top_of)
    cat_names = [f"{top_names[t]}>{top_names[t][:3]}{r:02d}" for t, r in zip(top_of, leaf_rank, strict=True)]
    top_centroid = rng.standard_normal((T, d))
    centroid = top_centroid[top_of] + cfg.category_spread * rng.standard_normal((C, d))
    # Equal norms: no leaf category is a much stronger taste signal than another just by chance.
    centroid *= math.sqrt(d * (1.0 + cfg.category_spread**2)) / np.linalg.norm(centroid, axis=1, keepdims=True)
    s = cfg.side_effect_scale
    g = _Globals(
        top_of=top_of, cat_names=cat_names, top_names=top_names, centroid=centroid,
        cat_logprice=rng.normal(3.0, 0.8, C), cat_appeal=rng.normal(0.0, 0.3, C),
        brand_effect=rng.normal(0.0, 0.3, (C, cfg.n_brands_per_category)),
        age_aff=rng.normal(0.0, s, (len(AGE_BUCKETS), T)), gender_aff=rng.normal(0.0, s, (len(GENDERS), T)),
        device_aff=rng.normal(0.0, 0.5 * s, (len(DEVICES), T)),
        hour_effect=0.5 * s * np.sin(2 * np.pi * (np.arange(24) - 14) / 24),
        age_taste=rng.normal(0.0, cfg.side_taste, (len(AGE_BUCKETS), d)),
        gender_taste=rng.normal(0.0, cfg.side_taste, (len(GENDERS), d)),
        region_taste=rng.normal(0.0, 0.5 * cfg.side_taste, (cfg.n_regions, d)),
        age_price=np.linspace(0.3, -0.3, len(AGE_BUCKETS)),
        pool={}, logprice_ref=0.0,
    )
    g.pool = _items_from_cats(rng, g, cfg, rng.integers(0, C, cfg.pool_size))
    g.logprice_ref = float(g.cat_logprice.mean())
    return g


def _shop_sizes(cfg: WorldConfig) -> np.ndarray:
    """Power-law impressions by size rank, rescaled so the largest is max and the smallest min."""
    rank = np.arange(1, cfg.n_shops + 1, dtype=float)
    shape = rank ** -cfg.size_exponent
    if cfg.n_shops == 1:
        return np.array([cfg.max_impressions])
    unit = (shape - shape[-1]) / (shape[0] - shape[-1])
    return np.round(cfg.min_impressions + unit * (cfg.max_impressions - cfg.min_impressions)).astype(int)


def _category_mixes(rng: np.random.Generator, cfg: WorldConfig, g: _Globals) -> tuple[np.ndarray, np.ndarray, list]:
    """Category mixes of training shops and late joiners, plus the categories reserved for the disjoint joiner."""
    C = cfg.n_categories
    reserved = np.zeros(C, bool)
    if cfg.disjoint_joiner and cfg.n_late_joiners > 0:
        reserved = g.top_of == g.top_of.max()
    allowed = np.flatnonzero(~reserved)
    train = np.zeros((cfg.n_shops, C))
    train[:, allowed] = rng.dirichlet(np.full(len(allowed), cfg.heterogeneity), cfg.n_shops)
    late = np.zeros((cfg.n_late_joiners, C))
    rarest = np.argsort(train.mean(axis=0), kind="stable")[: max(2, C // 2)]  # least-sold categories
    for j in range(cfg.n_late_joiners):
        support = np.flatnonzero(reserved) if (j == 0 and reserved.any()) else rarest
        late[j, support] = rng.dirichlet(np.full(len(support), cfg.heterogeneity))
    return train, late, [g.cat_names[c] for c in np.flatnonzero(reserved)]


def _weekly(cfg: WorldConfig, day_index: np.ndarray) -> np.ndarray:
    """Weekly seasonality factor (mean about 1, peak on Saturday) for days since epoch."""
    dow = (day_index + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return 1.0 + cfg.weekly_amplitude * np.cos(2 * np.pi * (dow - 5) / 7)


@dataclass
class _People:
    """A shop's users as the impression draw needs them (index = user)."""

    taste: np.ndarray  # (U, d)
    sens: np.ndarray  # (U,) price sensitivity
    age: np.ndarray
    gender: np.ndarray
    activity: np.ndarray  # (U,) relative traffic
    device: np.ndarray  # (U,) primary device


def _draw_impressions(rng: np.random.Generator, cfg: WorldConfig, g: _Globals, it: dict, people: _People, n: int,
                      day_index: np.ndarray, day_p: np.ndarray, intercepts: tuple[float, float, float] | None = None,
                      ) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """Draw ``n`` impressions (who, when, device, item) and their funnel labels.

    The click/cart/purchase intercepts are calibrated to the target rates on this draw unless
    ``intercepts`` is given (an evaluation top-up reuses the shop's intercepts, so its rows follow
    the same funnel as the rest of the log).
    """
    item_top = g.top_of[it["cat"]]
    u = rng.choice(len(people.activity), n, p=people.activity / people.activity.sum())
    day = rng.choice(cfg.days, n, p=day_p)
    hour = rng.choice(24, n, p=HOUR_PROFILE / HOUR_PROFILE.sum())
    device = np.where(rng.random(n) < 0.8, people.device[u], rng.choice(len(DEVICES), n, p=DEVICE_PROBS))
    exposure = np.exp(0.5 * it["appeal"])
    i = rng.choice(len(exposure), n, p=exposure / exposure.sum())
    timestamp = (day_index[day].astype(np.int64) * SECONDS_PER_DAY + hour * 3600
                 + rng.integers(0, 3600, n)).astype(np.int64)

    # Funnel: click | impression, cart | click, purchase | cart; each intercept calibrated to its rate.
    match = (people.taste[u] * it["latent"][i]).sum(axis=1) / _match_scale(cfg)
    price_term = people.sens[u] * (it["logprice"][i] - g.cat_logprice[it["cat"][i]])  # dearer than its category
    side = (g.age_aff[people.age[u], item_top[i]] + g.gender_aff[people.gender[u], item_top[i]]
            + g.device_aff[device, item_top[i]] + g.hour_effect[hour])
    score = cfg.affinity_scale * match + it["appeal"][i] + side - price_term
    z_click = score + cfg.click_noise * rng.standard_normal(n)
    b_click = _calibrate(z_click, cfg.base_ctr) if intercepts is None else intercepts[0]
    clicked = rng.random(n) < expit(b_click + z_click)
    z_cart = (0.5 * cfg.affinity_scale * match + 0.5 * it["appeal"][i] - 0.5 * price_term
              + cfg.click_noise * rng.standard_normal(n))
    b_cart = _calibrate(z_cart[clicked], cfg.cart_rate) if intercepts is None else intercepts[1]
    carted = clicked & (rng.random(n) < expit(b_cart + z_cart))
    z_buy = 0.5 * cfg.affinity_scale * match - price_term + cfg.click_noise * rng.standard_normal(n)
    b_buy = _calibrate(z_buy[carted], cfg.base_cvr / cfg.cart_rate) if intercepts is None else intercepts[2]
    purchased = carted & (rng.random(n) < expit(b_buy + z_buy))
    extra = rng.poisson(cfg.extra_quantity * np.exp(-0.3 * (it["logprice"][i] - g.logprice_ref)))
    quantity = np.where(purchased, 1 + extra, 0).astype(np.float32)
    log = {"user": u, "item": i, "day": day, "hour": hour, "device": device, "timestamp": timestamp,
           "clicked": clicked, "carted": carted, "purchased": purchased, "quantity": quantity, "score": score}
    return log, (b_click, b_cart, b_buy)


def _topup_size(cfg: WorldConfig, day: np.ndarray) -> int:
    """Extra impressions that bring the last ``eval_days`` days up to ``eval_impressions`` (0 when off)."""
    if cfg.eval_impressions <= 0:
        return 0
    in_window = int(np.count_nonzero(day >= cfg.days - cfg.eval_days))
    return max(0, cfg.eval_impressions - in_window)


def _make_shop(rng: np.random.Generator, cfg: WorldConfig, g: _Globals, *, name: str, n_imp: int,
               mix: np.ndarray, id_only: bool, drop: set[str]) -> tuple[ShopData, dict, np.ndarray]:
    """Draw one shop's catalogue, users, impression log (with funnel labels) and daily sales."""
    C, d = cfg.n_categories, cfg.latent_dim
    mix = mix / mix.sum()

    # Catalogue: pool products (shared global_key) and shop-only products.
    n_items = max(cfg.min_items, round(n_imp / cfg.impressions_per_item))
    pool_weight = mix[g.pool["cat"]] * np.exp(g.pool["appeal"])  # only categories the shop sells
    n_pool = 0 if id_only else min(round(cfg.overlap * n_items), int(np.count_nonzero(pool_weight)))
    pool_idx = rng.choice(cfg.pool_size, n_pool, replace=False, p=pool_weight / pool_weight.sum())
    own = _items_from_cats(rng, g, cfg, rng.choice(C, n_items - n_pool, p=mix))
    it = {k: np.concatenate([g.pool[k][pool_idx], own[k]]) for k in own}
    it["logprice"] = it["logprice"] + rng.normal(0.0, 0.05, n_items)  # the shop's own markup
    keys = np.array([f"GTIN-{i:06d}" for i in pool_idx] + [""] * (n_items - n_pool), dtype=object)
    order = rng.permutation(n_items)  # item IDs say nothing about pool membership
    it = {k: v[order] for k, v in it.items()}
    keys = keys[order]
    price = np.round(np.exp(it["logprice"]), 2)

    # Users: side fields, a favourite category that depends on them, tastes near its centroid.
    n_users = max(20, round(n_imp / cfg.impressions_per_user))
    age = rng.choice(len(AGE_BUCKETS), n_users, p=AGE_PROBS)
    gender = rng.choice(len(GENDERS), n_users, p=GENDER_PROBS)
    region_mix = rng.dirichlet(np.ones(cfg.n_regions))
    region = rng.choice(cfg.n_regions, n_users, p=region_mix)
    with np.errstate(divide="ignore"):  # log(0) = -inf: a category the shop does not sell is never a favourite
        log_mix = np.log(mix)
    fav_logit = log_mix[None, :] + (g.age_aff[age] + g.gender_aff[gender])[:, g.top_of]  # (U, C)
    fav = np.argmax(fav_logit + rng.gumbel(size=(n_users, C)), axis=1)
    taste = (g.centroid[fav] + g.age_taste[age] + g.gender_taste[gender] + g.region_taste[region]
             + cfg.user_spread * rng.standard_normal((n_users, d)))
    sens = cfg.price_sensitivity * np.exp(g.age_price[age] + 0.4 * rng.standard_normal(n_users))
    activity = rng.lognormal(0.0, 0.8, n_users)
    primary_device = rng.choice(len(DEVICES), n_users, p=DEVICE_PROBS)

    # Impression log and funnel labels; the per-shop intercepts are calibrated on this draw.
    start_day = int(np.datetime64(cfg.start_date, "D").astype(np.int64))
    day_index = start_day + np.arange(cfg.days)
    weekly = _weekly(cfg, day_index)
    people = _People(taste=taste, sens=sens, age=age, gender=gender, activity=activity, device=primary_device)
    log, intercepts = _draw_impressions(rng, cfg, g, it, people, n_imp, day_index, weekly / weekly.sum())
    item_ids = np.array([f"i{k:05d}" for k in range(n_items)], dtype=object)
    user_ids = np.array([f"u{k:05d}" for k in range(n_users)], dtype=object)

    items = pd.DataFrame({
        "item_id": item_ids, "global_key": keys,
        "category": np.array(g.cat_names, dtype=object)[it["cat"]],
        "brand": np.array([f"brand-{c:02d}-{b}" for c, b in zip(it["cat"], it["brand"], strict=True)],
                          dtype=object),
        "price": price.astype(np.float64),
    })
    users = pd.DataFrame({
        "user_id": user_ids, "age_bucket": np.array(AGE_BUCKETS, dtype=object)[age],
        "gender": np.array(GENDERS, dtype=object)[gender],
        "region": np.array([f"region-{r}" for r in range(cfg.n_regions)], dtype=object)[region],
    })

    sales = None
    if "sales" not in drop:
        # Daily units ~ Poisson(demand x weekly seasonality x promo lift), promotions run promo_days.
        log_demand = it["appeal"] + 0.5 * np.log(C * mix[it["cat"]] + 1e-3) - cfg.price_sensitivity * (
            it["logprice"] - g.logprice_ref)
        demand = np.exp(log_demand)
        demand *= cfg.mean_daily_units / demand.mean()
        starts = np.cumsum(rng.random((n_items, cfg.days)) < cfg.promo_rate, axis=1)
        lagged = np.zeros_like(starts)
        lagged[:, cfg.promo_days:] = starts[:, :-cfg.promo_days] if cfg.promo_days < cfg.days else 0
        promo = (starts - lagged) > 0
        lam = demand[:, None] * weekly[None, :] * np.where(promo, cfg.promo_lift, 1.0)
        sales = pd.DataFrame({
            "item_id": np.repeat(item_ids, cfg.days), "day": np.tile(day_index, n_items).astype(np.int32),
            "units": rng.poisson(lam).ravel().astype(np.float32), "promo": promo.ravel().astype(np.int8),
        })

    # Evaluation top-up, drawn last so every row before it (training log, sales) is unchanged.
    n_topup = _topup_size(cfg, log["day"])
    if n_topup:
        window = np.zeros(cfg.days)
        window[cfg.days - cfg.eval_days:] = weekly[cfg.days - cfg.eval_days:]
        extra, _ = _draw_impressions(rng, cfg, g, it, people, n_topup, day_index, window / window.sum(), intercepts)
        log = {k: np.concatenate([log[k], extra[k]]) for k in log}

    u, i, score = log["user"], log["item"], log["score"]
    clicked, purchased = log["clicked"], log["purchased"]
    inter = pd.DataFrame({
        "user_id": user_ids[u], "item_id": item_ids[i], "timestamp": log["timestamp"],
        "clicked": clicked.astype(np.int8), "carted": log["carted"].astype(np.int8),
        "purchased": purchased.astype(np.int8), "quantity": log["quantity"],
        "device": np.array(DEVICES, dtype=object)[log["device"]], "hour": log["hour"].astype(np.int8),
    })
    by_time = np.argsort(log["timestamp"], kind="stable")
    inter, score = inter.iloc[by_time].reset_index(drop=True), score[by_time]
    if "ctr" in drop:  # the shop logs clicks only: no impressions, so no CTR task
        kept = inter["clicked"].to_numpy() == 1
        inter, score = inter[kept].reset_index(drop=True), score[kept]

    shop = ShopData(name=name, interactions=inter, items=None if id_only else items,
                    users=None if id_only else users, sales=sales,
                    meta={"source": "synthetic", "seed": cfg.seed})
    top_mix = np.bincount(g.top_of, weights=mix, minlength=cfg.n_top_categories)
    clicks = int(clicked.sum())
    truth = {
        "n_impressions": int(n_imp), "n_eval_topup": int(n_topup), "n_rows": len(inter),
        "n_users": int(n_users), "n_items": int(n_items),
        "n_pool_items": int(n_pool), "pool_keys": sorted(k for k in keys if k),
        "category_mix": {c: round(float(m), 6) for c, m in zip(g.cat_names, mix, strict=True)},
        "top_category_mix": {t: round(float(m), 6) for t, m in zip(g.top_names, top_mix, strict=True)},
        "dominant_category": g.cat_names[int(np.argmax(mix))],
        "dominant_top_category": g.top_names[int(np.argmax(top_mix))],
        "region_mix": [round(float(m), 6) for m in region_mix],
        "ctr": float(clicked.mean()), "cvr": float(purchased.sum() / max(clicks, 1)),
        "cart_rate": float(log["carted"].sum() / max(clicks, 1)),
        "dropped_tasks": sorted(drop), "id_only": bool(id_only),
    }
    return shop, truth, score


def generate_world(cfg: WorldConfig) -> World:
    """Draw the whole world for ``cfg`` (deterministic per ``cfg.seed``)."""
    seeds = np.random.SeedSequence(cfg.seed).spawn(3 + cfg.n_shops + cfg.n_late_joiners)
    g = _make_globals(np.random.default_rng(seeds[0]), cfg)
    train_mix, late_mix, reserved = _category_mixes(np.random.default_rng(seeds[1]), cfg, g)
    sizes = _shop_sizes(cfg)

    drop_rng = np.random.default_rng(seeds[2])
    drops = [{t for t in ("ctr", "sales") if drop_rng.random() < cfg.task_dropout} for _ in range(cfg.n_shops)]
    drops[0] = set()  # the largest shop keeps every task, so each task is learnable somewhere
    for k in range(cfg.n_shops - cfg.n_small_shops, cfg.n_shops):
        drops[k].discard("ctr")  # small shops keep their impression log: they are where federation must pay off

    small = {f"shop_{k:02d}" for k in range(cfg.n_shops - cfg.n_small_shops, cfg.n_shops)}
    specs = [(f"shop_{k:02d}", int(sizes[k]), train_mix[k], False, drops[k], False) for k in range(cfg.n_shops)]
    for j in range(cfg.n_late_joiners):
        id_only = cfg.id_only_joiner and j == cfg.n_late_joiners - 1
        disjoint = bool(reserved) and j == 0
        specs.append((f"late_{j:02d}", cfg.late_joiner_impressions, late_mix[j], id_only, set(), disjoint))

    shops, shop_truth, logits = [], {}, {}
    for k, (name, n_imp, mix, id_only, drop, disjoint) in enumerate(specs):
        shop, t, logits[name] = _make_shop(np.random.default_rng(seeds[3 + k]), cfg, g, name=name, n_imp=n_imp, mix=mix,
                             id_only=id_only, drop=drop)
        late = name.startswith("late_")
        shop.meta.update({"late_joiner": late, "small": name in small})
        t.update({"late_joiner": late, "small": name in small, "disjoint": disjoint,
                  "size_rank": k + 1 if not late else None, "tasks": shop.available_tasks()})
        shops.append(shop)
        shop_truth[name] = t

    late_names = [s.name for s in shops if s.meta["late_joiner"]]
    truth = {
        "generator": "fedshop.synthetic/1", "seed": cfg.seed, "config": asdict(cfg),
        "taxonomy": g.cat_names, "top_categories": g.top_names, "reserved_categories": reserved,
        "pool_size": cfg.pool_size, "late_joiners": late_names, "small_shops": sorted(small),
        "shops": shop_truth,
    }
    return World(shops=shops, late_joiners=late_names, truth=truth, click_logit=logits)


def write_world(world: World, out_dir: Path, fmt: str = "csv", *, overwrite: bool = False) -> Path:
    """Write every shop as a merchant directory ``out_dir/<shop>`` plus ``out_dir/world.json`` (the truth)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shop in world.shops:
        write_shop_dir(shop, out_dir / shop.name, fmt, overwrite=overwrite)
    doc = {"shops": [s.name for s in world.shops], "late_joiners": world.late_joiners, "format": fmt,
           "truth": world.truth}
    atomic_write_text(out_dir / "world.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return out_dir
