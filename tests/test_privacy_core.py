"""Flower-free privacy pieces: pinned accounting, DP-SGD, membership/property inference, ID leakage, audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from shared.privacy.accounting import ShopAccountant, opacus_epsilon, tpr_bound
from shared.privacy.attacks import (
    category_features,
    dp_violations,
    evaluate_attack,
    loss_threshold_scores,
    product_leakage,
    rank_auc,
    reference_model_scores,
    shadow_property_attack,
    user_id_leakage,
)
from shared.privacy.audit import AllowList, LeakBlocked, audit_payload
from shared.privacy.dpsgd import DPSGDConfig, PrivacyBudgetExceeded, train_dpsgd


def test_opacus_rdp_accountant_pinned() -> None:
    eps = opacus_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5)
    assert eps == pytest.approx(7.32911117143, abs=1e-6)


def test_accountant_state_survives_rounds() -> None:
    acc = ShopAccountant()
    for _ in range(3):  # three rounds, each restored from the JSON kept in the shop's state
        acc = ShopAccountant.from_json(acc.to_json())
        acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=750)
    assert acc.steps == 2250
    assert acc.epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-6)
    with pytest.raises(ValueError, match="expected 'rdp'"):
        ShopAccountant.from_json('{"accountant": "prv", "history": []}')


def test_tpr_bound() -> None:
    assert tpr_bound(0.01, epsilon=1.0, delta=1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert tpr_bound(0.5, epsilon=8.0, delta=1e-5) == 1.0


# ----------------------------------------------------------------------------- a toy user-level MIA world
D, ROWS_PER_USER = 16, 4


def _world(n_users: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Users with random features and random labels: nothing to learn, only to memorise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_users * ROWS_PER_USER, D, generator=g)
    y = torch.randint(0, 2, (n_users * ROWS_PER_USER,), generator=g).float()
    return x, y, np.repeat(np.arange(n_users), ROWS_PER_USER)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 1))


def _overfit(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 200) -> nn.Module:
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
        opt.step()
    return model


def _user_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, users: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none").numpy()
    return np.bincount(users, weights=loss) / np.bincount(users)


def test_positive_control_overfit_model_is_caught() -> None:
    x, y, users = _world(400, seed=1)
    member_user = np.arange(400) < 200
    rows_in = member_user[users]
    target = _overfit(x[rows_in], y[rows_in], seed=0)
    target_loss = _user_loss(target, x, y, users)
    # Reference models never see any target user: trained on a disjoint population.
    refs = []
    for k in range(3):
        px, py, _ = _world(200, seed=100 + k)
        refs.append(_user_loss(_overfit(px, py, seed=10 + k), x, y, users))
    for name, scores in (("loss", loss_threshold_scores(target_loss)),
                         ("lira", reference_model_scores(target_loss, np.stack(refs)))):
        res = evaluate_attack(name, scores, member_user, n_boot=50)
        assert res.auc >= 0.8, (name, res)
        assert res.auc_ci[0] <= res.auc <= res.auc_ci[1]
        assert res.n_members == res.n_nonmembers == 200


def test_user_level_dpsgd_defeats_mia_within_the_dp_bound() -> None:
    n = 1000
    x, y, users = _world(n, seed=2)
    member_user = np.arange(n) < n // 2
    rows_in = np.flatnonzero(member_user[users])
    model = _mlp(0)
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, unit="user", sample_rate=0.04, steps_per_round=25,
                      lr=1e-2, delta=1e-4)

    def unit_loss(m: nn.Module, rows: np.ndarray) -> torch.Tensor:
        r = torch.as_tensor(rows_in[rows])
        return nn.functional.binary_cross_entropy_with_logits(m(x[r]).squeeze(-1), y[r], reduction="sum")

    acc = ShopAccountant()
    for _ in range(4):  # rounds: the accountant keeps adding up
        out = train_dpsgd(model, unit_of_row=users[rows_in], unit_loss=unit_loss, cfg=cfg, accountant=acc)
    eps = acc.epsilon(cfg.delta)
    assert out["dp-epsilon"] == pytest.approx(eps)
    assert out["dp-units"] == n // 2 and acc.steps == 100
    assert 0 < eps <= 8.0
    scores = loss_threshold_scores(_user_loss(model, x, y, users))
    res = evaluate_attack("loss", scores, member_user, n_boot=50)
    assert res.auc <= 0.55
    assert dp_violations(scores, member_user, epsilon=eps, delta=cfg.delta) == []

    with pytest.raises(PrivacyBudgetExceeded, match="max-epsilon"):
        train_dpsgd(model, unit_of_row=users[rows_in], unit_loss=unit_loss,
                    cfg=DPSGDConfig(**{**cfg.__dict__, "max_epsilon": eps + 1e-3}), accountant=acc)
    assert acc.steps == 100  # a refused round spends nothing


def test_dp_violation_detector_flags_a_broken_claim() -> None:
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    scores = members * 3.0 + rng.normal(size=1000)  # a strong attack, incompatible with eps=0.1
    assert dp_violations(scores, members, epsilon=0.1, delta=1e-5)
    assert not dp_violations(rng.normal(size=1000), members, epsilon=0.1, delta=1e-5)


def test_dp_violation_detector_false_alarms_stay_within_its_confidence() -> None:
    # Scores that ignore membership satisfy even epsilon = 0; the whole-curve test may cry wolf in at
    # most 5% of attacks (measured: 0 of 200 with the correction, 6 of 200 without).
    rng = np.random.default_rng(1)
    members = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    alarms = sum(bool(dp_violations(rng.normal(size=200), members, epsilon=0.0, delta=1e-5)) for _ in range(200))
    assert alarms <= 10


def _toy_shops(n: int, rng: np.random.Generator, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4 candidates, 3 features): the dominant candidate's first feature is shifted by ``signal``."""
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 4, 3))
    x[np.arange(n), y, 0] += signal
    return x, y


def test_shadow_property_attack_reads_signal_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    sx, sy = _toy_shops(120, rng, 2.0)
    tx, ty = _toy_shops(60, rng, 2.0)
    res = shadow_property_attack(sx, sy, tx, ty, n_boot=100)
    assert res.auc > 0.8 and res.auc_ci[0] <= res.auc <= res.auc_ci[1] and res.auc_ci[0] > 0.7
    assert res.top1 > res.top1_chance and res.n_target == 60 and res.n_classes_scored == 4
    nx, ny = _toy_shops(120, rng, 0.0)
    mx, my = _toy_shops(60, rng, 0.0)
    noise = shadow_property_attack(nx, ny, mx, my, n_boot=100)
    assert noise.auc_ci[0] < 0.5 < noise.auc_ci[1]
    with pytest.raises(ValueError, match="candidates, features"):
        shadow_property_attack(sx[:, :3], sy, tx, ty)


def test_rank_auc_matches_sklearn_and_category_features_shape() -> None:
    rng = np.random.default_rng(1)
    truth, scores = rng.random(200) < 0.3, np.round(rng.normal(size=200), 1)  # rounded: ties
    assert rank_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    wide = np.zeros((50, 3))
    wide[[7, 9]] = [[-0.02, -0.01, 0.0], [-0.01, -0.01, -0.01]]  # two top rows; leaf 11 of top 0 moved
    wide[11] = 0.005
    f = category_features(wide, np.array([7, 9]), np.array([11, 12, 13]), np.array([0, 0, 1]))
    assert f.shape == (2, 18)
    assert f[0, 3] == pytest.approx(1.0) and f[1, 3] == pytest.approx(0.5)  # |row| relative to the largest
    assert f[0, 15] == pytest.approx(0.5) and f[1, 15] == 0.0  # share of a top's leaves that moved


def test_user_ids_found_only_when_sent() -> None:
    ids = ["shopA-user-0001", "shopA-user-0002", "7"]
    clean = [{"encoder.w": np.ones(4, np.float32), "num-examples": 12}]
    assert user_id_leakage(clean, ids) == 0.0
    leaky = clean + [{"note": "shopA-user-0002 bought", "7": 1}]
    assert user_id_leakage(leaky, ids) == pytest.approx(2 / 3)


def test_product_leakage_individual_union_and_noise() -> None:
    rng = np.random.default_rng(0)
    before = rng.normal(size=(1000, 8))
    own, other = np.arange(1, 51), np.arange(51, 251)
    after_own = before.copy()
    after_own[own] += 0.1
    ind = product_leakage(before, after_own, own)
    assert ind["recall"] == 1.0 and ind["precision"] == 1.0
    union = after_own.copy()
    union[other] += 0.1
    sec = product_leakage(before, union, own)
    assert sec["recall"] == 1.0 and sec["precision"] == pytest.approx(50 / 250)
    noisy = after_own + rng.normal(scale=0.05, size=before.shape)
    dp = product_leakage(before, noisy, own)
    assert dp["precision"] < 0.06  # every row moved: the shop's rows are not attributable


def test_audit_blocks_leaks_without_naming_them() -> None:
    allow = AllowList.for_encoder(["encoder.fields.weight"])
    audit_payload(arrays={"arrays": {"encoder.fields.weight": 1}},
                  metrics={"metrics": {"num-examples": 3, "loss": 0.1}}, configs={}, allow=allow)
    with pytest.raises(LeakBlocked) as err:
        audit_payload(arrays={"arrays": {"encoder.fields.weight": 1, "local.user_ids.weight": 2}},
                      metrics={"metrics": {"num-examples": 3, "user-4711": 0.5}}, configs={}, allow=allow)
    text = str(err.value)
    assert "user_ids" not in text and "4711" not in text and "0.5" not in text
    assert "array record 'arrays'" in text and "metric record 'metrics'" in text


def test_dpsgd_on_a_shop_model_keeps_accounting_across_rounds() -> None:
    from shared.features import build_shop_tensors
    from shared.model import build_model
    from shared.privacy.dpsgd import train_dpsgd_shop
    from shared.scenario import load_scenario
    from simulations.privacy.eval_config import property_world_overrides

    scenario = load_scenario("default", property_world_overrides(2))
    tensors = build_shop_tensors(scenario.training_shops()[0], scenario.features)
    model = build_model(tensors, scenario.model, scenario.features, seed=0)
    before = {k: v.clone() for k, v in model.encoder_state().items()}
    cfg = DPSGDConfig(noise_multiplier=1.0, sample_rate=0.02, steps_per_round=3)
    acc = train_dpsgd_shop(model, tensors, cfg, rounds=1)
    acc = train_dpsgd_shop(model, tensors, cfg, rounds=1, accountant_state=acc.to_json())  # next round
    assert acc.steps == 6
    assert acc.epsilon(cfg.delta) == pytest.approx(opacus_epsilon(noise_multiplier=1.0, sample_rate=0.02, steps=6,
                                                                  delta=cfg.delta))
    after = model.encoder_state()
    # Noise reaches every encoder row, so the whole product table moves (no row is left untouched).
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_audit_accepts_task_metrics_but_no_other_dotted_key() -> None:
    # The SecAgg+ path's legacy replies carry metrics in records; a dotted key is not a metric by itself.
    allow = AllowList(array_keys=frozenset(), metric_patterns=("num_examples",))
    audit_payload(arrays={}, metrics={}, allow=allow,
                  configs={"config": {"val/ctr.auc": 0.7, "ranking.hr@10_s99": 0.5, "num_examples": 3}})
    for key in ("user.4711", "ctr.user_4711", "ranking.hr@10_user4711"):
        with pytest.raises(LeakBlocked):
            audit_payload(arrays={}, metrics={}, configs={"config": {key: 1.0}}, allow=allow)
