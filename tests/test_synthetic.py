"""The synthetic multi-shop world: determinism, schema contract, promised structure and `fedshop generate`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder
from typer.testing import CliRunner

from shared.datasets.synthetic import World, WorldConfig, generate_world, write_world
from shared.schema import INTERACTION_COLUMNS, ShopData, load_shop_dir
from simulations.cli import app

SMALL = {"max_impressions": 6_000, "min_impressions": 1_500, "late_joiner_impressions": 2_000, "n_shops": 4,
         "n_small_shops": 1, "pool_size": 800}


@pytest.fixture(scope="module")
def world() -> World:
    """The default world (8 shops + 2 late joiners), generated once for the module."""
    return generate_world(WorldConfig())


def _frames(shop: ShopData) -> dict[str, pd.DataFrame | None]:
    """All tables of a shop by name."""
    return {"interactions": shop.interactions, "items": shop.items, "users": shop.users, "sales": shop.sales}


def _mix(world: World, name: str) -> np.ndarray:
    """A shop's true category mix as a vector over the taxonomy."""
    mix = world.truth["shops"][name]["category_mix"]
    return np.array([mix[c] for c in world.truth["taxonomy"]])


def test_same_seed_same_world_and_other_seed_differs() -> None:
    cfg = WorldConfig(seed=7, **SMALL)
    a, b, c = generate_world(cfg), generate_world(cfg), generate_world(WorldConfig(seed=8, **SMALL))
    assert [s.name for s in a.shops] == [s.name for s in b.shops]
    for sa, sb in zip(a.shops, b.shops, strict=True):
        for name, frame in _frames(sa).items():
            other = _frames(sb)[name]
            if frame is None:
                assert other is None
            else:
                pd.testing.assert_frame_equal(frame, other)
    assert json.dumps(a.truth, sort_keys=True) == json.dumps(b.truth, sort_keys=True)
    assert not a.shops[0].interactions.equals(c.shops[0].interactions)
    assert a.truth["shops"]["shop_00"]["category_mix"] != c.truth["shops"]["shop_00"]["category_mix"]


def test_tables_follow_the_schema_contract(world: World) -> None:
    for shop in world.shops:
        inter = shop.interactions
        assert list(inter.columns) == [*INTERACTION_COLUMNS, "device", "hour"]
        assert inter["timestamp"].dtype == np.int64 and inter["timestamp"].is_monotonic_increasing
        for col in ("clicked", "carted", "purchased", "hour"):
            assert inter[col].dtype == np.int8, col
        assert inter["quantity"].dtype == np.float32 and (inter["quantity"] >= 0).all()
        assert inter["hour"].between(0, 23).all()
        assert pd.api.types.is_string_dtype(inter["user_id"]) and pd.api.types.is_string_dtype(inter["device"])
        if shop.items is not None:
            items = shop.items
            assert list(items.columns) == ["item_id", "global_key", "category", "brand", "price"]
            assert items["item_id"].is_unique and (items["price"] > 0).all()
            assert set(inter["item_id"]) <= set(items["item_id"])
            keys = items["global_key"][items["global_key"] != ""]
            assert keys.str.fullmatch(r"GTIN-\d{6}").all()
            assert items["category"].isin(world.truth["taxonomy"]).all()
            assert set(inter["user_id"]) <= set(shop.users["user_id"])
            assert list(shop.users.columns) == ["user_id", "age_bucket", "gender", "region"]
        if shop.sales is not None:
            sales = shop.sales
            assert list(sales.columns) == ["item_id", "day", "units", "promo"]
            assert (sales["day"].dtype, sales["units"].dtype, sales["promo"].dtype) == (np.int32, np.float32, np.int8)
            assert (sales["units"] >= 0).all() and sales["promo"].isin([0, 1]).all()
        assert world.truth["shops"][shop.name]["tasks"] == shop.available_tasks()


def test_labels_are_funnel_consistent(world: World) -> None:
    for shop in world.shops:
        inter = shop.interactions
        assert (inter["carted"] <= inter["clicked"]).all() and (inter["purchased"] <= inter["carted"]).all()
        bought = inter["purchased"] == 1
        assert (inter.loc[bought, "quantity"] >= 1).all() and (inter.loc[~bought, "quantity"] == 0).all()
        assert (inter["quantity"] == inter["quantity"].round()).all()


def test_rates_are_calibrated(world: World) -> None:
    for name in ("shop_00", "shop_01", "late_00"):
        t = world.truth["shops"][name]
        assert 0.035 < t["ctr"] < 0.045, (name, t["ctr"])
        assert 0.06 < t["cvr"] < 0.14, (name, t["cvr"])
        assert 0.25 < t["cart_rate"] < 0.35, (name, t["cart_rate"])


def test_shop_sizes_follow_a_power_law_with_small_shops_at_the_bottom(world: World) -> None:
    cfg = WorldConfig()
    sizes = np.array([world.truth["shops"][s.name]["n_impressions"] for s in world.training_shops()])
    assert sizes[0] == cfg.max_impressions and sizes[-1] == cfg.min_impressions
    drops = -np.diff(sizes)
    assert (drops > 0).all() and (np.diff(drops) < 0).all()  # decreasing and convex in rank
    assert sizes[0] / np.median(sizes) > 4  # heavy head: one large shop, many small ones
    small = world.truth["small_shops"]
    assert small == [s.name for s in world.training_shops()[-cfg.n_small_shops:]]
    assert all(world.truth["shops"][n]["n_impressions"] < 2 * cfg.min_impressions for n in small)
    assert all(world.truth["shops"][n]["small"] for n in small)


def test_late_joiners_are_held_out_with_the_promised_properties(world: World) -> None:
    assert world.late_joiners == ["late_00", "late_01"]
    assert {s.name for s in world.training_shops()}.isdisjoint(world.late_joiners)
    by_name = {s.name: s for s in world.shops}
    disjoint, id_only = by_name["late_00"], by_name["late_01"]
    assert world.truth["shops"]["late_00"]["disjoint"] and world.truth["shops"]["late_01"]["id_only"]
    trained = set().union(*(set(s.items["category"]) for s in world.training_shops()))
    assert set(disjoint.items["category"]).isdisjoint(trained)
    assert set(world.truth["reserved_categories"]) >= set(disjoint.items["category"])
    assert id_only.items is None and id_only.users is None
    assert {"ctr", "cvr", "ranking"} <= set(id_only.available_tasks())
    # Category mixes unlike the others: less overlap with the average training mix than any training shop.
    mean_mix = np.mean([_mix(world, s.name) for s in world.training_shops()], axis=0)
    overlap = {s.name: np.minimum(_mix(world, s.name), mean_mix).sum() for s in world.shops}
    worst_training = min(overlap[s.name] for s in world.training_shops())
    assert all(overlap[name] < worst_training for name in world.late_joiners)


def test_ctr_signal_is_strong_but_not_trivial(world: World) -> None:
    big = world.shops[0]
    clicked = big.interactions["clicked"].to_numpy()
    logit = world.click_logit[big.name].reshape(-1, 1)
    fitted = LogisticRegression().fit(logit, clicked).predict_proba(logit)[:, 1]
    assert 0.75 < roc_auc_score(clicked, fitted) < 0.95


def test_shared_fields_alone_predict_clicks(world: World) -> None:
    """Shared fields (global key, taxonomy, brand, price, user sides and their crosses) transfer to a new shop."""
    def table(shop: ShopData) -> tuple[pd.DataFrame, np.ndarray]:
        rows = shop.interactions.merge(shop.items, on="item_id").merge(shop.users, on="user_id")
        rows["price_band"] = np.floor(np.log(rows["price"])).astype(str)
        rows["hour"] = rows["hour"].astype(str)
        cols = ["global_key", "category", "brand", "price_band", "age_bucket", "gender", "region", "device", "hour"]
        for side in ("age_bucket", "gender", "region"):
            rows[f"{side}_x_category"] = rows[side] + "|" + rows["category"]
            cols.append(f"{side}_x_category")
        return rows[cols], rows["clicked"].to_numpy()

    shops = [s for s in world.training_shops() if "ctr" in s.available_tasks()]
    train = [table(s) for s in shops[1:]]
    x_test, y_test = table(shops[0])  # the largest shop, unseen in training
    enc = OneHotEncoder(handle_unknown="ignore").fit(pd.concat([x for x, _ in train]))
    model = LogisticRegression(C=0.5, max_iter=500).fit(enc.transform(pd.concat([x for x, _ in train])),
                                                         np.concatenate([y for _, y in train]))
    assert roc_auc_score(y_test, model.predict_proba(enc.transform(x_test))[:, 1]) > 0.65


def test_sales_show_weekly_seasonality_and_promo_lift(world: World) -> None:
    sales = world.shops[1].sales
    dow = (sales["day"] + 3) % 7  # Monday = 0
    per_day = sales.groupby(dow)["units"].mean()
    assert per_day[5] > 1.2 * per_day[1]  # Saturday vs Tuesday
    lift = sales.loc[sales["promo"] == 1, "units"].mean() / sales.loc[sales["promo"] == 0, "units"].mean()
    assert lift > 1.3
    assert 0.05 < sales["promo"].mean() < 0.3


def test_task_dropout_and_overlap_knobs() -> None:
    none = generate_world(WorldConfig(task_dropout=0.0, **SMALL))
    assert all(s.available_tasks() == ["ctr", "cvr", "ranking", "sales"] for s in none.shops)
    every = generate_world(WorldConfig(task_dropout=1.0, **SMALL))
    largest, *rest = every.training_shops()
    assert largest.available_tasks() == ["ctr", "cvr", "ranking", "sales"]
    small = set(every.truth["small_shops"]) if "small_shops" in every.truth else {
        s.name for s in every.training_shops() if s.meta.get("small")}
    assert small
    for shop in rest:
        assert shop.sales is None
        if shop.name in small:  # small shops keep their impression log (CTR) whatever the dropout
            assert shop.available_tasks() == ["ctr", "cvr", "ranking"]
        else:
            assert (shop.interactions["clicked"] == 1).all()
            assert shop.available_tasks() == ["cvr", "ranking"]

    def keyed(cfg: WorldConfig) -> list[float]:
        w = generate_world(cfg)
        return [(s.items["global_key"] != "").mean() for s in w.training_shops()]

    assert keyed(WorldConfig(overlap=0.0, **SMALL)) == [0.0] * SMALL["n_shops"]
    assert keyed(WorldConfig(overlap=1.0, **SMALL)) == [1.0] * SMALL["n_shops"]


def test_eval_topup_grows_only_the_evaluation_window() -> None:
    """eval_impressions adds rows to the last eval_days days only; training rows and sales stay identical."""
    base = generate_world(WorldConfig(**SMALL))
    topped = generate_world(WorldConfig(eval_impressions=3_000, eval_days=12, **SMALL))
    start = int(np.datetime64(WorldConfig().start_date, "D").astype(np.int64))
    cut = (start + WorldConfig().days - 12) * 86_400
    for before, after in zip(base.shops, topped.shops, strict=True):
        old, new = before.interactions, after.interactions
        pd.testing.assert_frame_equal(old[old["timestamp"] < cut].reset_index(drop=True),
                                      new[new["timestamp"] < cut].reset_index(drop=True))
        if before.sales is not None:
            pd.testing.assert_frame_equal(before.sales, after.sales)
        window = new[new["timestamp"] >= cut]
        if (old["clicked"] == 0).any():  # shops without a CTR log keep clicked rows only
            assert len(window) >= 3_000, after.name
            assert abs(window["clicked"].mean() - old["clicked"].mean()) < 0.02, after.name  # same funnel
            in_window = int((old["timestamp"] >= cut).sum())
            assert topped.truth["shops"][after.name]["n_eval_topup"] == max(0, 3_000 - in_window)
    with pytest.raises(ValueError, match="eval_days"):
        WorldConfig(eval_impressions=100, eval_days=60)
    with pytest.raises(ValueError, match="eval_impressions"):
        WorldConfig(eval_impressions=-1)
    assert WorldConfig(eval_days=60, days=20).eval_impressions == 0  # the window is unused when the top-up is off


def test_shops_share_pool_products(world: World) -> None:
    a, b = (set(s.items["global_key"]) - {""} for s in world.shops[:2])
    assert a & b
    assert world.truth["shops"]["shop_00"]["pool_keys"] == sorted(a)


def test_heterogeneity_controls_how_different_shop_mixes_are() -> None:
    def mean_top_share(h: float) -> float:
        w = generate_world(WorldConfig(heterogeneity=h, **SMALL))
        return float(np.mean([max(w.truth["shops"][s.name]["category_mix"].values()) for s in w.training_shops()]))

    assert mean_top_share(0.05) > mean_top_share(0.3) > mean_top_share(10.0)


def test_truth_is_json_and_names_the_dominant_category(world: World) -> None:
    truth = json.loads(json.dumps(world.truth))
    for name, t in truth["shops"].items():
        assert t["dominant_category"] == max(t["category_mix"], key=t["category_mix"].get), name
        assert abs(sum(t["category_mix"].values()) - 1) < 1e-4
    assert truth["config"]["seed"] == 0 and truth["pool_size"] == WorldConfig().pool_size


def test_default_world_generates_fast() -> None:
    start = time.perf_counter()
    generate_world(WorldConfig(seed=3))
    assert time.perf_counter() - start < 30


def test_config_rejects_bad_knobs_by_name() -> None:
    with pytest.raises(ValueError, match="overlap"):
        WorldConfig(overlap=1.5)
    with pytest.raises(ValueError, match="base_cvr"):
        WorldConfig(base_cvr=0.5, cart_rate=0.3)
    with pytest.raises(ValueError, match=r"unknown keys \['n_shop'\]"):
        WorldConfig.from_mapping({"n_shop": 3})
    assert WorldConfig.from_mapping({"n_shops": 3, "overlap": 0.2}).n_shops == 3


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_and_load_round_trip(tmp_path: Path, fmt: str) -> None:
    world = generate_world(WorldConfig(seed=1, **SMALL))
    out = write_world(world, tmp_path / "world", fmt)
    doc = json.loads((out / "world.json").read_text())
    assert doc["shops"] == [s.name for s in world.shops] and doc["late_joiners"] == world.late_joiners
    assert doc["truth"]["shops"].keys() == world.truth["shops"].keys()
    for shop in world.shops:
        loaded = load_shop_dir(out / shop.name)
        assert loaded.name == shop.name
        pd.testing.assert_frame_equal(loaded.interactions, shop.interactions, check_dtype=False)
        assert (loaded.interactions.dtypes[list(INTERACTION_COLUMNS)]
                == shop.interactions.dtypes[list(INTERACTION_COLUMNS)]).all()
        for name in ("items", "users", "sales"):
            mine, theirs = _frames(shop)[name], _frames(loaded)[name]
            if mine is None:
                assert name != "sales" and theirs is None
            else:
                pd.testing.assert_frame_equal(theirs[list(mine.columns)], mine, check_dtype=False)
        assert loaded.available_tasks() == shop.available_tasks()


def test_cli_generate_writes_world_and_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "w"
    runner = CliRunner()
    args = ["generate", "--shops", "3", "--seed", "2", "--out", str(out), "--late-joiners", "1",
            "--heterogeneity", "0.5", "--overlap", "0.4", "--eval-impressions", "2000"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "shop_00" in result.output and "late_00" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["late_00", "shop_00", "shop_01", "shop_02", "world.json"]
    truth = json.loads((out / "world.json").read_text())["truth"]
    assert truth["config"]["heterogeneity"] == 0.5 and truth["config"]["overlap"] == 0.4
    assert truth["config"]["eval_impressions"] == 2000 and truth["shops"]["shop_02"]["n_eval_topup"] > 0
    assert load_shop_dir(out / "shop_02").available_tasks()

    refused = runner.invoke(app, args)
    assert refused.exit_code != 0 and "--force" in refused.output
    forced = runner.invoke(app, [*args, "--force", "--format", "parquet"])
    assert forced.exit_code == 0, forced.output
    assert (out / "shop_00" / "interactions.parquet").exists()
    assert not (out / "shop_00" / "interactions.csv").exists()

    bad = runner.invoke(app, ["generate", "--out", str(tmp_path / "x"), "--format", "xlsx"])
    assert bad.exit_code != 0 and "xlsx" in bad.output
