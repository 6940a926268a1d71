"""Privacy attacks used as evaluations: user-level membership inference, shadow-model property inference, ID leakage.

Everything here works on numbers an attacker could hold (per-user losses, encoder updates, outgoing
messages); training the models attacked is the caller's job (simulations/privacy/).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

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
    """ROC points whose TPR provably exceeds e^eps * FPR + delta (Clopper-Pearson bounds; non-empty = a bug).

    ``confidence`` holds for the whole curve: each point is tested at a Bonferroni-corrected level, so
    a correct DP claim raises a false alarm with probability at most 1 - confidence.
    """
    labels = np.asarray(is_member, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    fpr, tpr, _ = roc_curve(labels, scores)
    alpha = (1 - confidence) / (2 * len(fpr))
    bad = []
    for f, t in zip(fpr, tpr, strict=True):
        tp, fp = round(t * n_pos), round(f * n_neg)
        tpr_lo = stats.beta.ppf(alpha, tp, n_pos - tp + 1) if tp > 0 else 0.0
        fpr_hi = stats.beta.ppf(1 - alpha, fp + 1, n_neg - fp) if fp < n_neg else 1.0
        if tpr_lo > tpr_bound(float(fpr_hi), epsilon=epsilon, delta=delta):
            bad.append({"fpr": float(f), "tpr": float(t), "tpr_lower": float(tpr_lo), "fpr_upper": float(fpr_hi)})
    return bad


# ----------------------------------------------------------------------------- property inference
def category_features(wide_update: np.ndarray, top_rows: np.ndarray, leaf_rows: np.ndarray,
                      leaf_top: np.ndarray) -> np.ndarray:
    """Per-candidate features (T, 18) of one update: what its first-order rows say about each top category.

    ``wide_update`` is the update of a (buckets, tasks) first-order weight table; ``top_rows`` the
    bucket of each top-level category value, ``leaf_rows`` of each leaf, ``leaf_top`` each leaf's top
    index (public taxonomy + public hashing). For top category t: |update| of its row per task, the
    same relative to the largest top row (scale-free: survives clipping), its signed update, and the
    max / mean |update| and share of moved rows over its leaves. Adam moves every touched row by
    about lr per step, so single magnitudes say little; signs and the pattern across tasks carry the
    dominance signal (the sales column rises for categories that sell above the shop's average).
    """
    w = np.asarray(wide_update, np.float64)
    if w.ndim != 2:
        raise ValueError(f"wide_update must be a 2-D (buckets, tasks) table; got shape {w.shape}")
    top = w[np.asarray(top_rows)]  # (T, tasks)
    leaf = np.abs(w[np.asarray(leaf_rows)])  # (L, tasks)
    leaf_top = np.asarray(leaf_top)
    rel = np.abs(top) / (np.abs(top).max(axis=0, keepdims=True) + 1e-12)
    out = []
    for t in range(len(top)):
        mine = leaf[leaf_top == t]
        if not len(mine):
            mine = np.zeros((1, w.shape[1]))
        out.append(np.concatenate([np.abs(top[t]), rel[t], top[t], mine.max(0), mine.mean(0), (mine > 0).mean(0)]))
    return np.stack(out)


@dataclass(frozen=True)
class PropertyAttackResult:
    """Shadow-model property inference on target shops, with bootstrap 95% intervals over target shops."""

    auc: float  # one-vs-rest macro AUC over the candidate values (headline)
    auc_ci: tuple[float, float]
    pooled_auc: float  # binary "is value c the dominant one" over all (shop, c) pairs
    pooled_auc_ci: tuple[float, float]
    top1: float  # share of target shops whose highest-scored value is the true one
    top1_chance: float  # share of the most frequent value among targets (always guessing it)
    n_shadow: int
    n_target: int
    n_classes_scored: int

    def as_dict(self) -> dict[str, object]:
        """Flat dict for reports."""
        return asdict(self)


def rank_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half); the same number as sklearn's, without
    its per-call validation, which dominates thousands of bootstrap resamples."""
    truth = np.asarray(truth, bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    ranks = stats.rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro_auc(truth: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Mean over candidate values with both positive and negative shops of AUC(score_c, truth == c)."""
    aucs = [rank_auc(truth == c, scores[:, c]) for c in range(scores.shape[1]) if 0 < (truth == c).sum() < len(truth)]
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def shadow_property_attack(shadow_x: np.ndarray, shadow_y: np.ndarray, target_x: np.ndarray, target_y: np.ndarray,
                           *, seed: int = 0, n_boot: int = 500) -> PropertyAttackResult:
    """Meta-classifier property inference (Ganju et al. 2018; Melis et al. 2019) on per-candidate features.

    ``*_x`` are (shops, T, F) features (one row per candidate value, e.g. `category_features`),
    ``*_y`` the index of each shop's true value. One binary gradient-boosted classifier is trained on
    every (shadow shop, candidate) pair: "is this candidate the shop's dominant value"; it is
    shared by all candidates, so it learns what dominance looks like rather than per-value
    quirks. It scores every target (shop, candidate); the shadow and target shops must be disjoint.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: PLC0415 - only this attack needs it

    sx, tx = np.asarray(shadow_x, np.float64), np.asarray(target_x, np.float64)
    sy, ty = np.asarray(shadow_y, int), np.asarray(target_y, int)
    if sx.ndim != 3 or tx.ndim != 3 or sx.shape[1:] != tx.shape[1:]:
        raise ValueError(f"shadow and target features must be (shops, candidates, features) alike; got {sx.shape} "
                         f"and {tx.shape}")
    if len(sx) != len(sy) or len(tx) != len(ty):
        raise ValueError(f"features and labels differ in shop count: shadow {len(sx)}/{len(sy)}, "
                         f"target {len(tx)}/{len(ty)}")
    n_cand = sx.shape[1]
    if len(np.unique(sy)) < 2:
        raise ValueError("shadow shops need at least two different property values to train the meta-classifier")
    pair_y = (np.arange(n_cand)[None, :] == sy[:, None]).ravel()
    model = HistGradientBoostingClassifier(max_depth=3, max_iter=150, learning_rate=0.05, random_state=seed)
    model.fit(sx.reshape(-1, sx.shape[2]), pair_y)
    scores = model.predict_proba(tx.reshape(-1, tx.shape[2]))[:, 1].reshape(len(tx), n_cand)
    pair_truth = (np.arange(n_cand)[None, :] == ty[:, None])

    def stats_of(idx: np.ndarray) -> tuple[float, float]:
        return _macro_auc(ty[idx], scores[idx])[0], rank_auc(pair_truth[idx].ravel(), scores[idx].ravel())

    auc, n_scored = _macro_auc(ty, scores)
    pooled = float(roc_auc_score(pair_truth.ravel(), scores.ravel()))
    rng = np.random.default_rng(seed)
    boot = np.array([stats_of(rng.choice(len(ty), len(ty))) for _ in range(n_boot)])
    lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
    counts = np.bincount(ty, minlength=n_cand)
    return PropertyAttackResult(
        auc=auc, auc_ci=(float(lo[0]), float(hi[0])), pooled_auc=pooled, pooled_auc_ci=(float(lo[1]), float(hi[1])),
        top1=float(np.mean(scores.argmax(axis=1) == ty)), top1_chance=float(counts.max() / len(ty)),
        n_shadow=len(sx), n_target=len(tx), n_classes_scored=n_scored)


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
