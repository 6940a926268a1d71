"""Sizes and scenario overrides of the privacy evaluation (small models: it trains many)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w

from shared.atomic import atomic_write_text
from shared.scenario import load_scenario


@dataclass
class PrivacyEvalConfig:
    """Sizes of the privacy evaluation; `small()` is what the tests use."""

    n_property_shops: int = 60  # target shops of property inference (>= 50 for the report)
    n_shadow_shops: int = 120  # shadow shops (another synthetic world) the meta-classifier learns from
    property_steps: int = 10  # cap on local steps per shop update (one local epoch of these shops is 3-5 steps)
    mia_users: int = 0  # users of the attacked shop used (0 = all); split into members/non-members/reference
    overfit_epochs: int = 30  # positive control: many epochs, no regularisation
    normal_epochs: int = 1
    reference_models: int = 2  # offline LiRA reference (OUT) models
    dpsgd_noise: float = 1.0  # user-level DP-SGD on the attacked shop
    dpsgd_sample_rate: float = 0.05
    dpsgd_rounds: int = 10  # DP-SGD rounds; each ceil(1/q) steps
    central_noise: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0, 2.0)  # central DP noise multipliers (0 = no DP)
    clipping_norm: float = 1.0
    delta: float = 1e-5
    rounds: int = 10  # federated rounds per privacy-utility point
    utility_steps: int = 50  # cap on local steps per shop and round in the privacy-utility runs
    utility_shops: int = 8  # shops of the default world in the privacy-utility runs
    secagg: bool = True  # also measure the SecAgg+ rows
    seed: int = 0

    @classmethod
    def small(cls) -> PrivacyEvalConfig:
        """A few seconds' worth: for tests and smoke runs."""
        return cls(n_property_shops=30, n_shadow_shops=60, mia_users=150, overfit_epochs=15,
                   reference_models=1, dpsgd_rounds=2, central_noise=(0.0, 1.0), rounds=1, utility_steps=20)


# Small model and hash spaces: privacy evaluations train many models; the attacks need no big ones.
EVAL_OVERRIDES = {"features.hash_buckets": 2048, "features.product_buckets": 4096, "model.embed_dim": 8,
                  "model.expert_dim": 16, "model.tower_dim": 8, "model.n_experts": 2}


def eval_overrides(scenario_name: str) -> dict:
    """The small evaluation model, no personal mix, and for a synthetic world no evaluation top-up.

    The top-up only sharpens utility metrics; the attacks and their documented numbers use the
    world as generated, and it would slow every attack's training and scoring.
    """
    synthetic = load_scenario(scenario_name).data.get("source") == "synthetic"
    # The SecAgg+ client trains from the global encoder alone, so utility rows compare like with like
    # only without the personal mix.
    plain = {**EVAL_OVERRIDES, "federation.personal_mix": 0.0}
    return {**plain, "data.synthetic.eval_impressions": 0} if synthetic else plain


def property_world_overrides(n_shops: int, seed: int | None = None) -> dict:
    """Many small synthetic shops of similar size (the property, not the size, should drive updates)."""
    world = {} if seed is None else {"seed": seed}
    return {**EVAL_OVERRIDES, **world, "data.source": "synthetic", "data.synthetic.n_shops": n_shops,
            "data.synthetic.n_late_joiners": 0, "data.synthetic.n_small_shops": 0,
            "data.synthetic.max_impressions": 3000, "data.synthetic.min_impressions": 1500,
            "data.synthetic.days": 30, "data.synthetic.eval_impressions": 0, "federation.personal_mix": 0.0}


def write_eval_scenario(name: str, overrides: dict, path: Path) -> Path:
    """Resolve a scenario with overrides and save it as TOML, so Flower clients load the same shops by path."""
    scenario = load_scenario(name, overrides)
    atomic_write_text(path, tomli_w.dumps(scenario.raw))
    return path
