"""The privacy evaluation on real (small) synthetic shops: property inference, product rows, user IDs, report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from simulations.privacy.eval_config import PrivacyEvalConfig, property_world_overrides, write_eval_scenario
from simulations.privacy.id_leakage import user_id_scan
from simulations.privacy.property_leakage import property_and_product_leakage


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    """One torch thread comes from conftest.py; here the federation's per-round logging is silenced."""
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def test_property_inference_and_product_rows_in_a_small_world(tmp_path: Path) -> None:
    cfg = PrivacyEvalConfig.small()
    out = property_and_product_leakage(cfg, tmp_path)
    assert out["n_shops"] == cfg.n_property_shops and out["n_shadow_shops"] == cfg.n_shadow_shops
    attacks = out["attacks"]
    plain = attacks["individual update (no protection)"]
    secagg = attacks["SecAgg+ masked vector"]
    noisy = attacks["shop's share of the central-DP release, z=1.0"]
    # A meta-classifier trained on another world's shadow shops reads the dominant category from a
    # target shop's individual update: the whole bootstrap interval is above chance.
    assert plain["auc_ci"][0] > 0.55 and plain["pooled_auc_ci"][0] > 0.55
    assert plain["top1"] > plain["top1_chance"]
    # Masked vectors and a noisy release share do not carry it (the interval reaches chance).
    assert secagg["auc_ci"][0] < 0.5 < secagg["auc_ci"][1] or secagg["auc"] < plain["auc_ci"][0]
    assert noisy["auc"] < plain["auc_ci"][0]
    leak = out["product_leakage"]
    individual, union = leak["none (individual update)"], leak["SecAgg+ (aggregate only)"]
    dp = leak["central DP z=1.0"]
    assert individual["precision"] > 0.8 and individual["recall"] > 0.2  # its rows are readable and its own
    assert union["precision"] < 0.2  # only the union: rows are no longer attributable to the shop
    assert dp["precision"] < 0.05  # noise moves every row


def test_no_user_id_leaves_a_shop_plain_or_secagg(tmp_path: Path) -> None:
    scenario = write_eval_scenario("default", property_world_overrides(4), tmp_path / "eval.toml")
    ids = user_id_scan(scenario, 3, tmp_path)
    assert ids["user_ids"] > 100
    # Plain: 3 train + 3 evaluate replies (evaluate carries the metrics, so it is scanned too).
    assert ids["plain_replies"] == 6 and ids["secagg_replies"] >= 12  # 4 SecAgg+ stages x 3 shops (+ evaluate)
    assert ids["plain"] == 0.0 and ids["secagg"] == 0.0


def test_privacy_command_registers() -> None:
    import typer
    from typer.testing import CliRunner

    from simulations.commands import privacy

    app = typer.Typer()
    privacy.register(app)

    @app.command("noop")
    def noop() -> None:
        """Second command so Typer keeps sub-command names."""

    result = CliRunner().invoke(app, ["privacy", "--help"])
    assert result.exit_code == 0 and "SCENARIO" in result.output.upper() and "--small" in result.output


def test_report_writes_property_and_utility_tables_and_plot(tmp_path: Path) -> None:
    from shared.privacy.attacks import AttackResult
    from simulations.privacy.report import write_report

    attack = {"auc": 0.9, "auc_ci": (0.85, 0.95), "pooled_auc": 0.88, "pooled_auc_ci": (0.8, 0.93), "top1": 0.5,
              "top1_chance": 0.3}
    prop = {"n_shops": 60, "n_shadow_shops": 120, "property": "dominant top-level category", "classes": ["A", "B"],
            "target_class_counts": [30, 30], "shadow_world_seed": 1000, "update_l2_norm": [0.1, 0.5, 0.9],
            "share_clipped": 0.0, "attacks": {"individual update (no protection)": attack},
            "product_leakage": {"none (individual update)": {"recall": 0.6, "precision": 0.9}}}
    mia = {"shop": "s", "members": 10, "nonmembers": 10,
           "normal/loss-threshold": AttackResult("loss-threshold", 0.5, (0.4, 0.6), 0.0, (0.0, 0.1), 0.0, (0.0, 0.0),
                                                 10, 10)}
    row = {"noise_multiplier": 0.0, "delta": 1e-5, "rounds": 10, "metric": "ctr.auc", "seconds": 1.0}
    utility = [{**row, "protection": "plain FedAvg", "epsilon": float("inf"), "value": 0.73},
               {**row, "protection": "central DP", "noise_multiplier": 1.0, "epsilon": 19.1, "value": 0.51},
               {**row, "protection": "central DP", "noise_multiplier": 2.0, "epsilon": 8.1, "value": 0.49}]
    text = write_report(tmp_path, prop, mia, None, utility).read_text(encoding="utf-8")
    assert "| individual update (no protection) | 0.900 [0.850, 0.950] | 0.880 [0.800, 0.930] | 0.50 (0.30) |" in text
    assert "| central DP | 1.0 | 19.1 | 1e-05 | 10 | ctr.auc = 0.5100 | 1 |" in text
    assert (tmp_path / "privacy_utility.png").stat().st_size > 1000 and (tmp_path / "privacy.json").exists()


def test_secagg_with_central_dp_rows_compose_a_real_secagg_round(tmp_path: Path) -> None:
    from shared.scenario import load_scenario
    from simulations.privacy.utility import secagg_dp_rows

    scenario = load_scenario("default", property_world_overrides(3))
    cfg = PrivacyEvalConfig(central_noise=(0.0, 0.5), rounds=2, utility_steps=3)
    rows = secagg_dp_rows(cfg, scenario, scenario.training_shops(), tmp_path, {0.5: 0.01})
    assert [r["protection"] for r in rows] == ["SecAgg+ (composed, clipped)", "SecAgg+ and central DP"]
    assert rows[0]["epsilon"] == float("inf") and rows[1]["epsilon"] == 0.01
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    # Two SecAgg+ rounds per row actually ran (one checkpoint directory per round).
    assert sorted(p.name for p in (tmp_path / "utility-secagg-dp-z0.5").iterdir()) == ["round-1", "round-2"]


def test_secagg_view_is_the_masked_encoder_without_the_weight_factor(tmp_path: Path) -> None:
    import numpy as np

    from simulations.privacy.secagg_view import secagg_view
    from simulations.privacy.updates import flat

    rng = np.random.default_rng(0)
    initial = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    updates = [{k: rng.normal(scale=0.1, size=v.shape) for k, v in initial.items()} for _ in range(3)]
    views, aggregate, _ = secagg_view(initial, updates, tmp_path)
    # One masked value per encoder value (Flower prepends the weight factor; it is not part of the view).
    assert [v.size for v in views] == [17, 17, 17]
    mean = np.mean([flat(u) for u in updates], axis=0)
    assert np.allclose(flat(aggregate), mean, atol=1e-3)


def test_membership_inference_catches_the_positive_control_and_not_normal_training() -> None:
    from dataclasses import replace

    from shared.scenario import load_scenario
    from simulations.privacy.membership import membership_inference

    scenario = load_scenario("default")
    shop = next(s for s in scenario.training_shops() if s.name == "shop_03")  # ~300 users
    cfg = replace(PrivacyEvalConfig.small(), mia_users=300, overfit_epochs=30, reference_models=2)
    out = membership_inference(cfg, scenario, shop)
    assert out["members"] == out["nonmembers"] == 100
    control, normal = out["overfit/offline-LiRA"], out["normal/offline-LiRA"]
    assert control.auc_ci[0] > 0.65  # an overfit model's members are told apart (measured 0.83)
    assert normal.auc_ci[0] < 0.5 < normal.auc_ci[1] or normal.auc < control.auc_ci[0]
    assert out["dp_violations"] == 0 and out["dpsgd_report"]["epsilon"] < 10
