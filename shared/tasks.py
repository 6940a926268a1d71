"""Task heads behind one interface: which rows they train on, their loss, their evaluation.

The trainer, the evaluator and the federation never special-case a task: they ask each
`TaskHead` for its loss on a batch of its source rows and for its metrics on a split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.features import ShopTensors
from shared.metrics import (
    best_f1_threshold,
    binary_metrics,
    regression_metrics,
    sampled_rank_metrics,
    topk_metrics,
)
from shared.model import ShopModel

Batch = Mapping[str, torch.Tensor]
EVAL_BATCH = 8192
TOP_K = 10
RANKING_NEGATIVES = 127  # uniformly sampled catalog items shared by a training batch


def _impression_logits(model: ShopModel, rows: Batch, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    n = rows["user"].shape[0]
    for s in range(0, n, EVAL_BATCH):
        part = {k: v[s: s + EVAL_BATCH] for k, v in rows.items()}
        for t, logit in model.impression_logits(part, item_table).items():
            out.setdefault(t, []).append(logit)
    return {t: torch.cat(v) for t, v in out.items()}


@dataclass(slots=True)
class StepCache:
    """What the task heads of one training step share; a fresh one per step (and per loss evaluation).

    Who writes and who reads each field:

    - ``catalog``, ``generator``: the trainer (`shared.train`) writes them; `RankingTask` samples its
      negatives from ``catalog`` with ``generator`` (None: torch's global generator).
    - ``positives``: the trainer writes the step's ranking rows when ranking trains beside CTR/CVR; the
      first impression head reads them, so one user pass also gives those rows' users.
    - ``impressions``: the first impression head (CTR or CVR) writes its forward's logits; the other reads them.
    - ``ranking_users``: written with ``impressions`` when ``positives`` was set; `RankingTask` takes it
      (reads and clears it), else it computes its users itself.
    - ``item_table``: when the trainer passes the heads no item table (None), the first impression head writes
      the step's (`ShopModel.training_impressions`: one field lookup for the catalog and the rows); the other
      heads read it (`step_items`).
    - ``sales``: the trainer writes the step's sales rows when it leaves the item table to the impression head;
      that head's pass also computes their wide terms into ``sales_wide``, which `SalesTask` takes (reads and
      clears) for those same rows.
    """

    catalog: torch.Tensor
    generator: torch.Generator | None = None
    positives: Batch | None = None
    impressions: dict[str, torch.Tensor] | None = None
    ranking_users: torch.Tensor | None = None
    item_table: torch.Tensor | None = None
    sales: Batch | None = None
    sales_wide: torch.Tensor | None = None


def step_items(model: ShopModel, item_table: torch.Tensor | None, cache: StepCache) -> torch.Tensor:
    """The item table a head scores with: the one it was given, else the step's (the cache's, built on first need)."""
    if item_table is not None:
        return item_table
    if cache.item_table is None:
        cache.item_table = model.all_items()
    return cache.item_table


def _cached_impression_logits(model: ShopModel, batch: Batch, item_table: torch.Tensor | None,
                              cache: StepCache) -> dict[str, torch.Tensor]:
    """One impression forward pass per training step, shared by CTR and CVR through the step's cache.

    ``item_table`` None (and none in the cache yet): the pass builds the step's item table too (`StepCache`).
    """
    if cache.impressions is None:
        if item_table is None and cache.item_table is None:
            cache.impressions, cache.ranking_users, cache.item_table, cache.sales_wide = model.training_impressions(
                batch, cache.positives, cache.sales)
            return cache.impressions
        item_table = step_items(model, item_table, cache)
        if cache.positives is None:
            cache.impressions = model.impression_logits(batch, item_table)
        else:  # the step's ranking rows: one user pass serves both (RankingTask)
            cache.impressions, cache.ranking_users = model.impression_logits_and_ranking_users(
                batch, cache.positives, item_table)
    return cache.impressions


class TaskHead:
    """One task: ``source`` names its training rows ('impressions', 'positives' or 'sales')."""

    name: str = ""
    source: str = "impressions"

    def loss(self, model: ShopModel, batch: Batch, item_table: torch.Tensor | None, cache: StepCache) -> torch.Tensor:
        """Mean training loss on a batch of this task's source rows (``item_table`` None: the step's, `StepCache`)."""
        raise NotImplementedError

    def evaluate(self, model: ShopModel, tensors: ShopTensors, split: str,
                 item_table: torch.Tensor) -> dict[str, float]:
        """Metrics on a split ('val' or 'test'); empty when the split has no rows for this task."""
        raise NotImplementedError


class CTRTask(TaskHead):
    """Click given impression: BCE on the CTR tower; AUC, logloss, thresholded accuracy/F1."""

    name = "ctr"

    def loss(self, model, batch, item_table, cache):
        logits = _cached_impression_logits(model, batch, item_table, cache)
        return F.binary_cross_entropy_with_logits(logits["ctr"], batch["clicked"])

    def evaluate(self, model, tensors, split, item_table):
        rows = tensors.rows[split]
        if rows["clicked"].numel() == 0 or rows["clicked"].min() == rows["clicked"].max():
            return {}
        p = torch.sigmoid(_impression_logits(model, rows, item_table)["ctr"]).numpy()
        thr = _val_threshold(model, tensors, item_table, "ctr", split)
        return binary_metrics(rows["clicked"].numpy(), p, threshold=thr)


class CVRTask(TaskHead):
    """Purchase given click, trained ESMM-style over all impressions when the shop logs them.

    With impressions, the loss is on pCTCVR = pCTR * pCVR over every impression (no selection
    bias); a shop with clicks only trains pCVR on its clicks directly.
    """

    name = "cvr"

    def loss(self, model, batch, item_table, cache):
        logits = _cached_impression_logits(model, batch, item_table, cache)
        if "ctr" in logits:
            log_p = F.logsigmoid(logits["ctr"]) + F.logsigmoid(logits["cvr"])  # log pCTCVR
            log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
            y = batch["purchased"]
            return -(y * log_p + (1 - y) * log_not_p).mean()
        return F.binary_cross_entropy_with_logits(logits["cvr"], batch["purchased"])

    def evaluate(self, model, tensors, split, item_table):
        rows = tensors.rows[split]
        if rows["clicked"].numel() == 0:
            return {}
        logits = _impression_logits(model, rows, item_table)
        p_cvr = torch.sigmoid(logits["cvr"]).numpy()
        clicked = rows["clicked"].numpy() == 1
        bought = rows["purchased"].numpy()
        out: dict[str, float] = {}
        if clicked.any() and len(np.unique(bought[clicked])) == 2:
            out.update(binary_metrics(bought[clicked], p_cvr[clicked]))
        if "ctr" in logits and len(np.unique(bought)) == 2:
            p_ctcvr = torch.sigmoid(logits["ctr"]).numpy() * p_cvr
            out["ctcvr_auc"] = binary_metrics(bought, p_ctcvr)["auc"]
        return out


class RankingTask(TaskHead):
    """Top-K items: sampled softmax over the clicked item and shared random catalog negatives.

    Evaluated by full-catalog HR/NDCG/Recall@10 (seen items excluded) and by the leave-one-out
    protocol with 99 sampled negatives (suffix ``_s99``) used in the federated-recommendation papers.
    """

    name = "ranking"
    source = "positives"

    def loss(self, model, batch, item_table, cache):
        catalog = cache.catalog
        neg = catalog[torch.randint(len(catalog), (RANKING_NEGATIVES,), generator=cache.generator)]
        item_table = step_items(model, item_table, cache)
        users, cache.ranking_users = cache.ranking_users, None  # from the impression rows' user pass, if any
        if users is None:
            users = model.ranking_users(batch["user"], batch["hist"], item_table)  # one user pass for both
        pos_scores = model.candidate_scores(users, batch["item"][:, None], item_table)
        neg_scores = model.candidate_scores(users, neg, item_table)
        neg_scores = neg_scores.masked_fill(neg[None, :] == batch["item"][:, None], float("-inf"))
        logits = torch.cat([pos_scores, neg_scores], 1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    def evaluate(self, model, tensors, split, item_table):
        ev = tensors.ranking_eval.get(split) or {}
        if not ev:
            return {}
        users, hist = ev["user"], ev["hist"]
        cand = torch.cat([ev["pos"][:, None], ev["neg"]], 1)
        sampled = model.ranking_scores(users, hist, cand, item_table)
        # A catalog too small for the full negative count leaves padding (item 0): it is no candidate.
        neg_scores = sampled[:, 1:].masked_fill(ev["neg"] == 0, float("-inf"))
        out = sampled_rank_metrics(sampled[:, 0].numpy(), neg_scores.numpy(), k=TOP_K)
        out = {f"{k}_s{ev['neg'].shape[1]}": v for k, v in out.items()}
        blocked = torch.ones(tensors.n_items, dtype=torch.bool)
        blocked[tensors.catalog] = False
        blocked[0] = True
        seen_rows = torch.searchsorted(users, ev["seen_user"])
        known = (seen_rows < len(users)) & (users[seen_rows.clamp(max=len(users) - 1)] == ev["seen_user"])
        held = ev["held"]
        positives = [h[h > 0].numpy() for h in held]
        agg: dict[str, float] = {}
        counted = 0
        for s in range(0, len(users), 1024):
            scores = model.ranking_scores(users[s:s + 1024], hist[s:s + 1024], torch.arange(tensors.n_items),
                                          item_table)
            scores[:, blocked] = float("-inf")
            sel = known & (seen_rows >= s) & (seen_rows < s + 1024)
            scores[seen_rows[sel] - s, ev["seen_item"][sel]] = float("-inf")
            chunk = positives[s:s + 1024]
            n_pos = sum(len(p) > 0 for p in chunk)
            if not n_pos:
                continue
            for k, v in topk_metrics(scores, chunk, k=TOP_K).items():
                agg[k] = agg.get(k, 0.0) + v * n_pos  # topk_metrics averages over users with positives
            counted += n_pos
        out.update({k: v / counted for k, v in agg.items()} if counted else {})
        return out


class SalesTask(TaskHead):
    """Next-period units per item: Poisson loss on counts; RMSE, MAE, WAPE."""

    name = "sales"
    source = "sales"

    def loss(self, model, batch, item_table, cache):
        # Poisson deviance rather than F.poisson_nll_loss: same gradient, but >= 0 with 0 at a perfect fit,
        # which loss weightings (uncertainty, GradNorm, DWA) assume.
        wide = cache.sales_wide if cache.sales is batch else None  # from the impression pass, for these rows
        cache.sales_wide = None
        log_mu, y = model.sales_log_rate(batch, step_items(model, item_table, cache), wide), batch["units"]
        return 2 * (torch.xlogy(y, y) - y * log_mu - y + log_mu.exp()).mean()

    def evaluate(self, model, tensors, split, item_table):
        if tensors.sales is None or tensors.sales[split]["units"].numel() == 0:
            return {}
        rows = tensors.sales[split]
        pred = torch.cat([model.sales_log_rate({k: v[s:s + EVAL_BATCH] for k, v in rows.items()}, item_table)
                          for s in range(0, rows["units"].shape[0], EVAL_BATCH)]).exp()
        return regression_metrics(rows["units"].numpy(), pred.numpy())


def _val_threshold(model, tensors, item_table, task: str, split: str) -> float | None:
    """The decision threshold for accuracy/F1, chosen on validation (never on the split scored)."""
    rows = tensors.rows["val"]
    if split == "val" or rows["clicked"].numel() == 0 or rows["clicked"].min() == rows["clicked"].max():
        return 0.5
    p = torch.sigmoid(_impression_logits(model, rows, item_table)[task]).numpy()
    return best_f1_threshold(rows["clicked"].numpy(), p)


TASK_HEADS: dict[str, TaskHead] = {t.name: t for t in (CTRTask(), CVRTask(), RankingTask(), SalesTask())}


def heads_for(tasks: list[str]) -> list[TaskHead]:
    """The task heads for a shop's task list, in a fixed order."""
    unknown = sorted(set(tasks) - set(TASK_HEADS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASK_HEADS)}")
    return [TASK_HEADS[t] for t in TASK_HEADS if t in tasks]
