"""Metrics against hand-computed values, tie handling, degenerate inputs and large-catalog chunking."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from shared.metrics import (
    best_f1_threshold,
    binary_metrics,
    regression_metrics,
    sampled_rank_metrics,
    thresholded_metrics,
    topk_metrics,
)

INV_LOG2_3 = 1.0 / math.log2(3)  # discount of rank position 1 (0-based)

# ----------------------------------------------------------------------------- binary


def test_binary_metrics_hand_computed() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    m = binary_metrics(y, s, threshold=0.5)
    # AUC: positive/negative pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4 ordered right.
    assert m["auc"] == pytest.approx(0.75)
    # logloss: mean of -log p(true label) = -(log .9 + log .6 + log .35 + log .8) / 4
    assert m["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4)
    # threshold 0.5 predicts [0, 0, 0, 1]: 3 of 4 right, 1 TP, 0 FP, 1 FN.
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert all(type(v) is float for v in m.values())


def test_binary_metrics_without_threshold_has_only_auc_and_logloss() -> None:
    assert set(binary_metrics([0, 1], [0.2, 0.7])) == {"auc", "logloss"}


def test_binary_auc_counts_ties_as_half() -> None:
    assert binary_metrics([0, 1], [0.5, 0.5])["auc"] == pytest.approx(0.5)


def test_binary_single_class_gives_nan_auc_but_finite_logloss() -> None:
    m = binary_metrics([1, 1, 1], np.array([0.9, 0.8, 0.5]), threshold=0.6)
    assert math.isnan(m["auc"])
    assert m["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3)
    assert m["recall"] == pytest.approx(2 / 3)


def test_binary_logloss_clips_certain_wrong_predictions() -> None:
    m = binary_metrics([1, 0], [0.0, 1.0])
    assert m["logloss"] == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_binary_empty_input_is_all_nan() -> None:
    m = binary_metrics([], [], threshold=0.5)
    assert set(m) == {"auc", "logloss", "accuracy", "precision", "recall", "f1"}
    assert all(math.isnan(v) for v in m.values())


def test_binary_accepts_torch_tensors() -> None:
    m = binary_metrics(torch.tensor([0.0, 1.0]), torch.tensor([0.3, 0.6]))
    assert m["auc"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 2], [0.1, 0.2], "binary labels"),
        ([0, 1, 1], [0.1, 0.2], "y_true has 3 values but y_score has 2"),
        ([0, 1], [0.1, float("nan")], "y_score contains NaN"),
    ],
)
def test_binary_rejects_bad_input(y: list, s: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, s)


def test_best_f1_threshold_hand_computed() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    # Candidate thresholds and F1: 0.8 -> P1 R.5 F.667; 0.4 -> P.5 R.5 F.5; 0.35 -> P2/3 R1 F.8; 0.1 -> P.5 R1 F.667.
    assert best_f1_threshold(y, s) == pytest.approx(0.35)


def test_best_f1_threshold_degenerate_labels() -> None:
    assert best_f1_threshold([1, 1, 1], [0.2, 0.6, 0.4]) == pytest.approx(0.2)  # predict all positive
    assert best_f1_threshold([0, 0], [0.2, 0.6]) == 0.5  # no positive: F1 undefined, default threshold


# ----------------------------------------------------------------------------- full-catalog top-k


def test_topk_hand_computed_with_exclusion_and_user_without_positives() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
        ]
    )
    positives = [np.array([2, 3]), np.array([5]), np.array([], dtype=np.int64)]
    exclude = [np.array([0]), np.array([], dtype=np.int64), np.array([1])]
    m = topk_metrics(scores, positives, k=3, exclude=exclude)
    # user 0, item 0 excluded: ranking 2,4,3 -> hits at positions 0 and 2, DCG 1 + 1/log2(4) = 1.5,
    #   IDCG over min(3, 2) = 2 positives = 1 + 1/log2(3); recall 2/2.
    # user 1: top 3 = 0,1,2, positive 5 missed -> 0 everywhere. user 2 has no positive: not averaged.
    assert m["hr@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx((1.5 / (1 + INV_LOG2_3)) / 2)
    assert m["recall@3"] == pytest.approx(0.5)


def test_topk_ties_are_pessimistic() -> None:
    flat = np.zeros((1, 5))
    # All scores equal: the 4 non-positives outrank the positive.
    assert topk_metrics(flat, [np.array([0])], k=2)["hr@2"] == 0.0
    # 4 tied positives, 1 tied negative: order neg, pos -> one hit at position 1.
    m = topk_metrics(flat, [np.array([0, 1, 2, 3])], k=2)
    assert m["hr@2"] == 1.0
    assert m["ndcg@2"] == pytest.approx(INV_LOG2_3 / (1 + INV_LOG2_3))
    assert m["recall@2"] == pytest.approx(1 / 4)


def test_topk_ties_at_the_cutoff_and_above_it() -> None:
    s = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    # Item 0 sits above the cut; items 1..3 tie at the k-th value and the 2 tied negatives come first.
    m = topk_metrics(s, [np.array([0, 3])], k=2)
    assert (m["hr@2"], m["ndcg@2"], m["recall@2"]) == pytest.approx((1.0, 1 / (1 + INV_LOG2_3), 0.5))
    assert topk_metrics(s, [np.array([1])], k=2)["hr@2"] == 0.0
    # A tie inside the top k (items 0 and 1 at 0.9): the positive goes second whatever its index.
    s2 = np.array([[0.9, 0.9, 0.5, 0.1]])
    for pos in (0, 1):
        m2 = topk_metrics(s2, [np.array([pos])], k=3)
        assert m2["ndcg@3"] == pytest.approx(INV_LOG2_3)


def test_topk_k_larger_than_catalog_and_exclusion_leaving_few_candidates() -> None:
    m = topk_metrics(np.array([[0.3, 0.2, 0.1]]), [np.array([1])], k=10)
    assert (m["hr@10"], m["ndcg@10"], m["recall@10"]) == pytest.approx((1.0, INV_LOG2_3, 1.0))
    # Items 0, 1 excluded (one of them a positive that can no longer be hit); 3 ranks first of the two left.
    m = topk_metrics(np.array([[0.9, 0.8, 0.1, 0.2]]), [np.array([0, 3])], k=3, exclude=[np.array([0, 1])])
    assert (m["hr@3"], m["ndcg@3"], m["recall@3"]) == pytest.approx((1.0, 1 / (1 + INV_LOG2_3), 0.5))
    # The only positive is excluded: it fills the third slot at -inf but must not count as a hit.
    assert topk_metrics(np.array([[0.9, 0.1, 0.2]]), [np.array([0])], k=3, exclude=[np.array([0])])["hr@3"] == 0.0


def test_topk_accepts_sparse_and_torch_inputs() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((20, 50))
    pos = [rng.choice(50, size=rng.integers(0, 4), replace=False) for _ in range(20)]
    exc = [rng.choice(50, size=5, replace=False) for _ in range(20)]
    exc = [np.setdiff1d(e, p) for e, p in zip(exc, pos, strict=True)]

    def to_csr(lists: list[np.ndarray]) -> sp.csr_matrix:
        rows = np.concatenate([np.full(len(x), u) for u, x in enumerate(lists)])
        cols = np.concatenate(lists)
        return sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(20, 50))

    ref = topk_metrics(scores, pos, k=5, exclude=exc)
    assert topk_metrics(torch.from_numpy(scores).float(), to_csr(pos), k=5, exclude=to_csr(exc)) == (pytest.approx(ref))


def _brute_force_topk(scores: np.ndarray, pos: list[np.ndarray], exc: list[np.ndarray], k: int) -> dict:
    """Reference: full argsort per user (valid without ties)."""
    hr, ndcg, rec = [], [], []
    for u in range(scores.shape[0]):
        s = scores[u].astype(np.float64).copy()
        s[exc[u]] = -np.inf
        top = np.argsort(-s)[:k]
        rel = np.isin(top, pos[u])
        dcg = (rel / np.log2(np.arange(k) + 2)).sum()
        idcg = (1 / np.log2(np.arange(min(k, len(pos[u]))) + 2)).sum()
        hr.append(rel.any())
        ndcg.append(dcg / idcg)
        rec.append(rel.sum() / len(pos[u]))
    return {f"hr@{k}": np.mean(hr), f"ndcg@{k}": np.mean(ndcg), f"recall@{k}": np.mean(rec)}


def test_topk_100k_items_in_user_chunks_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items = 100, 100_000
    scores = rng.standard_normal((n_users, n_items), dtype=np.float32)
    pos = [rng.choice(n_items, size=rng.integers(1, 30), replace=False) for _ in range(n_users)]
    for u in range(0, n_users, 3):  # plant some positives near the top so metrics are not all zero
        scores[u, pos[u][0]] = 10.0
    exc = [np.setdiff1d(rng.choice(n_items, size=50, replace=False), pos[u]) for u in range(n_users)]
    ref = _brute_force_topk(scores, pos, exc, k=10)
    got = topk_metrics(scores, pos, k=10, exclude=exc)  # default budget -> 2 chunks of users
    assert got == pytest.approx(ref)
    assert got["hr@10"] > 0.3
    small = topk_metrics(scores[:10], pos[:10], k=10, exclude=exc[:10], max_chunk_elements=n_items * 3)
    assert small == pytest.approx(_brute_force_topk(scores[:10], pos[:10], exc[:10], k=10))


def test_topk_no_user_with_positives_is_nan() -> None:
    m = topk_metrics(np.ones((2, 4)), [np.array([], dtype=np.int64)] * 2, k=2)
    assert set(m) == {"hr@2", "ndcg@2", "recall@2"}
    assert all(math.isnan(v) for v in m.values())


def test_topk_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"positives\[1\] holds item index outside \[0, 3\)"):
        topk_metrics(np.ones((2, 3)), [np.array([0]), np.array([3])])
    with pytest.raises(ValueError, match="positives has 1 users but scores have 2 rows"):
        topk_metrics(np.ones((2, 3)), [np.array([0])])
    with pytest.raises(ValueError, match="NaN"):
        topk_metrics(np.array([[0.1, np.nan]]), [np.array([0])])
    with pytest.raises(ValueError, match="matrix"):
        topk_metrics(np.ones(3), [np.array([0])])


# ----------------------------------------------------------------------------- sampled leave-one-out


def test_sampled_rank_hand_computed_with_ties() -> None:
    pos = np.array([0.5, 0.5, 0.2])
    neg = np.array([[0.1, 0.6, 0.5], [0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    # Ranks (#neg >= pos, a tie counts against the positive): 2, 0, 3.
    m2 = sampled_rank_metrics(pos, neg, k=2)
    assert m2 == pytest.approx({"hr@2": 1 / 3, "ndcg@2": 1 / 3})  # only user 1 (rank 0, gain 1)
    m3 = sampled_rank_metrics(torch.tensor(pos), torch.tensor(neg), k=3)
    # users 0 (rank 2, gain 1/log2(4) = 0.5) and 1 (gain 1) hit.
    assert m3 == pytest.approx({"hr@3": 2 / 3, "ndcg@3": 1.5 / 3})


def test_sampled_rank_all_tied_never_hits_at_one() -> None:
    assert sampled_rank_metrics(np.zeros(4), np.zeros((4, 99)), k=1)["hr@1"] == 0.0


def test_sampled_rank_empty_and_bad_shapes() -> None:
    m = sampled_rank_metrics(np.zeros(0), np.zeros((0, 99)))
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match=r"shape \(2, n_neg\)"):
        sampled_rank_metrics(np.zeros(2), np.zeros((3, 5)))


# ----------------------------------------------------------------------------- regression


def test_regression_hand_computed() -> None:
    y = [0, 2, 4]
    p = [1, 2, 1]
    m = regression_metrics(y, p)
    # errors -1, 0, 3
    assert m["rmse"] == pytest.approx(math.sqrt(10 / 3))
    assert m["mae"] == pytest.approx(4 / 3)
    assert m["wape"] == pytest.approx(4 / 6)
    # unit deviance 2 (y log(y/p) - y + p): y=0,p=1 -> 2; y=p=2 -> 0; y=4,p=1 -> 2 (4 ln 4 - 3)
    assert m["poisson_deviance"] == pytest.approx((2 + 0 + 2 * (4 * math.log(4) - 3)) / 3)


def test_regression_edge_cases() -> None:
    assert math.isnan(regression_metrics([0, 0], [1, 2])["wape"])  # sum |y| = 0
    assert math.isnan(regression_metrics([-1, 2], [1, 2])["poisson_deviance"])  # not counts
    assert math.isfinite(regression_metrics([0, 1], [0, 0])["poisson_deviance"])  # zero predictions clipped
    assert all(math.isnan(v) for v in regression_metrics([], []).values())
    with pytest.raises(ValueError, match="y_pred has 1"):
        regression_metrics([1, 2], [1])


def test_thresholded_metrics_are_sklearns_floats_bit_for_bit():
    """The counting path gives exactly sklearn's accuracy/precision/recall/F1 (zero_division=0), edge cases included."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(7)
    for _ in range(400):
        n = int(rng.choice([1, 2, 5, 97, 1000]))
        labels = (rng.random(n) < rng.choice([0.0, 0.02, 0.5, 1.0])).astype(np.int64)
        scores = rng.random(n)
        thr = float(rng.choice([0.0, 0.3, 0.999, 2.0]))
        pred = (scores >= thr).astype(np.int64)
        want = {"accuracy": skm.accuracy_score(labels, pred),
                "precision": skm.precision_score(labels, pred, zero_division=0),
                "recall": skm.recall_score(labels, pred, zero_division=0),
                "f1": skm.f1_score(labels, pred, zero_division=0)}
        got = thresholded_metrics(labels, scores >= thr)
        assert got == {k: float(v) for k, v in want.items()}
