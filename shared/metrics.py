"""Evaluation metrics for every fedshop task: numpy or torch in, plain python floats out."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def _skm():  # noqa: ANN202 - a module
    """scikit-learn's metrics, imported on first use (a third of a deployed shop's per-message start-up)."""
    import sklearn.metrics as skm

    return skm


PROBA_EPS = 1e-7  # clip for logloss so a confident wrong prediction costs ~16 nats, not infinity
POISSON_EPS = 1e-8  # Poisson deviance needs strictly positive predicted means
DEFAULT_F1_THRESHOLD = 0.5  # used when F1 is undefined (no positives) and no threshold can be chosen
TOPK_CHUNK_ELEMENTS = 1 << 23  # scores held at once while ranking (~32 MB of float32)

NAN = float("nan")


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from its positive and negative counts.

    Reports use it to say whether a per-shop AUC difference is larger than its test split can resolve.
    """
    if n_pos <= 0 or n_neg <= 0 or not np.isfinite(auc):
        return NAN
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def _as_1d(values: object, name: str) -> np.ndarray:
    """Turn an array-like or tensor into a 1-D float64 array, rejecting NaN so metrics never lie silently."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; fix the model output or drop those rows before evaluating")
    return arr


def _paired(y_true: object, y_other: object, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a (y_true, prediction) pair and check that both have the same length."""
    yt = _as_1d(y_true, "y_true")
    yo = _as_1d(y_other, other_name)
    if yt.shape != yo.shape:
        raise ValueError(f"y_true has {yt.size} values but {other_name} has {yo.size}; pass one value per row")
    return yt, yo


def _binary_labels(y_true: np.ndarray) -> np.ndarray:
    """Check labels are 0/1 and return them as ints."""
    bad = ~np.isin(y_true, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"y_true must hold binary labels 0/1, found {y_true[bad][0]!r}; threshold or map labels first")
    return y_true.astype(np.int64)


def binary_metrics(y_true: object, y_score: object, *, threshold: float | None = None) -> dict[str, float]:
    """AUC and logloss of probability scores, plus thresholded accuracy/precision/recall/F1 if asked."""
    yt, ys = _paired(y_true, y_score, "y_score")
    labels = _binary_labels(yt)
    out: dict[str, float] = {"auc": NAN, "logloss": NAN}
    if threshold is not None:
        out.update(accuracy=NAN, precision=NAN, recall=NAN, f1=NAN)
    if labels.size == 0:
        return out
    # AUC is undefined with a single class; sklearn would raise, a shop's split may legitimately lack one.
    if np.unique(labels).size == 2:
        out["auc"] = float(_skm().roc_auc_score(labels, ys))
    out["logloss"] = float(_skm().log_loss(labels, np.clip(ys, PROBA_EPS, 1.0 - PROBA_EPS), labels=[0, 1]))
    if threshold is not None:
        out.update(thresholded_metrics(labels, ys >= threshold))
    return out


def thresholded_metrics(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 0/1 ``labels`` against boolean ``pred``, from the confusion counts.

    The floats sklearn's accuracy_score and binary precision/recall/f1_score (zero_division=0) give: each is one
    correctly rounded division of exact integer counts (F1 = 2 tp / (true + predicted positives), sklearn's form),
    without sklearn's input checks, which cost more than the counting (4 calls per task, split and shop each round).
    """
    truth = labels.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    predicted, true = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    correct = int(np.count_nonzero(pred == truth))
    return {"accuracy": correct / truth.size,
            "precision": tp / predicted if predicted else 0.0,
            "recall": tp / true if true else 0.0,
            "f1": 2 * tp / (true + predicted) if true + predicted else 0.0}


def best_f1_threshold(y_true: object, y_score: object) -> float:
    """Score threshold maximising F1 on validation data, to be reused unchanged on the test split."""
    yt, ys = _paired(y_true, y_score, "y_score")
    labels = _binary_labels(yt)
    if labels.sum() == 0:
        return DEFAULT_F1_THRESHOLD
    precision, recall, thresholds = _skm().precision_recall_curve(labels, ys)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def _to_score_tensor(scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    """View a (U, I) score matrix as a float CPU tensor without copying when possible."""
    t = scores.detach().cpu() if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    if t.ndim != 2:
        raise ValueError(f"scores must be a (users, items) matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    return t


def _item_lists(
    items: list[np.ndarray] | sp.spmatrix | sp.sparray | None, n_users: int, n_items: int, name: str
) -> list[np.ndarray] | None:
    """Normalise per-user item indices (list of arrays or sparse (U, I) matrix) to a list of int arrays."""
    if items is None:
        return None
    if sp.issparse(items):
        csr = sp.csr_array(items)
        if csr.shape != (n_users, n_items):
            raise ValueError(f"{name} matrix has shape {csr.shape}, scores have {(n_users, n_items)}")
        csr.sum_duplicates()
        csr.eliminate_zeros()
        return [csr.indices[csr.indptr[u] : csr.indptr[u + 1]].astype(np.int64) for u in range(n_users)]
    if len(items) != n_users:
        raise ValueError(f"{name} has {len(items)} users but scores have {n_users} rows; pass one entry per user")
    out = []
    for u, row in enumerate(items):
        arr = np.unique(np.asarray(row, dtype=np.int64).reshape(-1))
        if arr.size and (arr[0] < 0 or arr[-1] >= n_items):
            raise ValueError(f"{name}[{u}] holds item index outside [0, {n_items}); map item IDs to indices first")
        out.append(arr)
    return out


def _row_mask(lists: list[np.ndarray], start: int, stop: int, n_items: int) -> torch.Tensor:
    """Boolean (stop-start, I) mask with True at each user's listed items."""
    mask = torch.zeros((stop - start, n_items), dtype=torch.bool)
    rows = np.concatenate([np.full(lists[u].size, u - start, dtype=np.int64) for u in range(start, stop)])
    cols = np.concatenate([lists[u] for u in range(start, stop)])
    mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
    return mask


def topk_metrics(
    scores: np.ndarray | torch.Tensor,
    positives: list[np.ndarray] | sp.spmatrix | sp.sparray,
    *,
    k: int = 10,
    exclude: list[np.ndarray] | sp.spmatrix | sp.sparray | None = None,
    max_chunk_elements: int = TOPK_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Full-catalog HR/NDCG/Recall@k over users with held-out positives; ties ranked pessimistically.

    Excluded items (e.g. the user's training items) are removed from the candidates. A positive that is
    also excluded still counts in |pos| but can never be hit. Recall@k divides hits by |pos|.
    Averages are over users with at least one positive; NaN when there are none.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    table = _to_score_tensor(scores)
    n_users, n_items = table.shape
    pos = _item_lists(positives, n_users, n_items, "positives")
    excl = _item_lists(exclude, n_users, n_items, "exclude")
    keys = (f"hr@{k}", f"ndcg@{k}", f"recall@{k}")
    if n_items == 0:
        return dict.fromkeys(keys, NAN)
    kk = min(k, n_items)
    discounts = 1.0 / torch.log2(torch.arange(kk, dtype=torch.float64) + 2.0)  # (kk,)
    # ideal[m] = ideal DCG of a user with m relevant items in the top k
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])
    positions = torch.arange(kk)
    sums = {"hr": 0.0, "ndcg": 0.0, "recall": 0.0}
    counted = 0
    chunk = max(1, max_chunk_elements // n_items)
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        n_pos = torch.tensor([pos[u].size for u in range(start, stop)], dtype=torch.float64)  # (c,)
        if not bool((n_pos > 0).any()):
            continue
        block = table[start:stop]  # (c, I)
        # Summing first is a cheap NaN screen; only a NaN (or +inf meeting -inf) sum needs the full check.
        if torch.isnan(block.sum()) and torch.isnan(block).any():
            raise ValueError(f"scores rows {start}..{stop - 1} contain NaN; fix the model output")
        relevant = _row_mask(pos, start, stop, n_items)  # (c, I)
        excluded = None
        if excl is not None:
            excluded = _row_mask(excl, start, stop, n_items)
            block = block.masked_fill(excluded, -torch.inf)
        top_val, top_idx = torch.topk(block, kk, dim=1)  # (c, kk)
        kth = top_val[:, -1:]  # (c, 1)
        # Items strictly above the k-th value are surely in the top k; order them pessimistically
        # (non-positives before positives on equal score) by a stable sort on relevance, then on score.
        top_rel = relevant.gather(1, top_idx)
        if excluded is not None:
            top_rel &= ~excluded.gather(1, top_idx)
        order = torch.sort(top_rel.to(torch.int8), dim=1, stable=True).indices
        by_score = torch.sort(top_val.gather(1, order), dim=1, descending=True, stable=True).indices
        order = order.gather(1, by_score)
        hits = top_rel.gather(1, order) & (top_val.gather(1, order) > kth)  # (c, kk)
        # Items tied with the k-th value fill the remaining slots: every tied non-positive first.
        n_above = (top_val > kth).sum(1, keepdim=True)  # (c, 1)
        tied = block == kth
        if excluded is not None and bool(torch.isinf(kth).any()):
            tied &= ~excluded  # excluded items sit at -inf and may tie with a -inf k-th value
        # int32 sums: summing bools into the default int64 is several times slower on 100k-item rows.
        tied_all = tied.sum(1, keepdim=True, dtype=torch.int32)
        tied_pos = (tied & relevant).sum(1, keepdim=True, dtype=torch.int32)
        tied_neg = tied_all - tied_pos
        slot = positions - n_above  # (c, kk); negative inside the strictly-above part
        hits |= (slot >= tied_neg) & (slot < tied_neg + tied_pos)
        hits_f = hits.double()
        n_hits = hits_f.sum(1)
        has_pos = n_pos > 0
        idcg = ideal[torch.clamp(n_pos, max=kk).long()]
        sums["hr"] += float((n_hits[has_pos] > 0).double().sum())
        sums["ndcg"] += float(((hits_f @ discounts)[has_pos] / idcg[has_pos]).sum())
        sums["recall"] += float((n_hits[has_pos] / n_pos[has_pos]).sum())
        counted += int(has_pos.sum())
    if counted == 0:
        return dict.fromkeys(keys, NAN)
    return {f"{name}@{k}": total / counted for name, total in sums.items()}


def sampled_rank_metrics(
    pos_scores: np.ndarray | torch.Tensor, neg_scores: np.ndarray | torch.Tensor, *, k: int = 10
) -> dict[str, float]:
    """Leave-one-out HR/NDCG@k: the positive ranked among sampled negatives, ties counted against it."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pos = _as_1d(pos_scores, "pos_scores")
    if isinstance(neg_scores, torch.Tensor):
        neg_scores = neg_scores.detach().cpu().numpy()
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.ndim != 2 or neg.shape[0] != pos.size:
        raise ValueError(f"neg_scores must have shape ({pos.size}, n_neg) to match pos_scores, got {tuple(neg.shape)}")
    if np.isnan(neg).any():
        raise ValueError("neg_scores contains NaN; fix the model output before evaluating")
    if pos.size == 0:
        return {f"hr@{k}": NAN, f"ndcg@{k}": NAN}
    rank = (neg >= pos[:, None]).sum(axis=1)  # (U,) 0 = positive ranked first
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean())}


def regression_metrics(y_true: object, y_pred: object) -> dict[str, float]:
    """RMSE, MAE, WAPE and Poisson deviance of predicted counts (sales); NaN where undefined."""
    yt, yp = _paired(y_true, y_pred, "y_pred")
    if yt.size == 0:
        return {"rmse": NAN, "mae": NAN, "wape": NAN, "poisson_deviance": NAN}
    abs_true = float(np.abs(yt).sum())
    # Poisson deviance is only defined for non-negative targets.
    deviance = float(_skm().mean_poisson_deviance(yt, np.clip(yp, POISSON_EPS, None))) if (yt >= 0).all() else NAN
    return {
        "rmse": float(_skm().root_mean_squared_error(yt, yp)),
        "mae": float(_skm().mean_absolute_error(yt, yp)),
        "wape": float(np.abs(yt - yp).sum() / abs_true) if abs_true > 0 else NAN,
        "poisson_deviance": deviance,
    }


__all__ = [
    "best_f1_threshold",
    "binary_metrics",
    "regression_metrics",
    "sampled_rank_metrics",
    "topk_metrics",
]
