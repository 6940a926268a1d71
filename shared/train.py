"""Local training and evaluation of one shop's model over its cached tensors (no Flower here).

Each step draws one batch from every task's source rows (impressions, clicked positives, sales
rows), combines the task losses with the shop's loss weighting and takes one optimiser step.
An epoch is as many steps as the largest source needs; smaller sources cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.features import ShopTensors
from shared.model import ShopModel
from shared.tasks import TaskHead, heads_for
from shared.weighting import task_conflict


@dataclass
class TrainConfig:
    """Local optimisation settings (one round of local work in federation)."""

    epochs: int = 1  # passes over the largest task source
    batch_size: int = 512  # rows per task per step
    lr: float = 3e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    prox_mu: float = 0.0  # FedProx proximal term on the encoder (needs global_encoder)
    freeze_encoder: bool = False  # warm-up / feature transfer: train only the local part
    max_steps: int = 0  # cap on optimiser steps per call (0 = no cap): Reptile-style short inner loops
    seed: int = 0  # batches, negatives and dropout


def _sources(tensors: ShopTensors, heads: list[TaskHead]) -> dict[str, Mapping[str, torch.Tensor]]:
    rows = tensors.rows["train"]
    out: dict[str, Mapping[str, torch.Tensor]] = {}
    for head in heads:
        if head.source == "impressions":
            out["impressions"] = rows
        elif head.source == "positives":
            pos = rows["clicked"] == 1
            out["positives"] = {k: v[pos] for k, v in rows.items()}
        elif head.source == "sales" and tensors.sales is not None:
            out["sales"] = tensors.sales["train"]
    return {k: v for k, v in out.items() if next(iter(v.values())).shape[0] > 0}


class _Cycler:
    """Endless shuffled minibatch indices over n rows."""

    def __init__(self, n: int, batch: int, gen: torch.Generator) -> None:
        self.n, self.batch, self.gen = n, batch, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos: self.pos + self.batch]
        self.pos += self.batch
        return idx


def shared_layer_params(model: ShopModel) -> list[torch.nn.Parameter]:
    """The encoder parameters GradNorm balances and task conflict is measured on (experts' last layers)."""
    return [p for e in model.encoder.experts for p in e[-1].parameters() if p.requires_grad]


def train_shop(model: ShopModel, tensors: ShopTensors, cfg: TrainConfig, *,
               global_encoder: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train the shop's model in place on its training rows; returns mean losses and num-examples."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    heads = heads_for([t for t in tensors.tasks if t in model.local.tasks])
    sources = _sources(tensors, heads)
    heads = [h for h in heads if h.source in sources]
    if not heads:
        return {"num-examples": 0.0, "loss": 0.0}
    for p in model.encoder.parameters():
        p.requires_grad_(not cfg.freeze_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    prox = None
    if cfg.prox_mu > 0 and global_encoder is not None and not cfg.freeze_encoder:
        prox = [(p, torch.as_tensor(global_encoder[k]).detach()) for k, p in model.encoder.named_parameters()]
    sizes = {s: next(iter(r.values())).shape[0] for s, r in sources.items()}
    cyclers = {s: _Cycler(n, cfg.batch_size, gen) for s, n in sizes.items()}
    steps = cfg.epochs * max(math.ceil(n / cfg.batch_size) for n in sizes.values())
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    shared = shared_layer_params(model) or [model.local.user_ids.weight]
    totals: dict[str, float] = {}
    model.train()
    steps_per_epoch = max(1, steps // max(cfg.epochs, 1))
    for step in range(steps):
        picks = {s: c.next() for s, c in cyclers.items()}
        batches = {s: {k: v[picks[s]] for k, v in r.items()} for s, r in sources.items()}
        item_table = model.all_items()
        opt.zero_grad(set_to_none=True)  # before the forward: weightings may attach gradients in combine()
        cache: dict = {"catalog": tensors.catalog, "generator": gen}
        losses: dict[str, torch.Tensor] = {}
        for head in heads:
            losses[head.name] = head.loss(model, batches[head.source], item_table, cache)
        total = model.local.weighting.combine(losses, shared)
        if prox is not None:
            total = total + cfg.prox_mu / 2 * sum(((p - g) ** 2).sum() for p, g in prox)
        total.backward()
        opt.step()
        model.local.weighting.after_step()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        totals["_total"] = totals.get("_total", 0.0) + float(total.detach())
        if (step + 1) % steps_per_epoch == 0:
            model.local.weighting.end_epoch({k: v / (step + 1) for k, v in totals.items() if k != "_total"})
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    out = {f"loss-{k}": v / steps for k, v in totals.items() if k != "_total"}
    out["loss"] = totals["_total"] / steps
    out["num-examples"] = float(sum(sizes.values()))
    return out


@torch.no_grad()
def evaluate_shop(model: ShopModel, tensors: ShopTensors, split: str = "test") -> dict[str, dict[str, float]]:
    """Every task's metrics on a split: task -> metric -> value (tasks without rows are left out)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test; got {split!r}")
    model.eval()
    item_table = model.all_items()
    out = {}
    for head in heads_for([t for t in tensors.tasks if t in model.local.tasks]):
        metrics = head.evaluate(model, tensors, split, item_table)
        if metrics:
            out[head.name] = metrics
    model.train()
    return out


def measure_task_conflict(model: ShopModel, tensors: ShopTensors, batch_size: int = 1024,
                          seed: int = 0) -> dict[str, float]:
    """Cosine between task gradients on the shared layers, on one training batch per source."""
    gen = torch.Generator().manual_seed(seed)
    heads = heads_for([t for t in tensors.tasks if t in model.local.tasks])
    sources = _sources(tensors, heads)
    batches = {s: {k: v[torch.randperm(next(iter(r.values())).shape[0], generator=gen)[:batch_size]]
                   for k, v in r.items()} for s, r in sources.items()}
    item_table = model.all_items()
    cache: dict = {"catalog": tensors.catalog, "generator": gen}
    losses = {h.name: h.loss(model, batches[h.source], item_table, cache) for h in heads if h.source in batches}
    return task_conflict(losses, shared_layer_params(model))
