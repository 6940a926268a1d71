"""Features: vocabularies, shared hashing, splits, behaviour histories, subsampling and pooling."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from shared.datasets.synthetic import World
from shared.features import (
    TEST,
    TRAIN,
    VAL,
    FeatureConfig,
    ShopTensors,
    assign_splits,
    build_shop_tensors,
    hash_field,
    pool_shops,
)
from shared.schema import ShopData


def make_shop(name: str, rows: list[tuple[str, str, int, int]], items: pd.DataFrame | None = None,
              users: pd.DataFrame | None = None) -> ShopData:
    """A hand-made shop from (user_id, item_id, timestamp, clicked) rows; nobody buys."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "clicked"])
    inter = inter.assign(timestamp=inter["timestamp"].astype(np.int64), carted=0, purchased=0, quantity=0)
    return ShopData(name=name, interactions=inter, items=items, users=users)


def id_vocab(source: ShopData) -> tuple[np.ndarray, np.ndarray]:
    """Index -> ID for users and items, per the features contract: sorted string IDs from 1, 0 = padding."""
    users = [source.interactions["user_id"]] + ([source.users["user_id"]] if source.users is not None else [])
    items = [source.interactions["item_id"]]
    items += [f["item_id"] for f in (source.items, source.sales) if f is not None]

    def vocab(parts: list[pd.Series]) -> np.ndarray:
        return np.r_[["<pad>"], np.sort(pd.concat(parts).astype(str).unique())].astype(object)

    return vocab(users), vocab(items)


def unprefix(ids: np.ndarray) -> np.ndarray:
    """Pooled IDs are 'shop::id'; strip the shop prefix to compare with a shop's own IDs."""
    return np.vectorize(lambda x: str(x).split("::", 1)[-1], otypes=[object])(ids)


# ---------------------------------------------------------------------------------------------- vocabulary
def test_index_zero_is_reserved_for_padding(largest_shop: ShopTensors) -> None:
    t = largest_shop
    users, items = id_vocab(t.source)
    assert (t.n_users, t.n_items) == (len(users), len(items))  # one row per ID plus padding row 0
    for split in ("train", "val", "test"):
        assert int(t.rows[split]["user"].min()) >= 1, f"{split}: a row points at padding user 0"
        assert int(t.rows[split]["item"].min()) >= 1, f"{split}: a row points at padding item 0"
    assert not t.item_cat[0].any() and int(t.item_key[0]) == 0 and not t.user_cat[0].any()
    assert 0 not in set(t.catalog.tolist())
    assert int(t.catalog.max()) < t.n_items


def test_hash_field_maps_missing_to_zero_and_values_into_range() -> None:
    out = hash_field("brand", pd.Series(["acme", None, "", "zeta", "acme"]), 64)
    assert out[1] == 0 and out[2] == 0
    assert out[0] == out[4] and 1 <= out[0] < 64 and 1 <= out[3] < 64
    # The field name is part of the key: one value in two fields need not share a bucket.
    assert hash_field("brand", ["x"], 1 << 20)[0] != hash_field("category", ["x"], 1 << 20)[0]


def test_shared_field_value_lands_in_same_bucket_in_two_shops() -> None:
    cfg = FeatureConfig(hash_buckets=512, product_buckets=1024, history_len=3)
    items_a = pd.DataFrame({"item_id": ["a1", "a2"], "category": ["Home>Lamps", "Toys>Cars"],
                            "brand": ["Acme", "Zeta"], "price": [10.0, 3.0], "global_key": ["GTIN-1", None]})
    items_b = pd.DataFrame({"item_id": ["b0", "b7", "b9"],
                            "category": ["Books>SF", "Home>Lamps", "Toys>Cars"],
                            "brand": ["Orbit", "Other", "Zeta"], "price": [8.0, 99.0, 4.0],
                            "global_key": [None, "GTIN-1", "GTIN-2"]})
    users_a = pd.DataFrame({"user_id": ["u1"], "region": ["north"]})
    users_b = pd.DataFrame({"user_id": ["x", "y"], "region": ["south", "north"]})
    a = build_shop_tensors(make_shop("A", [("u1", "a1", 1, 1), ("u1", "a2", 2, 0)], items_a, users_a), cfg)
    b = build_shop_tensors(make_shop("B", [("x", "b0", 1, 1), ("y", "b7", 2, 0), ("y", "b9", 3, 1)],
                                     items_b, users_b), cfg)
    (_, ia), (ub, ib) = id_vocab(a.source), id_vocab(b.source)
    a1, a2 = list(ia).index("a1"), list(ia).index("a2")
    b7, b9 = list(ib).index("b7"), list(ib).index("b9")
    assert int(a.item_cat[a1, 0]) == int(b.item_cat[b7, 0]) != 0  # same category "Home>Lamps"
    assert int(a.item_cat[a1, 1]) == int(b.item_cat[b7, 1])  # same top category "Home"
    assert int(a.item_cat[a2, 2]) == int(b.item_cat[b9, 2])  # same brand "Zeta"
    assert int(a.item_cat[a1, 2]) != int(b.item_cat[b7, 2])  # Acme vs Other
    assert int(a.item_key[a1]) == int(b.item_key[b7]) != 0  # same global product key
    assert int(a.item_key[a2]) == 0  # no key -> bucket 0
    assert int(b.item_key[b9]) not in (0, int(b.item_key[b7]))
    # Local IDs differ (a1 vs b7, u1 vs y) but the shared user field 'north' hashes identically.
    assert torch.equal(a.user_cat[1], b.user_cat[list(ub).index("y")])


# ---------------------------------------------------------------------------------------------- splits
def test_temporal_split_is_by_time(tiny_world: World, tiny_features: FeatureConfig) -> None:
    shop = tiny_world.training_shops()[0]
    splits, sales_split = assign_splits(shop, tiny_features)
    ts = shop.interactions["timestamp"].to_numpy()
    assert {TRAIN, VAL, TEST} <= set(splits.tolist())
    assert ts[splits == TRAIN].max() < ts[splits == VAL].min()
    assert ts[splits == VAL].max() < ts[splits == TEST].min()
    day = shop.sales["day"].to_numpy()
    assert day[sales_split == TRAIN].max() < day[sales_split == TEST].min()
    tensors = build_shop_tensors(shop, tiny_features)
    for name, code in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        assert tensors.rows[name]["user"].shape[0] == int((splits == code).sum())


def test_leave_last_out_puts_each_users_last_click_in_test(tiny_world: World,
                                                            tiny_features: FeatureConfig) -> None:
    shop = tiny_world.training_shops()[0]
    splits, _ = assign_splits(shop, replace(tiny_features, split="leave-last-out"))
    inter = shop.interactions.assign(_split=splits)
    clicks = inter[inter["clicked"] == 1].sort_values("timestamp", kind="stable")
    n_clicks = clicks.groupby("user_id").size()
    last = clicks.groupby("user_id").tail(1).set_index("user_id")["_split"]
    second = clicks.groupby("user_id").nth(-2).set_index("user_id")["_split"]
    many = n_clicks.index[n_clicks >= 2]
    assert len(many) > 20
    assert (last[many] == TEST).all()
    assert second[many].isin([VAL, TEST]).all()
    one = inter["user_id"].isin(n_clicks.index[n_clicks == 1])
    assert (inter.loc[one, "_split"] != TEST).all(), "a user with one click must keep it for training"
    # Everything a user did before their held-out rows is training data.
    train_end = inter[inter["_split"] == TRAIN].groupby("user_id")["timestamp"].max()
    held_start = inter[inter["_split"] != TRAIN].groupby("user_id")["timestamp"].min()
    both = train_end.index.intersection(held_start.index)
    assert (train_end[both] < held_start[both]).all()


def test_unknown_split_name_is_rejected(tiny_world: World) -> None:
    with pytest.raises(ValueError, match="features.split"):
        assign_splits(tiny_world.shops[0], FeatureConfig(split="random"))


# ---------------------------------------------------------------------------------------------- histories
def test_histories_hold_only_earlier_clicks_most_recent_first() -> None:
    rows = [
        ("u1", "A", 10, 1),
        ("u2", "B", 15, 1),
        ("u1", "B", 20, 0),
        ("u1", "C", 30, 1),  # clicked: its own click must not be in its history
        ("u1", "D", 30, 0),  # same second as the click on C: C is not "before" it either
        ("u1", "A", 40, 1),
        ("u3", "A", 11, 1),
        ("u3", "B", 12, 1),
        ("u3", "C", 13, 1),
        ("u3", "D", 14, 1),
        ("u3", "A", 16, 0),  # history longer than history_len: keep the 3 most recent
        ("u2", "C", 50, 0),  # the only test row (temporal split: t >= 46)
    ]
    cfg = FeatureConfig(hash_buckets=64, product_buckets=64, history_len=3, sampled_negatives=1)
    t = build_shop_tensors(make_shop("hand", rows), cfg)
    _, items = id_vocab(t.source)
    expected_train = [[], [], ["A"], ["A"], ["A"], ["C", "A"], [], ["A"], ["B", "A"], ["C", "B", "A"],
                      ["D", "C", "B"]]
    expected_test = [["B"]]
    for split, expected in (("train", expected_train), ("test", expected_test)):
        hist = t.rows[split]["hist"]
        assert hist.shape == (len(expected), 3)
        got = [[items[i] for i in row if i > 0] for row in hist.tolist()]
        assert got == expected, split
        # Padding only at the tail.
        for row in hist.tolist():
            nz = [i > 0 for i in row]
            assert nz == sorted(nz, reverse=True)
    assert [items[i] for i in t.rows["train"]["item"].tolist()] == [r[1] for r in rows[:-1]]


# ---------------------------------------------------------------------------------------------- subsampling
def _train_index(t: ShopTensors) -> set:
    inter = t.source.interactions
    return set(inter.index[inter["_split"].to_numpy() == TRAIN])


@pytest.fixture(scope="module")
def subsamples(largest_shop: ShopTensors) -> dict[tuple[float, int], ShopTensors]:
    """The largest shop subsampled to (fraction, seed) pairs, built once for this module."""
    return {(f, s): largest_shop.subsample_train(f, seed=s) for f, s in ((0.25, 0), (0.05, 0), (0.25, 1))}


def test_subsample_train_is_nested_and_keeps_val_test(largest_shop: ShopTensors, subsamples: dict) -> None:
    full = largest_shop
    quarter, twentieth = subsamples[0.25, 0], subsamples[0.05, 0]
    assert full.subsample_train(1.0, seed=0) is full
    n_full, n_q, n_t = (len(_train_index(x)) for x in (full, quarter, twentieth))
    assert _train_index(twentieth) <= _train_index(quarter) <= _train_index(full)
    assert 0 < n_t < n_q < n_full
    assert abs(n_q / n_full - 0.25) < 0.05 and abs(n_t / n_full - 0.05) < 0.03
    assert twentieth.rows["train"]["user"].shape[0] == n_t
    # The same vocabularies, so local embeddings stay index-compatible with the full shop's.
    assert (twentieth.n_users, twentieth.n_items) == (full.n_users, full.n_items)
    assert twentieth.sales["train"]["units"].shape[0] < quarter.sales["train"]["units"].shape[0]
    for sub in (quarter, twentieth):
        for split in ("val", "test"):
            # Histories are rebuilt from the kept rows only (by design), so they are not compared.
            for key in ("user", "item", "ctx_cat", "ctx_num", "clicked", "purchased"):
                assert torch.equal(full.rows[split][key], sub.rows[split][key]), (split, key)
            for key in ("item", "units"):
                assert torch.equal(full.sales[split][key], sub.sales[split][key]), (split, key)
            for key in ("user", "pos", "held"):
                assert torch.equal(full.ranking_eval[split][key], sub.ranking_eval[split][key]), (split, key)


def test_subsample_depends_on_seed_and_rejects_bad_fraction(largest_shop: ShopTensors,
                                                            subsamples: dict) -> None:
    a, b = _train_index(subsamples[0.25, 0]), _train_index(subsamples[0.25, 1])
    assert a != b and abs(len(a) - len(b)) < 0.1 * len(a)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            largest_shop.subsample_train(bad, seed=0)


# ---------------------------------------------------------------------------------------------- ID-only shop
def test_id_only_shop_builds_tensors(id_only_shop: ShopTensors) -> None:
    t = id_only_shop
    assert t.source.items is None and t.source.users is None
    assert not t.item_key.any() and not t.user_cat.any() and not t.item_cat.any()
    assert not t.item_num.any()
    assert {"ctr", "ranking"} <= set(t.tasks)
    assert t.rows["train"]["user"].shape[0] > 0 and t.ranking_eval["test"]


# ---------------------------------------------------------------------------------------------- pooling
def test_pool_views_match_per_shop_rows_and_negatives(tiny_world: World, tiny_features: FeatureConfig,
                                                      tiny_tensors: dict[str, ShopTensors]) -> None:
    shops = tiny_world.training_shops()
    pooled, views = pool_shops(shops, tiny_features)
    assert [v.shop_index for v in views] == list(range(len(shops)))
    assert pooled.rows["train"]["user"].shape[0] == sum(v.rows["train"]["user"].shape[0] for v in views)
    pu, pi = id_vocab(pooled.source)
    for shop, view in zip(shops, views, strict=True):
        own = tiny_tensors[shop.name]
        ou, oi = id_vocab(own.source)
        for split in ("val", "test"):
            a, b = own.rows[split], view.rows[split]
            assert a["user"].shape == b["user"].shape and a["user"].shape[0] > 0
            assert (ou[a["user"].numpy()] == unprefix(pu[b["user"].numpy()])).all()
            assert (oi[a["item"].numpy()] == unprefix(pi[b["item"].numpy()])).all()
            assert (oi[a["hist"].numpy()] == unprefix(pi[b["hist"].numpy()])).all()
            for key in ("clicked", "purchased", "ctx_cat"):
                assert torch.equal(a[key], b[key]), (shop.name, split, key)
            ra, rb = own.ranking_eval[split], view.ranking_eval[split]
            assert (ou[ra["user"].numpy()] == unprefix(pu[rb["user"].numpy()])).all()
            assert (oi[ra["pos"].numpy()] == unprefix(pi[rb["pos"].numpy()])).all()
            assert (oi[ra["neg"].numpy()] == unprefix(pi[rb["neg"].numpy()])).all(), "different negatives"
        # A view ranks only its own shop's catalog, not the pooled one.
        assert (oi[own.catalog.numpy()] == unprefix(pi[view.catalog.numpy()])).all()
        assert all(str(x).startswith(f"{shop.name}::") for x in pi[view.catalog.numpy()])
