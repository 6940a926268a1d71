"""The shop model: a federated `SharedEncoder` and a private `LocalPart`, as two submodules.

The split is structural: `model.encoder` holds everything shops average (embeddings of shared
fields and the global product key, the user/item/context towers, the MMoE experts); `model.local`
holds everything that stays home (user and local item ID embeddings, per-task gates and towers,
the ranking projection, the numeric-context projection, the loss weighting). No key-prefix
matching decides what leaves a shop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shared.features import FeatureConfig, ShopTensors
from shared.weighting import make_weighting

GATED_TASKS = ("ctr", "cvr", "sales")
SALES_FEATURES = 13  # lag features (5) + weekday one-hot (7) + promo (1), see features._sales_rows
# Attribute of `ShopModel.all_items`'s whole-vocabulary table (shops with sales): the items' crosses (I, d).
ITEM_CROSSES = "fedshop_item_crosses"


@dataclass
class ModelConfig:
    """Sizes of the model; identical across the shops of one federation."""

    embed_dim: int = 32  # d: every embedding and tower output
    n_experts: int = 4  # MMoE experts in the encoder
    expert_dim: int = 64  # width of each expert's output
    tower_dim: int = 32  # hidden width of each local task tower
    dropout: float = 0.0  # dropout inside experts and towers
    id_dropout: float = 0.8  # training-time share of rows whose ID/product-key embeddings are zeroed, so
    # sparse IDs (a few impressions each) cannot memorise labels and side fields carry what generalises
    weighting: str = "uncertainty"  # multi-task loss weighting: fixed | uncertainty | gradnorm | dwa
    # CTR/CVR towers' starting output bias: "zero" (logit 0) or "base-rate" (the shop's training log-odds,
    # `prior_logits`). base-rate lifts short runs (3 rounds, late joiners' first rounds: round-1 CTR AUC ~0.68 instead
    # of ~0.48); zero scored better on the 10-round, 16-seed headline (ranking NDCG@10 +0.005, CTR within noise), so
    # it stays the default (docs/evaluation.md, "tower start").
    tower_prior: str = "zero"


def _mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for the Linear, ReLU, Sequential and Embedding layers the model is built from, without nn.Module's
    call machinery (~3 us a call, ~20 calls a training step); a module with forward hooks (e.g. an instrumenting
    library's) or of any other type is called as usual."""
    if m._forward_hooks or m._forward_pre_hooks:
        return m(x)
    kind = type(m)
    if kind is nn.Linear:
        return F.linear(x, m.weight, m.bias)
    if kind is nn.Sequential:
        for layer in m:
            x = _run(layer, x)
        return x
    if kind is nn.ReLU and not m.inplace:
        return torch.relu(x)
    if kind is nn.Embedding:
        return F.embedding(x, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
    return m(x)


def _alias_pack(params: Sequence[nn.Parameter], stack: bool) -> torch.Tensor:
    """One leaf tensor holding ``params`` side by side (stacked, or concatenated along dim 0), each parameter's data
    re-pointed to its part of it: an in-place update of the leaf (an optimiser step) is one of the parameters.

    Why: a forward pass that reads several parameters as one tensor otherwise concatenates them at every step,
    and the backward splits the gradient again and accumulates each part (~30 ops a step for the experts and the
    CTR/CVR towers). `_unpack` gives each parameter its own storage back.
    """
    packed = (torch.stack if stack else torch.cat)([p.detach() for p in params])
    packed.requires_grad_(all(p.requires_grad for p in params))
    for p, part in zip(params, packed.detach().unbind(0) if stack else packed.detach().split([len(p) for p in params]),
                       strict=True):
        p.data = part
    return packed


def _unpack(params: Sequence[nn.Parameter]) -> None:
    """Undo `_alias_pack`: each parameter gets a copy of its current values in its own storage."""
    for p in params:
        p.data = p.data.clone()


@dataclass
class Pack:
    """A leaf tensor that holds ``params`` during training (`ShopModel.packed_parameters`): stacked or concatenated."""

    leaf: torch.Tensor
    params: list[nn.Parameter]
    stack: bool

    def of(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (one per parameter, e.g. FedProx anchors) packed the same way as the parameters."""
        return (torch.stack if self.stack else torch.cat)(list(tensors))


def _lookup_parts(emb: nn.Embedding, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``emb``'s rows at each index tensor of ``parts`` ((..., d) each), from one lookup of the concatenated indices.

    One lookup gives a table one (row-sparse) gradient: autograd adds a table's several gradients with a
    row-by-row merge into a zero-filled buffer, which costs more than the lookups (a split's backward is one
    concatenation).
    """
    flat = F.embedding(torch.cat([p.reshape(-1) for p in parts]), emb.weight, sparse=emb.sparse)
    return [r.view(*p.shape, -1) for r, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)]


def _sparse_mean(table: torch.Tensor, idx: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Row-sparse `_mean_bag`: the same means, from a lookup of the non-zero indices only: (..., F) -> (..., d).

    For mostly padded lists (a behaviour history is ~95% padding): the valid indices go into one flat
    bag list with per-row offsets, so neither the forward nor the backward touches a padding slot;
    a row without any valid index is an empty bag, whose mean F.embedding_bag defines as zero.
    """
    flat = idx.reshape(-1, idx.shape[-1])
    valid = flat > 0
    counts = valid.sum(1)
    out = F.embedding_bag(flat[valid], table, counts.cumsum(0) - counts, mode="mean", sparse=sparse)
    return out.reshape(*idx.shape[:-1], table.shape[-1])


def _pool(emb: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """Mean of the embeddings of the non-padding fields: (..., F) -> (..., d).

    A plain lookup, masked and summed: for short, almost full field lists (item and user side fields) its
    row-sparse backward costs about half of F.embedding_bag's (which expands the bag gradient per index).
    """
    return _pool_terms(emb, idx)[0]


def _pool_terms(emb: nn.Embedding, idx: torch.Tensor, counts: FieldCounts | None = None,
                looked_up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_pool`'s mean (..., d) with the masked embeddings (..., F, d) and their sum (..., d) it came from.

    For callers that also need the fields' crosses (`SharedEncoder.item_terms`): one lookup serves both.
    ``counts``: `field_counts(idx)` when the caller keeps it (a fixed index table, e.g. the catalog's fields);
    ``looked_up``: ``emb``'s rows at ``idx`` when the caller looked them up (with other indices, in one lookup).
    """
    if looked_up is None:
        looked_up = F.embedding(idx, emb.weight, sparse=emb.sparse)
    return _mean_terms(looked_up, idx, counts)


@dataclass(frozen=True)
class FieldCounts:
    """The padding mask (..., F, 1) of an index table (None: no padding) and its rows' field counts (..., 1)."""

    mask: torch.Tensor | None
    count: torch.Tensor | float


def field_counts(idx: torch.Tensor, dtype: torch.dtype) -> FieldCounts:
    """`FieldCounts` of ``idx``: what `_mean_terms` derives from the indices each call (7 ops on a padded table)."""
    mask = _padding_mask(idx, dtype)
    return FieldCounts(mask, float(idx.shape[-1]) if mask is None else mask.sum(-2).clamp(min=1))


def _mean_terms(looked_up: torch.Tensor, idx: torch.Tensor, counts: FieldCounts | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_pool_terms` of rows already looked up (``looked_up`` = the table's rows at ``idx``, (..., F, d))."""
    if counts is not None:
        e = _masked(looked_up, counts.mask)
        total = e.sum(-2)
        return total / counts.count, e, total
    mask = _padding_mask(idx, looked_up.dtype)
    e = _masked(looked_up, mask)
    total = e.sum(-2)
    # Without padding every row counts F fields: dividing by the number itself is the same division as by a
    # tensor of it (one op fewer, no tensor built).
    return (total / idx.shape[-1] if mask is None else total / mask.sum(-2).clamp(min=1)), e, total


def _padding_mask(idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The (..., F, 1) mask of ``idx``'s non-padding fields, or None when none is padding.

    Multiplying looked-up rows by a mask of ones is the identity (values and gradient), and a batch of
    impression or user rows rarely has padding fields (the whole catalog does: item 0): then no product.
    """
    valid = idx > 0
    return None if bool(valid.all()) else valid.unsqueeze(-1).to(dtype)


def _masked(e: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return e if mask is None else e * mask


def _bi_interaction(e: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """NFM bi-interaction pooling of masked field embeddings (..., F, d) with their sum (..., d): (..., d).

    Squares as products: the same values as ``** 2`` (pow by 2 is x * x), and a cheaper backward
    (two products instead of pow's pow(x, 1), scale and product).
    """
    return 0.5 * (total * total - (e * e).sum(-2))


class ImpressionPass(NamedTuple):
    """What `ShopModel.training_impressions` returns: the step's first pass."""

    logits: dict[str, torch.Tensor]  # per impression task, (B,)
    ranking_users: torch.Tensor | None  # the ranking rows' users (`ShopModel.ranking_users`), if rows were given
    item_table: torch.Tensor  # the whole vocabulary's item vectors (`ShopModel.all_items`)
    sales_wide: torch.Tensor | None  # the sales rows' wide terms (B_s, n_gated_tasks), if rows were given


@cache
def _sales_cols(d: int) -> torch.Tensor:
    """Columns of the joint input (u, v, c, u*v, bi; d each) a sales row fills: v, c (the sales input), bi.

    Built once per embedding width (read-only; index_select does not write it).
    """
    return torch.cat([torch.arange(d, 3 * d), torch.arange(4 * d, 5 * d)])


class SharedEncoder(nn.Module):
    """What the federation learns: shared-field embeddings, towers and MMoE experts."""

    def __init__(self, cfg: ModelConfig, fcfg: FeatureConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.fields = nn.Embedding(fcfg.hash_buckets, d, padding_idx=0)
        self.products = nn.Embedding(fcfg.product_buckets, d, padding_idx=0)
        self.price = nn.Linear(3, d)
        self.item_tower = _mlp([3 * d, 2 * d, d])
        self.user_tower = _mlp([2 * d, 2 * d, d])
        self.ctx_tower = _mlp([d, d])
        self.experts = nn.ModuleList(_mlp([5 * d, cfg.expert_dim, cfg.expert_dim], cfg.dropout)
                                     for _ in range(cfg.n_experts))
        # Wide part: a first-order weight per shared field value and task (Wide & Deep / DeepFM),
        # which small shops learn far faster through the federation than deep crosses.
        self.wide = nn.Embedding(fcfg.hash_buckets, len(GATED_TASKS), padding_idx=0)
        nn.init.zeros_(self.wide.weight)
        self._packing: dict | None = None  # see packing_once
        self._train_packs: list[Pack] | None = None  # see ShopModel.packed_parameters
        for emb in (self.fields, self.products):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()

    def items(self, item_cat: torch.Tensor, item_key: torch.Tensor, item_num: torch.Tensor,
              item_id_emb: torch.Tensor, id_keep: torch.Tensor | None = None,
              counts: FieldCounts | None = None, looked_up: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors (I, d) from shared side fields, the product key and the local ID embedding.

        ``counts``: `field_counts(item_cat)` when the caller keeps it; ``looked_up``: ``fields`` at ``item_cat``
        when the caller looked them up.
        """
        return self._item_tower(_pool_terms(self.fields, item_cat, counts, looked_up)[0], item_key, item_num,
                                item_id_emb, id_keep)

    def item_terms(self, item_cat: torch.Tensor, item_key: torch.Tensor, item_num: torch.Tensor,
                   item_id_emb: torch.Tensor, id_keep: torch.Tensor | None = None,
                   counts: FieldCounts | None = None, looked_up: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`items` (I, d) with each item's side-field crosses (I, d): `crosses(item_cat)`'s first part, row for
        row, from the lookup the item vectors already make (that lookup touches every item's field rows anyway).

        The wide terms are not taken here: a whole-catalog lookup of ``wide`` would touch rows a batch does not
        use, which row-sparse Adam would then move by their momentum. ``counts``, ``looked_up``: as in `items`.
        """
        pooled, e, total = _pool_terms(self.fields, item_cat, counts, looked_up)
        return self._item_tower(pooled, item_key, item_num, item_id_emb, id_keep), _bi_interaction(e, total)

    def _item_tower(self, pooled: torch.Tensor, item_key: torch.Tensor, item_num: torch.Tensor,
                    item_id_emb: torch.Tensor, id_keep: torch.Tensor | None) -> torch.Tensor:
        ids = _run(self.products, item_key) + item_id_emb
        if id_keep is not None:
            ids = ids * id_keep
        return _run(self.item_tower, torch.cat([pooled, ids, _run(self.price, item_num)], -1))

    def users(self, user_side: torch.Tensor, user_id_emb: torch.Tensor, hist_vec: torch.Tensor) -> torch.Tensor:
        """User vectors (B, d) from side fields + local ID embedding and the behaviour sequence."""
        return _run(self.user_tower, torch.cat([user_side + user_id_emb, hist_vec], -1))

    def context(self, ctx_cat: torch.Tensor, ctx_num_vec: torch.Tensor | None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Context vectors (B, d) from hashed context fields and the locally projected numeric ones.

        ``pooled``: the mean of the context fields' embeddings when the caller already has it;
        ``ctx_num_vec`` None: the shop has no numeric context (the same as adding zeros).
        """
        x = _pool(self.fields, ctx_cat) if pooled is None else pooled
        return _run(self.ctx_tower, x if ctx_num_vec is None else x + ctx_num_vec)

    def field_terms(self, field_idx: torch.Tensor, groups: Sequence[int] = (), pooled: Sequence[int] = (),
                    extra: torch.Tensor | None = None, rows: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    wide_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Bi-interaction pooling (NFM, (B, d)) of a row's shared fields, their wide terms ((B, n_gated_tasks)
        first-order logits) and the mean embedding (B, d) of the ``pooled`` groups among the consecutive
        groups of ``groups`` fields (sizes summing to F; padding left out), from one lookup of each table.

        ``extra``: other rows' field indices (B2, F2) whose `_pool` mean (B2, d) is appended to the means,
        from the same lookup of ``fields`` (one row-sparse gradient instead of two and their merge).
        ``rows``: ``fields``' rows at ``field_idx`` and at ``extra`` when the caller looked them up; ``wide_rows``:
        ``wide``'s rows at ``field_idx``, likewise.
        """
        mask = _padding_mask(field_idx, self.fields.weight.dtype)
        # The mask already zeroes the padding fields and their gradient, so the lookups skip the tables'
        # padding_idx (same output and gradient values): the embedding backward then has no padding rows to
        # filter out, a mask-and-gather over the whole (B*F, d) gradient per table and step (~5% of a step).
        # Row 0 then appears in the row-sparse gradient with zeros, which Adam turns into no change while its
        # moments are zero (as the dense path, where padding_idx also leaves a zero gradient row).
        table = self.fields.weight
        if rows is not None:
            looked_up, other = rows
        elif extra is None:
            looked_up = F.embedding(field_idx, table, sparse=self.fields.sparse)  # (B, F, d)
        else:  # one flat lookup, split (a split's backward is one concatenation)
            flat = F.embedding(torch.cat([field_idx.reshape(-1), extra.reshape(-1)]), table, sparse=self.fields.sparse)
            looked_up, other = flat.split([field_idx.numel(), extra.numel()])
            looked_up, other = looked_up.view(*field_idx.shape, -1), other.view(*extra.shape, -1)
        e = _masked(looked_up, mask)
        bi = _bi_interaction(e, e.sum(1))
        means = []
        if groups:
            # Split, not slice: the backward of a split is one concatenation, a slice's a zero-filled (B, F, d).
            parts = e.split(list(groups), 1)
            if mask is None:  # every field counts: divide by the group's size (the same division, 5 ops fewer)
                means = [parts[g].sum(1) / groups[g] for g in pooled]
            else:
                counts = mask.squeeze(-1).split(list(groups), 1)
                means = [parts[g].sum(1) / counts[g].sum(1, keepdim=True).clamp(min=1) for g in pooled]
        if extra is not None:
            means.append(_mean_terms(other, extra)[0])
        if wide_rows is None:
            wide_rows = F.embedding(field_idx, self.wide.weight, sparse=self.wide.sparse)
        return bi, _masked(wide_rows, mask).sum(1), means

    def wide_terms(self, field_idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The wide terms (B, n_gated_tasks) of `field_terms` alone (a lookup of ``wide`` only; ``rows``: ``wide``'s
        rows at ``field_idx`` when the caller looked them up)."""
        mask = _padding_mask(field_idx, self.wide.weight.dtype)
        if rows is None:
            rows = F.embedding(field_idx, self.wide.weight, sparse=self.wide.sparse)
        return _masked(rows, mask).sum(1)

    def crosses(self, field_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bi-interaction pooling (NFM) of all shared fields of a row, and their wide terms.

        (B, F) hashed indices -> ((B, d) pairwise crosses, (B, n_gated_tasks) first-order logits).
        """
        bi, wide, _ = self.field_terms(field_idx)
        return bi, wide

    def mixture(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs (B, K, E) over the joint input (B, 5d).

        The K two-layer experts run as one matrix product for the first layers (their weights side by side)
        and one batched product for the second: the same function and parameters as calling each expert,
        in two large kernels instead of 2K small ones (forward and backward).
        ``cols``: x holds only these columns of the joint input, the others being zero (the sales rows):
        the first layers read only those weight columns, the same function with fewer products.
        """
        w1, b1, b2, w2 = self._packed_experts()
        k, width = len(self.experts), self.experts[0][-1].in_features
        if cols is not None:
            w1 = w1.index_select(1, cols)
        drop = next((m.p for m in self.experts[0] if isinstance(m, nn.Dropout)), 0.0)
        if drop:
            h = F.dropout(F.relu(F.linear(x, w1, b1)), drop, self.training).reshape(-1, k, width).transpose(0, 1)
        else:
            # The ReLU on the (K, B, E_in) view, not before it: its backward writes the gradient in the view's
            # memory layout (its input's), so the reshape's backward is a view; with the ReLU first, the gradient
            # arrives transposed and that backward copies it (B x K*E_in, twice a step). Same values either way.
            h = torch.relu(F.linear(x, w1, b1).view(-1, k, width).transpose(0, 1))  # (K, B, E_in)
        return torch.baddbmm(b2, h, w2).transpose(0, 1)  # (B, K, E)

    def _packed_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' weights side by side: first layers' (K*E_in, 5d) and (K*E_in,), last layers' bias
        (K, 1, E) and transposed weight (K, E_in, E); inside `packing_once`, built once and reused."""
        packs = getattr(self, "_train_packs", None)
        if packs:  # the experts' parameters live in these leaves while training (`ShopModel.packed_parameters`)
            w1, b1, w2, b2 = (p.leaf for p in packs)
            return w1, b1, b2.unsqueeze(1), w2.transpose(1, 2)
        cache = getattr(self, "_packing", None)
        if cache is not None and "experts" in cache:
            return cache["experts"]
        first = [e[0] for e in self.experts]
        last = [e[-1] for e in self.experts]
        packed = (torch.cat([f.weight for f in first]), torch.cat([f.bias for f in first]),
                  torch.stack([m.bias for m in last]).unsqueeze(1),
                  torch.stack([m.weight for m in last]).transpose(1, 2))
        if cache is not None:
            cache["experts"] = packed
        return packed

    def expert_packs(self) -> list[Pack]:
        """`_alias_pack` of the experts: first layers' weights and biases concatenated, last layers' stacked (the
        layout `_packed_experts` builds each step otherwise); `mixture` reads them until `_unpack`."""
        first, last = [e[0] for e in self.experts], [e[-1] for e in self.experts]
        groups = [([f.weight for f in first], False), ([f.bias for f in first], False),
                  ([m.weight for m in last], True), ([m.bias for m in last], True)]
        return [Pack(_alias_pack(ps, stack), ps, stack) for ps, stack in groups]

    @contextmanager
    def packing_once(self) -> Iterator[None]:
        """Within the block (one training step's forward passes), `mixture` packs the experts' weights once.

        A step runs the mixture on impression rows and on sales rows: with one packing, both use the same
        concatenated weights, and the backward splits their summed gradient once (the same sums per
        parameter element) instead of twice: ~30 ops fewer a step. The weights must not change inside.
        """
        self._packing = {}
        try:
            yield
        finally:
            self._packing = None


def prior_logits(tensors: ShopTensors) -> dict[str, float]:
    """Starting output bias of the CTR and CVR towers: the log-odds of the shop's training base rates.

    Why: a tower starting at logit 0 (p = 0.5) against a ~4% CTR spends a small shop's first epoch pulling
    every logit down by ~3 nats, and the rows and weights that the most impressions touch move the most, so
    the frequent (popular, more often clicked) items tended to end lowest: round 1 often ranked below random
    (AUC ~0.4 in small shops; docs/results-log.md, "aucprobe"). CVR's is the purchase rate among clicks
    (ESMM multiplies it by pCTR). Only ``rows["train"]`` is read; a task whose rate is 0 or 1 (or has no
    rows) keeps bias 0.
    """
    rows = tensors.rows.get("train") or {}
    clicked, bought = rows.get("clicked"), rows.get("purchased")
    rates: dict[str, float] = {}
    if clicked is not None and clicked.numel():
        rates["ctr"] = float(clicked.double().mean())
        if bought is not None and bool((clicked > 0).any()):
            rates["cvr"] = float(bought[clicked > 0].double().mean())
    return {t: math.log(r / (1 - r)) for t, r in rates.items() if 0 < r < 1}


class LocalPart(nn.Module):
    """What never leaves the shop: ID embeddings, task gates/towers, ranking head, loss weights."""

    def __init__(self, cfg: ModelConfig, tensors: ShopTensors) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.tasks = list(tensors.tasks)
        self.user_ids = nn.Embedding(tensors.n_users, d)
        self.item_ids = nn.Embedding(tensors.n_items, d)
        nn.init.normal_(self.user_ids.weight, std=0.01)
        nn.init.normal_(self.item_ids.weight, std=0.01)
        self.ctx_num = nn.Linear(tensors.n_ctx_num, d) if tensors.n_ctx_num else None
        gated = [t for t in GATED_TASKS if t in self.tasks]
        self.gates = nn.ModuleDict({t: nn.Linear(5 * d, cfg.n_experts) for t in gated})
        self.towers = nn.ModuleDict({t: _mlp([cfg.expert_dim, cfg.tower_dim, 1], cfg.dropout) for t in gated
                                     if t != "sales"})
        with torch.no_grad():
            for task, logit in (prior_logits(tensors) if cfg.tower_prior == "base-rate" else {}).items():
                if task in self.towers:
                    self.towers[task][-1].bias.fill_(logit)
        if "sales" in self.tasks:
            self.sales_in = nn.Linear(SALES_FEATURES, d)
            self.towers["sales"] = _mlp([cfg.expert_dim + d, cfg.tower_dim, 1], cfg.dropout)
        if "ranking" in self.tasks:
            self.rank_proj = nn.Linear(d, d, bias=False)
            nn.init.eye_(self.rank_proj.weight)
            self.item_bias = nn.Embedding(tensors.n_items, 1)
            nn.init.zeros_(self.item_bias.weight)
        self.weighting = make_weighting(cfg.weighting, self.tasks)
        self._train_packs: tuple[tuple[str, ...], list[Pack]] | None = None  # see ShopModel.packed_parameters

    def tower_packs(self) -> tuple[tuple[str, ...], list[Pack]] | None:
        """`_alias_pack` of the CTR/CVR gates and towers in `gated_towers`' layout (gate weights and biases
        concatenated, tower layers stacked), or None when `gated_towers` would not batch them."""
        tasks = tuple(t for t in ("ctr", "cvr") if t in self.towers)
        towers = [self.towers[t] for t in tasks]
        if len(tasks) < 2 or any(len(tw) != 3 for tw in towers):
            return None
        gates = [self.gates[t] for t in tasks]
        groups = [([g.weight for g in gates], False), ([g.bias for g in gates], False),
                  ([tw[0].weight for tw in towers], True), ([tw[0].bias for tw in towers], True),
                  ([tw[-1].weight for tw in towers], True), ([tw[-1].bias for tw in towers], True)]
        return tasks, [Pack(_alias_pack(ps, stack), ps, stack) for ps, stack in groups]

    def gate(self, task: str, x: torch.Tensor, experts: torch.Tensor, cols: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Task-specific mixture of expert outputs: (B, K, E) -> (B, E).

        ``cols``: x holds only these columns of the joint input, the others being zero (see `SharedEncoder.mixture`).
        """
        g = self.gates[task]
        w = torch.softmax(g(x) if cols is None else F.linear(x, g.weight.index_select(1, cols), g.bias), -1)  # (B, K)
        return (w.unsqueeze(-1) * experts).sum(1)

    def gated_towers(self, tasks: Sequence[str], x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Logits (T, B) of the tasks' towers over their gated mixtures: the same function as
        ``towers[t](gate(t, x, experts))`` for each t, as one batched op per layer instead of one per task.

        The per-task parameters stay as they are (names, shapes, state dict); they are stacked per call.
        Dropout between tower layers or a tower of another depth falls back to calling each task's modules.
        """
        towers = [self.towers[t] for t in tasks]
        if len(tasks) < 2 or any(len(tw) != 3 for tw in towers):
            return torch.stack([self.towers[t](self.gate(t, x, experts)).squeeze(-1) for t in tasks])
        gates = [self.gates[t] for t in tasks]
        n, k = len(tasks), gates[0].out_features
        packed = getattr(self, "_train_packs", None)
        if packed is not None and packed[0] == tuple(tasks):  # the parameters live in these leaves while training
            gw, gb, w1, b1, w2, b2 = (p.leaf for p in packed[1])
        else:
            first, last = [tw[0] for tw in towers], [tw[-1] for tw in towers]
            gw, gb = torch.cat([g.weight for g in gates]), torch.cat([g.bias for g in gates])
            w1, b1 = torch.stack([f.weight for f in first]), torch.stack([f.bias for f in first])
            w2, b2 = torch.stack([m.weight for m in last]), torch.stack([m.bias for m in last])
        logits = F.linear(x, gw, gb)
        w = torch.softmax(logits.view(-1, n, k), -1)  # (B, T, K)
        h = torch.bmm(w, experts).transpose(0, 1)  # (T, B, E): each task's mixture
        z = torch.relu(torch.baddbmm(b1.unsqueeze(1), h, w1.transpose(1, 2)))  # (T, B, H)
        out = torch.baddbmm(b2.unsqueeze(1), z, w2.transpose(1, 2))  # (T, B, 1)
        return out.squeeze(-1)


# Local parameters whose shapes do not depend on the shop's vocabulary: the "FedAvg of everything
# shareable" baseline averages these too (heads), while fedshop keeps them home.
VOCAB_BOUND_LOCAL = ("user_ids.", "item_ids.", "item_bias.", "ctx_num.")


class ShopModel(nn.Module):
    """`encoder` (federated) + `local` (private), and the forward passes every task uses."""

    def __init__(self, cfg: ModelConfig, fcfg: FeatureConfig, tensors: ShopTensors) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SharedEncoder(cfg, fcfg)
        self.local = LocalPart(cfg, tensors)
        self.register_buffer("item_cat", tensors.item_cat, persistent=False)
        self.register_buffer("item_key", tensors.item_key, persistent=False)
        self.register_buffer("item_num", tensors.item_num, persistent=False)
        self.register_buffer("user_cat", tensors.user_cat, persistent=False)

    # ---- state split -------------------------------------------------------------------------
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """What the shop sends: the encoder's state dict (same keys and shapes in every shop)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def local_state(self) -> dict[str, torch.Tensor]:
        """What the shop keeps: the local part's state dict."""
        return {k: v.detach().clone() for k, v in self.local.state_dict().items()}

    def load_encoder_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load encoder weights received from the coordinator (strict: every key, same shapes)."""
        self.encoder.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the shop's private part saved from an earlier round or run."""
        self.local.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)

    def shareable_local_keys(self) -> list[str]:
        """Local keys with vocabulary-independent shapes (averaged only by the FedAvg-all baseline)."""
        return [k for k in self.local.state_dict() if not k.startswith(VOCAB_BOUND_LOCAL)]

    def row_sparse_tables(self) -> list[nn.Embedding]:
        """The large hashed tables a batch touches only a few rows of (trained with row-sparse updates).

        Only tables read through their module call qualify (a sparse gradient needs the lookup):
        ``local.item_ids`` is read whole by `all_items`, and the local tables are small.
        """
        return [self.encoder.fields, self.encoder.products, self.encoder.wide]

    @contextmanager
    def packed_parameters(self, encoder: bool = True) -> Iterator[list[Pack]]:
        """Within the block, the experts' parameters (``encoder``) and the CTR/CVR gates' and towers' live in packed
        leaf tensors (`_alias_pack`), which the forward passes read and an optimiser must update instead of them;
        yields the packs. The parameters' values, names and state dict stay as they are; on exit they get their own
        storage back. A training-loop switch (`shared.train`): a plain backward inside the block leaves the packed
        parameters' ``.grad`` unset (the leaves get it).
        """
        enc = self.encoder.expert_packs() if encoder else []
        towers = self.local.tower_packs()
        self.encoder._train_packs = enc or None
        self.local._train_packs = towers
        packs = enc + (towers[1] if towers else [])
        try:
            yield packs
        finally:
            self.encoder._train_packs = None
            self.local._train_packs = None
            for pack in packs:
                _unpack(pack.params)

    # ---- forward pieces ----------------------------------------------------------------------
    def _id_keep(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.cfg.id_dropout <= 0:
            return None
        return (torch.rand(n, 1, device=like.device) >= self.cfg.id_dropout).to(like.dtype)

    def _catalog_counts(self, dtype: torch.dtype) -> FieldCounts:
        """`field_counts` of the catalog's fields (``item_cat``), kept while that buffer and the dtype stay the same:
        every whole-vocabulary item pass (each training step) would otherwise rebuild the same mask and counts."""
        cat = self.item_cat
        kept = self.__dict__.get("_catalog_counts_kept")
        if kept is None or kept[0] is not cat or kept[1] != (cat._version, dtype):
            kept = (cat, (cat._version, dtype), field_counts(cat, dtype))
            self.__dict__["_catalog_counts_kept"] = kept
        return kept[2]

    def all_items(self, items: torch.Tensor | None = None, *,
                  catalog_fields: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors for the given item indices (default: the whole local vocabulary).

        The whole vocabulary's table of a shop with sales also carries each item's side-field crosses
        (attribute ``ITEM_CROSSES``), from the field lookup the table makes: a sales batch then gathers its
        rows' crosses instead of looking their fields up again (one sparse gradient fewer on ``fields``, whose
        merge into the others is a row-by-row copy). ``catalog_fields``: the ``fields`` table's rows at ``item_cat``
        (I, F, d), when the caller looked them up (whole vocabulary only).
        """
        if items is None:
            w = self.local.item_ids.weight
            args = (self.item_cat, self.item_key, self.item_num, w, self._id_keep(len(w), w))
            counts = self._catalog_counts(w.dtype)
            if "sales" not in self.local.towers:
                return self.encoder.items(*args, counts=counts, looked_up=catalog_fields)
            table, bi = self.encoder.item_terms(*args, counts=counts, looked_up=catalog_fields)
            setattr(table, ITEM_CROSSES, bi)
            return table
        emb = self.local.item_ids(items)
        return self.encoder.items(self.item_cat[items], self.item_key[items], self.item_num[items], emb,
                                  self._id_keep(len(emb), emb))

    def user_vectors(self, user: torch.Tensor, hist: torch.Tensor, item_table: torch.Tensor,
                     side: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors (B, d): side fields, ID embedding, and the mean of the history's item vectors.

        ``side``: the mean of the user's side-field embeddings when the caller already has it.
        """
        hist_vec = _sparse_mean(item_table, hist)  # mean over the clicked items (index 0 = padding)
        if side is None:
            side = _pool(self.encoder.fields, self.user_cat.index_select(0, user))
        ids = _run(self.local.user_ids, user)
        keep = self._id_keep(len(ids), ids)
        return self.encoder.users(side, ids if keep is None else ids * keep, hist_vec)

    def impression_logits(self, batch: Mapping[str, torch.Tensor], item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task logits on impression rows: {'ctr': (B,), 'cvr': (B,)} for the tasks the shop has."""
        return self._impressions(batch, item_table, None).logits

    def impression_logits_and_ranking_users(self, batch: Mapping[str, torch.Tensor],
                                            rank_rows: Mapping[str, torch.Tensor], item_table: torch.Tensor
                                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`impression_logits` of ``batch`` and `ranking_users` of ``rank_rows`` ('user', 'hist') from one user pass.

        The ranking rows' side fields come from the impression rows' field lookup, and both row sets' users
        go through one history mean, one ID lookup and one user tower: the same values as the two calls (in
        training, the ID dropout draws the impression rows' then the ranking rows' masks, as they would),
        with gradients summed in another order, and a third fewer user-side ops a step.
        """
        out = self._impressions(batch, item_table, rank_rows)
        assert out.ranking_users is not None
        return out.logits, out.ranking_users

    def training_impressions(self, batch: Mapping[str, torch.Tensor], rank_rows: Mapping[str, torch.Tensor] | None,
                             sales_rows: Mapping[str, torch.Tensor] | None = None) -> ImpressionPass:
        """A training step's first pass: `impression_logits` of ``batch``, `ranking_users` of ``rank_rows`` (if given),
        the whole vocabulary's item table (`all_items`, built first) and the wide terms of ``sales_rows`` (if given;
        what `sales_log_rate` takes as ``wide``).

        The catalog's and the rows' field indices go through one lookup of the field table, and the impression and
        sales rows' through one of the wide table: the same values as `all_items`, then
        `impression_logits_and_ranking_users` and the sales rows' own lookup (the ID dropout draws in the same order),
        with one row-sparse gradient a table instead of several and autograd's row-by-row merges of them.
        """
        return self._impressions(batch, None, rank_rows, sales_rows)

    def _impressions(self, batch: Mapping[str, torch.Tensor], item_table: torch.Tensor | None,
                     rank_rows: Mapping[str, torch.Tensor] | None,
                     sales_rows: Mapping[str, torch.Tensor] | None = None) -> ImpressionPass:
        user_cat, ctx_cat = self.user_cat.index_select(0, batch["user"]), batch["ctx_cat"]
        fields = torch.cat([user_cat, self.item_cat.index_select(0, batch["item"]), ctx_cat], 1)
        # One lookup of the field table serves the crosses, the user's side fields and the context: each
        # extra lookup costs a forward, a backward and (in row-sparse training) a sparse gradient merge.
        groups = (user_cat.shape[1], fields.shape[1] - user_cat.shape[1] - ctx_cat.shape[1], ctx_cat.shape[1])
        extra = None if rank_rows is None else self.user_cat.index_select(0, rank_rows["user"])
        looked_up = wide_rows = sales_wide = None
        if item_table is None:  # the catalog's fields join the lookup; the item table is built from them first
            item_rows, field_rows, *extra_rows = _lookup_parts(
                self.encoder.fields, [self.item_cat, fields] + ([] if extra is None else [extra]))
            item_table = self.all_items(catalog_fields=item_rows)
            looked_up = (field_rows, extra_rows[0] if extra_rows else None)
            if sales_rows is not None:  # the sales rows' wide terms from the impression rows' lookup of ``wide``
                sales_fields = self.item_cat.index_select(0, sales_rows["item"])
                wide_rows, sales_rows_wide = _lookup_parts(self.encoder.wide, [fields, sales_fields])
                sales_wide = self.encoder.wide_terms(sales_fields, rows=sales_rows_wide)
        rank_users = None
        if rank_rows is None:
            bi, wide, (side, ctx_mean) = self.encoder.field_terms(fields, groups, pooled=(0, 2), rows=looked_up,
                                                                  wide_rows=wide_rows)
            u = self.user_vectors(batch["user"], batch["hist"], item_table, side=side)
        else:
            bi, wide, (side, ctx_mean, rank_side) = self.encoder.field_terms(
                fields, groups, pooled=(0, 2), extra=extra, rows=looked_up, wide_rows=wide_rows)
            both = self.user_vectors(torch.cat([batch["user"], rank_rows["user"]]),
                                     torch.cat([batch["hist"], rank_rows["hist"]]), item_table,
                                     side=torch.cat([side, rank_side]))
            u, rank_u = both.split([len(side), len(rank_side)])
            rank_users = _run(self.local.rank_proj, rank_u)
        v = item_table.index_select(0, batch["item"])  # backward is an index_add (advanced indexing sorts)
        # An absent numeric context adds nothing: no branch, no zeros tensor.
        num_vec = _run(self.local.ctx_num, batch["ctx_num"]) if self.local.ctx_num is not None else None
        c = self.encoder.context(ctx_cat, num_vec, pooled=ctx_mean)
        x = torch.cat([u, v, c, u * v, bi], -1)  # (B, 5d)
        experts = self.encoder.mixture(x)  # (B, K, E)
        tasks = [t for t in ("ctr", "cvr") if t in self.local.towers]
        if not tasks:
            return ImpressionPass({}, rank_users, item_table, sales_wide)
        first = GATED_TASKS.index(tasks[0])  # ctr, cvr: adjacent columns of the wide terms, a view
        logits = self.local.gated_towers(tasks, x, experts) + wide[:, first:first + len(tasks)].T
        return ImpressionPass(dict(zip(tasks, logits.unbind(0), strict=True)), rank_users, item_table, sales_wide)

    def ranking_scores(self, user: torch.Tensor, hist: torch.Tensor, items: torch.Tensor,
                       item_table: torch.Tensor) -> torch.Tensor:
        """Scores (B, C) of candidate items: (B, C) indices, or (C,) shared by the batch."""
        return self.candidate_scores(self.ranking_users(user, hist, item_table), items, item_table)

    def ranking_users(self, user: torch.Tensor, hist: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """The user vectors (B, d) ranking scores items against (compute once, score many candidate sets)."""
        return _run(self.local.rank_proj, self.user_vectors(user, hist, item_table))

    def candidate_scores(self, users: torch.Tensor, items: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """Scores (B, C) of candidates for `ranking_users` vectors: (B, C) indices, or (C,) shared by the batch."""
        v = item_table.index_select(0, items.reshape(-1)).reshape(*items.shape, -1)
        bias = _run(self.local.item_bias, items).squeeze(-1)
        if items.dim() == 1:
            return users @ v.T + bias
        if items.shape[1] == 1:  # one candidate a row (the training positives): a product and a sum, forward and
            # backward ~4x cheaper than einsum's batch of 1 x d by d x 1 matrix products (same dot products)
            return (users.unsqueeze(1) * v).sum(-1) + bias
        return torch.einsum("bd,bcd->bc", users, v) + bias

    def sales_log_rate(self, batch: Mapping[str, torch.Tensor], item_table: torch.Tensor,
                       wide: torch.Tensor | None = None) -> torch.Tensor:
        """Log of expected next-period units per (item, period) row: (B,).

        The rows' side-field crosses come from ``item_table``'s per-item ones when it carries them
        (`all_items`), else from the lookup of the rows' fields the wide terms take: the same values either way.
        ``wide``: the rows' wide terms (B, n_gated_tasks) when the caller has them (`training_impressions`).
        """
        item = batch["item"]
        v = item_table.index_select(0, item)
        s = _run(self.local.sales_in, batch["x"])  # (B, d)
        per_item = getattr(item_table, ITEM_CROSSES, None)
        if per_item is None:
            bi, wide_terms = self.encoder.crosses(self.item_cat.index_select(0, item))
            wide = wide_terms if wide is None else wide
        else:
            bi = per_item.index_select(0, item)
            if wide is None:
                wide = self.encoder.wide_terms(self.item_cat.index_select(0, item))
        # The joint input of a sales row is [0, v, s, 0, bi] (no user, no user-item product): the experts' first
        # layers and the gate read only the three non-zero blocks' weight columns (~40% fewer products there,
        # forward and backward, and no zero blocks built or differentiated).
        x = torch.cat([v, s, bi], -1)  # (B, 3d)
        cols = _sales_cols(v.shape[-1])
        h = self.local.gate("sales", x, self.encoder.mixture(x, cols), cols)
        return _run(self.local.towers["sales"], torch.cat([h, s], -1)).squeeze(-1) + wide[:, GATED_TASKS.index("sales")]


def initial_encoder_state(cfg: ModelConfig, fcfg: FeatureConfig, seed: int) -> dict[str, torch.Tensor]:
    """The encoder a federation starts from: what `build_model(..., seed=seed)` initialises first.

    Deterministic in (configs, seed), so a shop can rebuild it instead of downloading it (compression).
    Seeds torch's global RNG like `build_model`; wrap in `torch.random.fork_rng` to keep the caller's.
    """
    torch.manual_seed(seed)
    return SharedEncoder(cfg, fcfg).state_dict()


def build_model(tensors: ShopTensors, cfg: ModelConfig | None = None, feature_cfg: FeatureConfig | None = None,
                seed: int = 0, *, encoder_state: Mapping[str, torch.Tensor] | None = None,
                local_state: Mapping[str, torch.Tensor] | None = None) -> ShopModel:
    """A model for one shop. A fresh model's encoder weights depend only on ``seed``.

    Given both ``encoder_state`` (received) and ``local_state`` (saved), the model is built without
    random initialisation and holds copies of them: the same model as building fresh and loading both,
    minus the wasted initialisation of ~1.6M parameters. Given only one, the model is built fresh and
    that part loaded, since skipping the encoder's initialisation would shift the local part's (one
    random stream), and a fresh local part must stay the same for a given seed.
    """
    cfg = cfg or ModelConfig()
    fcfg = feature_cfg or tensors.cfg or FeatureConfig()
    torch.manual_seed(seed)
    if encoder_state is None or local_state is None:
        model = ShopModel(cfg, fcfg, tensors)
        if encoder_state is not None:
            model.load_encoder_state(encoder_state)
        if local_state is not None:
            model.load_local_state(local_state)
        return model
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = ShopModel(cfg, fcfg, tensors)
    for part, state in ((model.encoder, encoder_state), (model.local, local_state)):
        expected = part.state_dict()
        # Copies in the parameters' dtypes: assigned tensors become the parameters, and training must not
        # write into the caller's arrays (the received encoder is also FedProx's anchor).
        part.load_state_dict({k: torch.as_tensor(v).to(dtype=expected[k].dtype, copy=True) if k in expected
                              else torch.as_tensor(v) for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"build_model: {left[:3]} were not in the given states; load both parts in full")
    return model
