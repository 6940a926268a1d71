"""Property inference (shadow meta-classifier) and sold-product leakage from encoder updates."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from server.secure import SecAggSettings
from shared.features import ShopTensors, hash_field
from shared.privacy.attacks import category_features, product_leakage, shadow_property_attack
from shared.scenario import load_scenario
from shared.schema import ShopData
from simulations.privacy.eval_config import PrivacyEvalConfig, property_world_overrides
from simulations.privacy.secagg_view import secagg_view
from simulations.privacy.updates import clip_update, flat, shop_updates, unflatten

SHADOW_SEED_OFFSET = 1000  # the shadow world: same public generator and taxonomy, independently drawn shops


def dominant_category(shop: ShopData) -> str:
    """The top-level category with most impressions in a shop (the property a curious coordinator guesses)."""
    if shop.items is None or "category" not in shop.items:
        return "unknown"
    cats = shop.interactions[["item_id"]].merge(shop.items[["item_id", "category"]], on="item_id", how="left")
    return str(cats["category"].fillna("").str.split(">").str[0].mode().iloc[0])


def sold_product_rows(tensors: ShopTensors) -> set[int]:
    """Global-product buckets of the items this shop showed in its training rows."""
    items = torch.unique(tensors.rows["train"]["item"])
    keys = tensors.item_key[items]
    return {int(k) for k in keys[keys > 0]}


def category_layout(shops: list[ShopData], buckets: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The public taxonomy as an attacker holds it: top names, their buckets, leaf buckets, each leaf's top index."""
    leaves = sorted({c for sh in shops if sh.items is not None for c in sh.items["category"].dropna().astype(str)})
    if not leaves:
        raise ValueError("property inference needs shops with an items table that has a 'category' column")
    tops = sorted({leaf.split(">")[0] for leaf in leaves})
    leaf_top = np.array([tops.index(leaf.split(">")[0]) for leaf in leaves])
    return (tops, hash_field("category_top", np.array(tops, dtype=object), buckets),
            hash_field("category", np.array(leaves, dtype=object), buckets), leaf_top)


def property_and_product_leakage(cfg: PrivacyEvalConfig, run_dir: Path, base: str = "default") -> dict[str, object]:
    """Property inference (shadow meta-classifier) and product-row leakage over many small shops.

    Targets: ``cfg.n_property_shops`` shops of the scenario's world. Shadows: ``cfg.n_shadow_shops``
    shops of an independently drawn world (seed + SHADOW_SEED_OFFSET) that a coordinator can
    simulate from the public generator, taxonomy and hashing; their updates start from the same
    global encoder the coordinator sent the targets. Views: plain, clipped (central DP without
    SecAgg+), a shop's share of the noisy central-DP release, and SecAgg+ masked vectors.
    """
    scenario = load_scenario(base, property_world_overrides(cfg.n_property_shops))
    shops = scenario.training_shops()
    shadow_scenario = load_scenario(base, property_world_overrides(cfg.n_shadow_shops,
                                                                   seed=scenario.seed + SHADOW_SEED_OFFSET))
    shadows = shadow_scenario.training_shops()
    initial, updates, tensors = shop_updates(scenario, shops, steps=cfg.property_steps, seed=cfg.seed)
    _, shadow_updates, _ = shop_updates(shadow_scenario, shadows, steps=cfg.property_steps, seed=cfg.seed + 1,
                                        model_seed=scenario.seed)
    tops, top_rows, leaf_rows, leaf_top = category_layout(shops + shadows, scenario.features.hash_buckets)
    target_y = np.array([tops.index(dominant_category(s)) for s in shops])
    shadow_y = np.array([tops.index(dominant_category(s)) for s in shadows])
    norms = np.array([np.linalg.norm(flat(u)) for u in updates])
    out: dict[str, object] = {
        "n_shops": len(shops), "n_shadow_shops": len(shadows), "property": "dominant top-level category",
        "update_l2_norm": [float(norms.min()), float(np.median(norms)), float(norms.max())],
        "share_clipped": float(np.mean(norms > cfg.clipping_norm)),
        "classes": tops, "target_class_counts": np.bincount(target_y, minlength=len(tops)).tolist(),
        "shadow_world_seed": scenario.seed + SHADOW_SEED_OFFSET}

    def features(views: list[Mapping[str, np.ndarray]]) -> np.ndarray:
        return np.stack([category_features(v["wide.weight"], top_rows, leaf_rows, leaf_top) for v in views])

    def attack(shadow_views: list[Mapping[str, np.ndarray]], target_views: list[Mapping[str, np.ndarray]]
               ) -> dict[str, object]:
        return shadow_property_attack(features(shadow_views), shadow_y, features(target_views), target_y,
                                      seed=cfg.seed).as_dict()

    rng = np.random.default_rng(cfg.seed)

    def release_share(views: list[dict[str, np.ndarray]], z: float) -> list[dict[str, np.ndarray]]:
        # The central-DP release is (sum of clipped updates + N(0, (zS)^2)) / n: against an observer who
        # knows every other shop's update (DP's adversary), a shop's share is its clipped update + N(0, (zS)^2).
        # Only the first-order table enters the features; noise elsewhere is independent and changes nothing.
        return [{"wide.weight": v["wide.weight"] + rng.normal(0.0, z * cfg.clipping_norm, v["wide.weight"].shape)}
                for v in views]

    attacks: dict[str, dict[str, object]] = {"individual update (no protection)": attack(shadow_updates, updates)}
    clipped = [clip_update(u, cfg.clipping_norm) for u in updates]
    shadow_clipped = [clip_update(u, cfg.clipping_norm) for u in shadow_updates]
    # Central DP adds noise to the *aggregate* only: the coordinator still sees each clipped update.
    attacks[f"individual clipped update (central DP, S={cfg.clipping_norm}, no SecAgg+)"] = attack(shadow_clipped,
                                                                                                  clipped)
    for z in sorted({z for z in cfg.central_noise if z > 0}):
        attacks[f"shop's share of the central-DP release, z={z}"] = attack(release_share(shadow_clipped, z),
                                                                          release_share(clipped, z))
    views, aggregate, _ = secagg_view(initial, updates, run_dir / "secagg-view")
    # The attacker's best model (trained on plain shadow updates) applied to what SecAgg+ delivers.
    attacks["SecAgg+ masked vector"] = attack(shadow_updates, [unflatten(v, initial) for v in views])
    out["attacks"] = attacks

    key = "products.weight"
    init = initial[key]
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for noise in sorted({z for z in cfg.central_noise if z > 0} | {1.0}):
        std = noise * cfg.clipping_norm / len(updates)
        noisy = np.mean([c[key] for c in clipped], axis=0) + rng.normal(0, std, init.shape)
        rows.append((f"central DP z={noise}", noisy))
    leak: dict[str, dict[str, float]] = {}
    views_by = {"none (individual update)": None, "SecAgg+ (aggregate only)": aggregate[key] - init,
                **dict(rows)}
    for name, shared_view in views_by.items():
        rec, prec = [], []
        for t, u in zip(tensors, updates, strict=True):
            sold = sold_product_rows(t)
            seen = u[key] if shared_view is None else shared_view
            # SecAgg+ quantisation moves untouched rows by < one quantum: ignore changes below it.
            res = product_leakage(init, init + seen, sold, tol=SecAggSettings().quantisation_step())
            rec.append(res["recall"])
            prec.append(res["precision"])
        leak[name] = {"recall": float(np.mean(rec)), "precision": float(np.mean(prec))}
    out["product_leakage"] = leak
    return out
