"""Reptile-style meta-training objective for the federation (``objective = "meta"``).

Each shop is one meta-learning task. In a round a shop receives the encoder θ, runs a few inner
optimiser steps on support minibatches drawn from its own training rows (its local part trains with
it and stays home) and ends at φ. Its Reptile direction is φ − θ. The coordinator averages the
replies and takes an outer step of size ε along the mean direction:

    θ ← θ + ε · Σ_i w_i (φ_i − θ),   w_i = num-examples_i / Σ num-examples

That is plain FedAvg of φ_i followed by a server step, which Flower's ``FedAvgM(server_learning_rate=ε,
server_momentum=0.0)`` computes exactly (its pseudo-gradient is θ − avg φ). With a plain ``FedAvg``
strategy the same step is obtained by the shop sending θ + ε(φ − θ) instead (``outer_step=ε`` below).
Short inner loops are the point: the encoder is pushed towards weights from which *a few* steps fit
any shop, which is what a newly joining shop with little data needs (Nichol et al. 2018, "On
First-Order Meta-Learning Algorithms").
"""

from __future__ import annotations

from dataclasses import replace

import torch

from shared.features import ShopTensors
from shared.model import ShopModel
from shared.train import TrainConfig, train_shop

DEFAULT_INNER_STEPS = 20  # matches the scenario default federation.meta_inner_steps


def reptile_direction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """φ − θ per encoder array (floating arrays only; integer buffers carry no direction)."""
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise ValueError(f"encoder states differ in keys {missing[:3]}; both must come from the same encoder")
    return {k: after[k] - before[k] for k in before if before[k].is_floating_point()}


def meta_train_shop(model: ShopModel, tensors: ShopTensors, cfg: TrainConfig, inner_steps: int = DEFAULT_INNER_STEPS,
                    *, outer_step: float = 1.0) -> dict[str, float]:
    """One shop's Reptile inner loop; leaves in ``model.encoder`` the weights the shop should send.

    ``inner_steps`` optimiser steps (one support minibatch per task source each, ``cfg.batch_size``
    rows) move the encoder from θ to φ. With ``outer_step = 1`` (server applies ε, e.g. FedAvgM) the
    encoder is left at φ; otherwise at θ + outer_step · (φ − θ) for a plain-FedAvg server.
    Returns the same keys as `train_shop` (losses and num-examples), so the reply is unchanged.
    """
    if inner_steps < 1:
        raise ValueError(f"meta inner_steps must be >= 1, got {inner_steps}. Fix: set federation.meta_inner_steps")
    if not 0 < outer_step <= 1:
        raise ValueError(f"meta outer_step must be in (0, 1], got {outer_step}")
    if cfg.freeze_encoder:  # warm-up round of a joining shop: nothing to meta-learn, train the local part
        return train_shop(model, tensors, cfg)
    theta = model.encoder_state()
    # epochs is set high so that max_steps, not the data size, fixes the inner-loop length.
    inner = replace(cfg, epochs=max(cfg.epochs, inner_steps), max_steps=inner_steps)
    metrics = train_shop(model, tensors, inner)
    if outer_step != 1.0:
        phi = model.encoder_state()
        step = reptile_direction(theta, phi)
        model.load_encoder_state({k: theta[k] + outer_step * step[k] if k in step else phi[k] for k in phi})
    return metrics
