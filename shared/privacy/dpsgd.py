"""DP-SGD inside a shop with Opacus, at user level (default) or record level.

Unit of privacy:
* ``user``: all of a user's examples are one unit. Each step Poisson-samples *users* with rate q,
  takes each sampled user's gradient of the loss on all of their rows, and Opacus' DPOptimizer
  clips each user's gradient to S and adds N(0, (zS)^2) noise. Opacus' data loader samples
  records (record-level only) and its GradSampleModule treats every tensor row as a sample,
  which is wrong for ShopModel (its item tower runs over the whole catalog, not per row); so
  per-unit gradients are taken as micro-batches of one unit each.
* ``record``: every example is its own unit (Poisson-sampled examples).

The accountant is Opacus' RDP accountant, named explicitly (`ShopAccountant`); the caller keeps
its JSON state in the shop's local state so epsilon keeps adding up across rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from shared.features import ShopTensors
from shared.model import ShopModel
from shared.privacy.accounting import PrivacyReport, ShopAccountant
from shared.protocol import LOSS, NUM_EXAMPLES

UnitLossFn = Callable[[nn.Module, np.ndarray], torch.Tensor]  # (model, one unit's row indices) -> scalar loss
_CHUNK = 16  # units whose dense per-unit gradients are held at once (memory bound)


class PrivacyBudgetExceeded(RuntimeError):
    """The next DP-SGD round would push the shop past its epsilon budget; nothing was trained."""


@dataclass
class DPSGDConfig:
    """DP-SGD settings for one shop; keyword names follow Opacus (z, S, q)."""

    noise_multiplier: float = 1.0   # z: Gaussian noise std in units of the clipping norm
    max_grad_norm: float = 1.0      # S: per-unit L2 clipping bound
    unit: str = "user"              # user (all of a user's examples) | record (one example)
    sample_rate: float = 0.05       # q: Poisson sampling rate of units per step
    steps_per_round: int = 0        # 0 = one expected pass over the units (ceil(1/q) steps)
    lr: float = 1e-2
    delta: float = 1e-5             # reported epsilon is at this delta (pick < 1/units)
    max_epsilon: float | None = None  # refuse a round that would exceed this
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unit not in ("user", "record"):
            raise ValueError(f"DPSGDConfig.unit must be 'user' or 'record', got '{self.unit}'")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"DPSGDConfig.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier <= 0 or self.max_grad_norm <= 0:
            raise ValueError("DPSGDConfig.noise_multiplier and max_grad_norm must be > 0")

    def steps(self) -> int:
        """Steps per round."""
        return self.steps_per_round or int(np.ceil(1.0 / self.sample_rate))


def check_model(model: nn.Module) -> None:
    """Fail with the offending layers if Opacus cannot compute per-example gradients for ``model``."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-SGD compatible ({len(errors)} problem(s)): {errors[:3]}. "
                         "Fix: opacus.validators.ModuleValidator.fix(model) or swap the layers named")


def train_dpsgd(model: nn.Module, *, unit_of_row: np.ndarray, unit_loss: UnitLossFn, cfg: DPSGDConfig,
                accountant: ShopAccountant) -> dict[str, float]:
    """Run one round of DP-SGD on ``model`` in place and compose it into ``accountant``.

    ``unit_of_row[i]`` is the user (any label) owning training row i; with ``unit='record'`` every
    row is its own unit. ``unit_loss(model, rows)`` is the loss of one unit's rows. Returns the
    mean unit loss and the privacy report fields (epsilon after this round).
    """
    n_rows = len(unit_of_row)
    if n_rows == 0:
        raise ValueError("DP-SGD got a shop with no training rows")
    if cfg.unit == "user":
        _, row_unit = np.unique(np.asarray(unit_of_row), return_inverse=True)
    else:
        row_unit = np.arange(n_rows)
    n_units = int(row_unit.max()) + 1
    rows_of_unit = np.split(np.argsort(row_unit, kind="stable"), np.cumsum(np.bincount(row_unit))[:-1])
    steps = cfg.steps()

    if cfg.max_epsilon is not None:
        projected = ShopAccountant.from_json(accountant.to_json())
        projected.step(noise_multiplier=cfg.noise_multiplier, sample_rate=cfg.sample_rate, steps=steps)
        if projected.epsilon(cfg.delta) > cfg.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"DP-SGD round refused: epsilon would reach {projected.epsilon(cfg.delta):.3f} > max-epsilon "
                f"{cfg.max_epsilon} (spent so far {accountant.epsilon(cfg.delta):.3f} at delta={cfg.delta})")

    check_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.Adam(params, lr=cfg.lr), noise_multiplier=cfg.noise_multiplier,
                            max_grad_norm=cfg.max_grad_norm,
                            expected_batch_size=max(1, round(cfg.sample_rate * n_units)),
                            loss_reduction="mean", generator=torch.Generator().manual_seed(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        sampled = np.flatnonzero(rng.random(n_units) < cfg.sample_rate)
        chunks = [sampled[i:i + _CHUNK] for i in range(0, len(sampled), _CHUNK)] or [sampled]
        for k, chunk in enumerate(chunks):
            per_unit = []
            for u in chunk:
                loss = unit_loss(model, rows_of_unit[u])
                per_unit.append(torch.autograd.grad(loss, params, allow_unused=True))
                total, seen = total + float(loss.detach()), seen + 1
            for j, p in enumerate(params):
                # A unit that never touched p has a zero gradient; an empty Poisson sample is one zero unit.
                p.grad_sample = (torch.stack([g[j] if g[j] is not None else torch.zeros_like(p) for g in per_unit])
                                 if per_unit else torch.zeros((1, *p.shape), dtype=p.dtype))
            if k < len(chunks) - 1:
                optimizer.clip_and_accumulate()  # Opacus sums clipped chunks into p.summed_grad
            else:
                optimizer.step()  # clip the last chunk, add N(0, (zS)^2), divide by q*N, step
    optimizer.zero_grad(set_to_none=True)
    accountant.step(noise_multiplier=cfg.noise_multiplier, sample_rate=cfg.sample_rate, steps=steps)
    report = privacy_report(accountant, cfg)
    return {LOSS: total / max(seen, 1), NUM_EXAMPLES: float(n_rows), "dp-units": float(n_units),
            **{f"dp-{k}": v for k, v in report.as_dict().items() if isinstance(v, (int, float))}}


def privacy_report(accountant: ShopAccountant, cfg: DPSGDConfig) -> PrivacyReport:
    """The (epsilon, delta, unit, q, z, S, steps) record of a shop's DP-SGD so far."""
    return PrivacyReport(epsilon=accountant.epsilon(cfg.delta), delta=cfg.delta, unit=cfg.unit,
                         sample_rate=cfg.sample_rate, noise_multiplier=cfg.noise_multiplier,
                         clipping_norm=cfg.max_grad_norm, steps=accountant.steps)


# ----------------------------------------------------------------------------- ShopModel adapter
def impression_row_loss(model: ShopModel, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row loss of the impression tasks (CTR BCE, plus CVR BCE on clicked rows): (n,)."""
    item_table = model.all_items()
    logits = model.impression_logits(rows, item_table)
    loss = torch.zeros(rows["user"].shape[0])
    if "ctr" in logits:
        loss = loss + F.binary_cross_entropy_with_logits(logits["ctr"], rows["clicked"], reduction="none")
    if "cvr" in logits:
        cvr = F.binary_cross_entropy_with_logits(logits["cvr"], rows["purchased"], reduction="none")
        loss = loss + cvr * rows["clicked"]
    return loss


def train_dpsgd_shop(model: ShopModel, tensors: ShopTensors, dp: DPSGDConfig, rounds: int = 1,
                     accountant_state: str | None = None) -> ShopAccountant:
    """``rounds`` rounds of DP-SGD on a shop's impression tasks (CTR, CVR) at ``dp.unit`` level.

    ``accountant_state`` is the JSON the shop kept from earlier rounds (None = first round); save
    the returned accountant's ``to_json()`` back into the shop's local state.
    """
    rows = tensors.rows["train"]

    def unit_loss(m: nn.Module, idx: np.ndarray) -> torch.Tensor:
        batch = {k: v[torch.as_tensor(idx)] for k, v in rows.items()}
        return impression_row_loss(m, batch).sum()

    acc = ShopAccountant.from_json(accountant_state)
    for r in range(rounds):
        state = acc.to_json()  # what the shop keeps in its local state between rounds
        acc = ShopAccountant.from_json(state)
        train_dpsgd(model, unit_of_row=rows["user"].numpy(), unit_loss=unit_loss,
                    cfg=replace(dp, seed=dp.seed + r), accountant=acc)
    return acc


