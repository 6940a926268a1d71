"""User-level membership inference on one shop: overfit (positive control), normal and DP-SGD training."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from shared.features import ShopTensors, build_shop_tensors
from shared.model import ShopModel, build_model
from shared.privacy.attacks import (
    dp_violations,
    evaluate_attack,
    loss_threshold_scores,
    per_user_mean,
    reference_model_scores,
)
from shared.privacy.dpsgd import DPSGDConfig, impression_row_loss, privacy_report, train_dpsgd_shop
from shared.scenario import Scenario
from shared.schema import ShopData
from shared.train import train_shop
from simulations.privacy.eval_config import PrivacyEvalConfig


def restrict_users(tensors: ShopTensors, users: np.ndarray) -> ShopTensors:
    """The shop's tensors with training rows of ``users`` only (no sales rows: they pool every user)."""
    rows = tensors.rows["train"]
    mask = torch.isin(rows["user"], torch.as_tensor(users))
    return replace(tensors, rows={**tensors.rows, "train": {k: v[mask] for k, v in rows.items()}}, sales=None,
                   tasks=[t for t in tensors.tasks if t != "sales"])


@torch.no_grad()
def user_losses(model: ShopModel, tensors: ShopTensors, users: np.ndarray) -> np.ndarray:
    """Mean training-period loss of each user in ``users`` (members' seen rows, others' unseen rows)."""
    model.eval()
    rows = tensors.rows["train"]
    per_user = per_user_mean(impression_row_loss(model, rows).numpy(), rows["user"].numpy())
    model.train()
    return per_user.reindex(users).to_numpy()


def membership_inference(cfg: PrivacyEvalConfig, scenario: Scenario, shop: ShopData) -> dict[str, object]:
    """User-level MIA on one shop: overfit (positive control), normal training and user-level DP-SGD."""
    tensors = build_shop_tensors(shop, scenario.features)
    users = np.unique(tensors.rows["train"]["user"].numpy())
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(users)[: cfg.mia_users or len(users)]
    third = len(users) // 3
    members, nonmembers, population = users[:third], users[third:2 * third], users[2 * third:]
    targets = np.concatenate([members, nonmembers])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    member_t = restrict_users(tensors, members)

    dp = DPSGDConfig(noise_multiplier=cfg.dpsgd_noise, max_grad_norm=cfg.clipping_norm, unit="user",
                     sample_rate=cfg.dpsgd_sample_rate, lr=1e-2, delta=cfg.delta, seed=cfg.seed)

    def fit(mode: str, seed: int, data: ShopTensors) -> tuple[ShopModel, object]:
        """A model trained the way ``mode`` trains, and its DP-SGD accountant (None without DP-SGD)."""
        model = build_model(data, scenario.model, scenario.features, seed=seed)
        if mode == "dpsgd":
            return model, train_dpsgd_shop(model, data, replace(dp, seed=seed), cfg.dpsgd_rounds)
        epochs = cfg.overfit_epochs if mode == "overfit" else cfg.normal_epochs
        train_shop(model, data, replace(scenario.train, epochs=epochs, weight_decay=0.0, seed=seed))
        return model, None

    # LiRA's reference (OUT) models must be trained like the target, so each mode gets its own, on the
    # same reference halves; their seeds differ from the target's (cfg.seed) and follow --seed.
    halves = [restrict_users(tensors, rng.permutation(population)[: max(2, len(population) // 2)])
              for _ in range(cfg.reference_models)]
    results: dict[str, object] = {"shop": shop.name, "members": len(members), "nonmembers": len(nonmembers)}
    for mode in ("overfit", "normal", "dpsgd"):
        ref = np.stack([user_losses(fit(mode, cfg.seed + 1 + k, half)[0], tensors, targets)
                        for k, half in enumerate(halves)])
        model, acc = fit(mode, cfg.seed, member_t)
        if acc is not None:
            results["dpsgd_report"] = privacy_report(acc, dp).as_dict()
        loss = user_losses(model, tensors, targets)
        scores = {"loss-threshold": loss_threshold_scores(loss), "offline-LiRA": reference_model_scores(loss, ref)}
        for name, sc in scores.items():
            results[f"{mode}/{name}"] = evaluate_attack(name, sc, is_member, seed=cfg.seed)
        if mode == "dpsgd":
            eps = results["dpsgd_report"]["epsilon"]
            results["dp_violations"] = sum(len(dp_violations(sc, is_member, epsilon=eps, delta=cfg.delta))
                                           for sc in scores.values())
    return results
