"""Shops' individual encoder updates, as vectors, and clipped the way Flower's DP clipping does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from shared.features import ShopTensors, build_shop_tensors
from shared.model import ShopModel, build_model
from shared.scenario import Scenario
from shared.schema import ShopData
from shared.train import train_shop


def encoder_arrays(model: ShopModel) -> dict[str, np.ndarray]:
    """The encoder as numpy arrays (float64 for exact differences)."""
    return {k: v.numpy().astype(np.float64) for k, v in model.encoder_state().items()}


def shop_updates(scenario: Scenario, shops: list[ShopData], *, steps: int, seed: int, model_seed: int | None = None
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[ShopTensors]]:
    """Each shop's individual encoder update after one short local round from the same initial encoder.

    ``model_seed`` fixes that encoder (default: the scenario's seed); shadow shops use the targets'.
    """
    initial: dict[str, np.ndarray] | None = None
    updates, tensors = [], []
    for shop in shops:
        t = build_shop_tensors(shop, scenario.features)
        model = build_model(t, scenario.model, scenario.features,
                            seed=scenario.seed if model_seed is None else model_seed)
        before = encoder_arrays(model)
        initial = initial or before
        train_shop(model, t, replace(scenario.train, epochs=1, max_steps=steps, seed=seed))
        updates.append({k: v - before[k] for k, v in encoder_arrays(model).items()})
        tensors.append(t)
    assert initial is not None, "no shops"
    return initial, updates, tensors


def flat(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """One vector per update (keys in a fixed order)."""
    return np.concatenate([np.asarray(update[k]).ravel() for k in sorted(update)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `flat` for arrays shaped like ``like``."""
    out, pos = {}, 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = np.asarray(vector[pos:pos + n], np.float64).reshape(like[k].shape)
        pos += n
    return out


def clip_update(update: Mapping[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """Scale an update to L2 norm <= ``norm`` with Flower's own clipping (what `fixedclipping_mod` runs)."""
    arrays = {k: np.array(v, copy=True) for k, v in update.items()}  # copies: Flower clips in place
    if get_norm(list(arrays.values())) > 0:  # Flower divides by the norm
        clip_inputs_inplace(list(arrays.values()), norm)
    return arrays
