"""Privacy attacks used as evaluations: user-level membership inference, update property inference, ID leakage.

Everything here works on numbers an attacker could hold (per-user losses, encoder updates, outgoing
messages); training the models attacked is the caller's job (simulations/privacy_eval.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.privacy.accounting import tpr_bound

FPR_POINTS = (0.01, 0.001)


# ----------------------------------------------------------------------------- membership inference
@dataclass(frozen=True)
class AttackResult:
    """ROC summary of one attack, with bootstrap 95% intervals."""

    attack: str
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct: float
    tpr_at_1pct_ci: tuple[float, float]
    tpr_at_01pct: float
    tpr_at_01pct_ci: tuple[float, float]
    n_members: int
    n_nonmembers: int

    def as_dict(self) -> dict[str, object]:
        """Flat dict for tables."""
        return asdict(self)


def per_user_mean(values: np.ndarray, user_ids: np.ndarray) -> pd.Series:
    """Mean of a per-example statistic over each user's examples (the unit of user-level attacks)."""
    if len(values) != len(user_ids):
        raise ValueError(f"per-example values ({len(values)}) and user ids ({len(user_ids)}) differ in length")
    return pd.Series(np.asarray(values, dtype=np.float64)).groupby(np.asarray(user_ids)).mean()


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    """Highest TPR among ROC points whose FPR does not exceed ``fpr_target`` (0 if none)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= fpr_target
    return float(tpr[ok].max()) if ok.any() else 0.0


def evaluate_attack(attack: str, scores: np.ndarray, is_member: np.ndarray, *, n_boot: int = 200,
                    seed: int = 0) -> AttackResult:
    """AUC and TPR at 1% / 0.1% FPR of membership ``scores`` (higher = member), stratified bootstrap CIs."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError(f"attack '{attack}' needs both members and non-members; got {labels.sum()} members "
                         f"of {len(labels)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"attack '{attack}' produced non-finite scores; check the losses fed to it")

    def stats_of(lab: np.ndarray, sc: np.ndarray) -> tuple[float, float, float]:
        return (float(roc_auc_score(lab, sc)), tpr_at_fpr(lab, sc, 0.01), tpr_at_fpr(lab, sc, 0.001))

    point = stats_of(labels, scores)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    boot = np.array([
        stats_of(labels[idx], scores[idx])
        for idx in (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_boot))
    ])
    lo, hi = np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)
    ci = [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    return AttackResult(attack, point[0], ci[0], point[1], ci[1], point[2], ci[2],
                        int(labels.sum()), int((~labels).sum()))


def loss_threshold_scores(user_loss: np.ndarray) -> np.ndarray:
    """Loss-threshold attack (Yeom et al. 2018): a low loss on a user's examples means member."""
    return -np.asarray(user_loss, dtype=np.float64)


def reference_model_scores(target_loss: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022) at user level: how far below its reference (OUT) losses a user's loss is.

    ``reference_losses`` is (K, n_users): each user's loss under K models trained without any
    target user. The per-user mean calibrates for user difficulty; the variance is pooled over users
    (the paper's "global variance"), which is what works with few reference models.
    """
    ref = np.asarray(reference_losses, dtype=np.float64)
    target = np.asarray(target_loss, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != target.shape[0]:
        raise ValueError(f"reference_losses must be (K, n_users={target.shape[0]}); got {ref.shape}")
    mu = ref.mean(axis=0)
    sigma = ref.std(axis=0).mean() if ref.shape[0] > 1 else ref.std()
    sigma = max(float(sigma), 1e-8)
    # One-sided Gaussian log-likelihood that the target loss is *below* the OUT distribution.
    return -stats.norm.logcdf(target, loc=mu, scale=sigma)


def dp_violations(scores: np.ndarray, is_member: np.ndarray, *, epsilon: float, delta: float,
                  confidence: float = 0.95) -> list[dict[str, float]]:
    """ROC points whose TPR provably exceeds e^eps * FPR + delta (Clopper-Pearson bounds; non-empty = a bug)."""
    labels = np.asarray(is_member, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    fpr, tpr, _ = roc_curve(labels, scores)
    alpha = (1 - confidence) / 2
    bad = []
    for f, t in zip(fpr, tpr, strict=True):
        tp, fp = round(t * n_pos), round(f * n_neg)
        tpr_lo = stats.beta.ppf(alpha, tp, n_pos - tp + 1) if tp > 0 else 0.0
        fpr_hi = stats.beta.ppf(1 - alpha, fp + 1, n_neg - fp) if fp < n_neg else 1.0
        if tpr_lo > tpr_bound(float(fpr_hi), epsilon=epsilon, delta=delta):
            bad.append({"fpr": float(f), "tpr": float(t), "tpr_lower": float(tpr_lo), "fpr_upper": float(fpr_hi)})
    return bad


# ----------------------------------------------------------------------------- property inference
def property_inference(updates: np.ndarray, labels: np.ndarray, *, seed: int = 0, folds: int = 5,
                       n_boot: int = 200) -> tuple[float, tuple[float, float]]:
    """Cross-validated AUC of predicting a shop property (e.g. dominant category) from its individual update.

    A curious coordinator's view: one row per shop (flattened encoder update). Multi-class labels
    are scored one-vs-rest (macro AUC). Returns (AUC, bootstrap 95% CI over shops).
    """
    x = np.asarray(updates, dtype=np.float64)
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError("property inference needs shops with at least two different property values")
    folds = int(min(folds, counts.min()))
    if folds < 2:
        per_value = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise ValueError(f"every property value needs >= 2 shops for cross-validation; got {per_value}")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    proba = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")

    def auc(idx: np.ndarray) -> float:
        yy, pp = y[idx], proba[idx]
        if len(classes) == 2:
            return float(roc_auc_score(yy == classes[1], pp[:, 1]))
        return float(roc_auc_score(yy, pp, multi_class="ovr", labels=classes))

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.choice(len(y), len(y))
        if len(np.unique(y[idx])) == len(classes):
            boots.append(auc(idx))
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return auc(np.arange(len(y))), (float(lo), float(hi))


# ----------------------------------------------------------------------------- ID leakage
def user_id_leakage(messages: Iterable[Mapping[str, object]], user_ids: Iterable[str]) -> float:
    """Share of a shop's user IDs found in anything it sent: record keys, strings, bytes, array bytes.

    ``messages`` are flattened outgoing payloads (name -> value). IDs shorter than 4 characters are
    matched only as whole strings/keys: as substrings of float bytes they would match by chance.
    """
    ids = {str(u) for u in user_ids}
    if not ids:
        return 0.0
    tokens: set[str] = set()
    blobs: list[bytes] = []
    for msg in messages:
        for key, value in msg.items():
            tokens.add(str(key))
            if isinstance(value, str):
                tokens.add(value)
                blobs.append(value.encode("utf-8"))
            elif isinstance(value, bytes):
                blobs.append(value)
            elif isinstance(value, np.ndarray):
                blobs.append(value.tobytes())
            elif isinstance(value, (list, tuple)):
                tokens.update(str(v) for v in value)
    blob = b"\x00".join(blobs)
    found = {u for u in ids if u in tokens or (len(u) >= 4 and u.encode("utf-8") in blob)}
    return len(found) / len(ids)


def changed_rows(before: np.ndarray, after: np.ndarray, *, tol: float = 0.0) -> np.ndarray:
    """Indices of embedding rows that differ by more than ``tol`` (the rows a shop's update touched)."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"embedding tables must be equal-shape 2-D arrays; got {before.shape} and {after.shape}")
    return np.flatnonzero(np.abs(after - before).max(axis=1) > tol)


def product_leakage(before: np.ndarray, after: np.ndarray, sold_rows: Iterable[int], *,
                    tol: float = 0.0, ignore_rows: Iterable[int] = (0,)) -> dict[str, float]:
    """How much of a shop's sold-product set an observer reads from changed global-product embedding rows.

    recall: share of the shop's sold product rows that changed (readable at all);
    precision: share of changed rows that are the shop's (attributable to it: 1 for an individual
    update, |own|/|union| under SecAgg, about |own|/|all rows| when DP noise moves every row).
    """
    ignore = set(int(r) for r in ignore_rows)
    sold = {int(r) for r in sold_rows} - ignore
    changed = set(changed_rows(before, after, tol=tol).tolist()) - ignore
    hit = len(sold & changed)
    return {"recall": hit / len(sold) if sold else 0.0,
            "precision": hit / len(changed) if changed else 0.0,
            "changed_rows": float(len(changed)), "sold_rows": float(len(sold))}
