"""Local training and evaluation of one shop's model over its cached tensors (no Flower here).

Each step draws one batch from every task's source rows (impressions, clicked positives, sales
rows), combines the task losses with the shop's loss weighting and takes one optimiser step.
An epoch is as many steps as the largest source needs; smaller sources cycle.

The large hashed embedding tables of the encoder (`ShopModel.row_sparse_tables`) are trained with
row-sparse gradients and lazy Adam (`shared.lazy_adam.LazyAdam`) by default: a step reads and writes only
the rows its batch touched, instead of a dense Adam pass over ~1.6M parameters of which an epoch uses
about 1%. `TrainConfig.sparse_embeddings = False` restores dense Adam on every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from shared.features import ShopTensors
from shared.lazy_adam import DenseAdam, LazyAdam
from shared.model import Pack, ShopModel
from shared.protocol import LOSS, NUM_EXAMPLES, task_loss_key
from shared.tasks import StepCache, TaskHead, heads_for
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
    sparse_embeddings: bool = True  # lazy (row-sparse) Adam on the large hashed tables; False = dense Adam


POSITIVE_COLUMNS = ("user", "item", "hist")  # what `RankingTask.loss` and the shared user pass read of a positive


def _sources(tensors: ShopTensors, heads: list[TaskHead]) -> dict[str, Mapping[str, torch.Tensor]]:
    rows = tensors.rows["train"]
    out: dict[str, Mapping[str, torch.Tensor]] = {}
    for head in heads:
        if head.source == "impressions":
            out["impressions"] = rows
        elif head.source == "positives":
            pos = rows["clicked"] == 1
            # Only the columns ranking reads (users, histories, clicked items): each column is a gather a step.
            out["positives"] = {k: rows[k][pos] for k in POSITIVE_COLUMNS}
        elif head.source == "sales" and tensors.sales is not None:
            out["sales"] = tensors.sales["train"]
    return {k: v for k, v in out.items() if next(iter(v.values())).shape[0] > 0}


class _Batches:
    """Endless shuffled minibatches of one source's rows.

    The rows are permuted once per pass and each batch gathers its slice of the permutation from every
    column: the same batches as slicing a permuted copy of the rows, without copying every column of the
    whole source at each pass (for 40k impressions with a 20-item history, a ~25 ms copy every 80 steps,
    more than the batches' own gathers).
    """

    def __init__(self, rows: Mapping[str, torch.Tensor], batch: int, gen: torch.Generator) -> None:
        self.rows, self.batch, self.gen = rows, batch, gen
        self.n = next(iter(rows.values())).shape[0]
        self._shuffle()

    def _shuffle(self) -> None:
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def next(self) -> dict[str, torch.Tensor]:
        if self.pos >= self.n:
            self._shuffle()
        idx = self.perm[self.pos: self.pos + self.batch]
        self.pos += self.batch
        return {k: v.index_select(0, idx) for k, v in self.rows.items()}


def shared_layer_params(model: ShopModel, packs: list[Pack] | None = None) -> list[torch.Tensor]:
    """The encoder parameters GradNorm balances and task conflict is measured on (experts' last layers); with
    ``packs`` (`ShopModel.packed_parameters`), the leaves that hold them (the same elements, packed)."""
    last = [p for e in model.encoder.experts for p in e[-1].parameters() if p.requires_grad]
    if packs:
        held = {id(p) for p in last}
        return [pk.leaf for pk in packs if any(id(p) in held for p in pk.params) and pk.leaf.requires_grad]
    return last


@contextmanager
def row_sparse_gradients(tables: list[nn.Embedding]) -> Iterator[None]:
    """Within the block the tables produce sparse (touched-rows-only) gradients; restored on exit.

    A training-time switch, not a model property: DP-SGD (Opacus needs dense per-unit gradients),
    GradNorm and task-conflict measurement keep seeing ordinary dense embeddings.
    """
    before = [t.sparse for t in tables]
    for t in tables:
        t.sparse = True
    try:
        yield
    finally:
        for t, was in zip(tables, before, strict=True):
            t.sparse = was
            t.weight.grad = None  # a leftover sparse grad would surprise a later dense backward


def train_shop(model: ShopModel, tensors: ShopTensors, cfg: TrainConfig, *,
               global_encoder: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train the shop's model in place on its training rows; returns mean losses and num-examples.

    Optimiser state is fresh on every call (one call = one round of local work). With
    ``cfg.sparse_embeddings`` the large hashed tables take lazy Adam steps on the rows each batch
    touched (weight decay and the FedProx pull too); every other parameter takes dense Adam steps.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    heads = heads_for([t for t in tensors.tasks if t in model.local.tasks])
    sources = _sources(tensors, heads)
    heads = [h for h in heads if h.source in sources]
    if not heads:
        return {NUM_EXAMPLES: 0.0, LOSS: 0.0}
    for p in model.encoder.parameters():
        p.requires_grad_(not cfg.freeze_encoder)
    tables = model.row_sparse_tables() if cfg.sparse_embeddings and not cfg.freeze_encoder else []
    try:
        # The fast path also reads the experts, CTR/CVR gates and towers from packed leaves (`packed_parameters`);
        # the dense path (sparse_embeddings False) stays the reference, parameter by parameter.
        with row_sparse_gradients(tables), (model.packed_parameters(encoder=not cfg.freeze_encoder)
                                            if cfg.sparse_embeddings else nullcontext([])) as packs:
            return _train_steps(model, tensors, cfg, gen, heads, sources, tables, global_encoder, packs)
    finally:
        for p in model.encoder.parameters():
            p.requires_grad_(True)


def _train_steps(model: ShopModel, tensors: ShopTensors, cfg: TrainConfig, gen: torch.Generator,
                 heads: list[TaskHead], sources: dict[str, Mapping[str, torch.Tensor]], tables: list[nn.Embedding],
                 global_encoder: Mapping[str, torch.Tensor] | None, packs: list[Pack]) -> dict[str, float]:
    sparse = [t.weight for t in tables]
    is_sparse = {id(p) for p in sparse}
    packed = {id(p) for pk in packs for p in pk.params}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in is_sparse and id(p) not in packed]
    dense += [pk.leaf for pk in packs if pk.leaf.requires_grad]
    # The fast path also takes Adam's fused kernel (same update, one pass over all tensors) through DenseAdam
    # (Adam(fused=True)'s updates without its per-parameter step-tensor overhead); the dense path
    # (cfg.sparse_embeddings False) keeps the previous optimiser exactly, as the reference.
    optimisers: list[torch.optim.Optimizer] = [
        DenseAdam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.sparse_embeddings
        else torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    prox, anchors = None, {}
    if cfg.prox_mu > 0 and global_encoder is not None and not cfg.freeze_encoder:
        named = {k: (p, torch.as_tensor(global_encoder[k]).detach()) for k, p in model.encoder.named_parameters()}
        prox = [pg for pg in named.values() if id(pg[0]) not in is_sparse and id(pg[0]) not in packed]
        anchor_of = {id(p): g for p, g in named.values()}
        prox += [(pk.leaf, pk.of([anchor_of[id(p)] for p in pk.params])) for pk in packs
                 if all(id(p) in anchor_of for p in pk.params)]  # the experts' leaves and their anchors, packed
        anchors = {p: g.to(p.dtype) for p, g in named.values() if id(p) in is_sparse}  # e.g. float64 replies
    if sparse:  # Adam's default betas and eps, as the dense optimiser
        optimisers.append(LazyAdam(sparse, lr=cfg.lr, weight_decay=cfg.weight_decay, prox_mu=cfg.prox_mu,
                                   anchors=anchors))
    sizes = {s: next(iter(r.values())).shape[0] for s, r in sources.items()}
    cyclers = {s: _Batches(r, cfg.batch_size, gen) for s, r in sources.items()}
    steps = cfg.epochs * max(math.ceil(n / cfg.batch_size) for n in sizes.values())
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    shared = shared_layer_params(model, packs) or [model.local.user_ids.weight]
    totals: dict[str, float] = {}
    model.train()
    steps_per_epoch = max(1, steps // max(cfg.epochs, 1))
    names = [h.name for h in heads]
    rank_shared = "ranking" in names and bool({"ctr", "cvr"} & set(names)) and "positives" in sources
    # The optimisers' parameters, for `zero_grad(set_to_none=True)` as one loop (Optimizer.zero_grad's
    # profiling hooks and per-group bookkeeping cost ~0.1 ms a step for the same effect).
    optimised = [p for opt in optimisers for group in opt.param_groups for p in group["params"]]
    # An impression head first: it builds the step's item table in its pass (one lookup of the field table for
    # the catalog's and the rows' fields, see ShopModel.training_impressions); the other heads take it from the cache.
    deferred = heads[0].source == "impressions"
    for step in range(steps):
        batches = {s: c.next() for s, c in cyclers.items()}
        item_table = None if deferred else model.all_items()
        for p in optimised:  # before the forward: weightings may attach gradients in combine()
            p.grad = None
        # rank_shared: the impression heads' forward also computes the ranking rows' users (one user pass)
        cache = StepCache(tensors.catalog, gen, batches["positives"] if rank_shared else None,
                          sales=batches.get("sales") if deferred else None)
        losses: dict[str, torch.Tensor] = {}
        with model.encoder.packing_once():  # impression and sales rows' mixtures share the packed expert weights
            for head in heads:
                losses[head.name] = head.loss(model, batches[head.source], item_table, cache)
        total = model.local.weighting.combine(losses, shared)
        if prox is not None:
            total = total + cfg.prox_mu / 2 * sum(((p - g) ** 2).sum() for p, g in prox)
        total.backward()
        if anchors:  # the sparse tables' share of the proximal term: in the reported loss, its gradient below
            with torch.no_grad():
                total = total + cfg.prox_mu / 2 * sum(((p - g) ** 2).sum() for p, g in anchors.items())
        for opt in optimisers:
            opt.step()
        model.local.weighting.after_step()
        for name, value in losses.items():  # item(), not float(value.detach()): the same number, one op fewer
            totals[name] = totals.get(name, 0.0) + value.item()
        totals["_total"] = totals.get("_total", 0.0) + total.item()
        if (step + 1) % steps_per_epoch == 0:
            model.local.weighting.end_epoch({k: v / (step + 1) for k, v in totals.items() if k != "_total"})
    out = {task_loss_key(k): v / steps for k, v in totals.items() if k != "_total"}
    out[LOSS] = totals["_total"] / steps
    out[NUM_EXAMPLES] = float(sum(sizes.values()))
    return out


@torch.no_grad()
def evaluate_shop(model: ShopModel, tensors: ShopTensors, split: str = "test",
                  tasks: Collection[str] | None = None) -> dict[str, dict[str, float]]:
    """Every task's (or only ``tasks``') metrics on a split: task -> metric -> value (tasks without rows left out).

    Each task's metrics are the same whichever other tasks are evaluated with it.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test; got {split!r}")
    wanted = [t for t in tensors.tasks if t in model.local.tasks and (tasks is None or t in tasks)]
    if not wanted:
        return {}
    model.eval()
    item_table = model.all_items()
    out = {}
    for head in heads_for(wanted):
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
    cache = StepCache(tensors.catalog, gen)
    losses = {h.name: h.loss(model, batches[h.source], item_table, cache) for h in heads if h.source in batches}
    return task_conflict(losses, shared_layer_params(model))
