"""The transfer report's explanations come from measured overlap and test-split size."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from shared.metrics import auc_standard_error
from simulations.join_diagnostics import explain_miss, join_diagnostics, seen_share


def _shop(item_cat, item_key, user_cat, clicked=(0, 1, 0, 0)) -> SimpleNamespace:
    pad = lambda rows: torch.tensor([[0] * len(rows[0])] + rows)  # noqa: E731  index 0 is padding
    clicked_t = torch.tensor(clicked)
    return SimpleNamespace(item_cat=pad(item_cat), item_key=torch.tensor([0, *item_key]), user_cat=pad(user_cat),
                           rows={"test": {"user": torch.zeros(len(clicked), dtype=torch.long), "clicked": clicked_t}})


def test_hanley_mcneil_error_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(400):
        pos, neg = rng.normal(1.2, 1, 40), rng.normal(0, 1, 400)
        aucs.append(roc_auc_score(np.r_[np.ones(40), np.zeros(400)], np.r_[pos, neg]))
    se = auc_standard_error(float(np.mean(aucs)), 40, 400)
    assert abs(se - np.std(aucs)) / np.std(aucs) < 0.25
    assert np.isnan(auc_standard_error(0.7, 0, 10))


def test_seen_share_counts_only_what_the_federation_has() -> None:
    fed = [_shop([[5, 6, 7]], [100], [[1, 2]])]
    joiner = _shop([[5, 9, 0], [8, 9, 0]], [100, 0], [[1, 3]])
    share = seen_share(joiner, fed)
    assert share["item_fields_seen"] == 1 / 4  # values 5, 9, 8, 9: only 5 is known
    assert share["product_keys_seen"] == 1.0  # its only key, 100, is known
    assert share["user_fields_seen"] == 0.5
    ids_only = _shop([[0, 0, 0]], [0], [[0, 0]])
    assert seen_share(ids_only, fed) == {"item_fields_seen": None, "product_keys_seen": None,
                                         "user_fields_seen": None}


def test_explanation_names_the_cause_and_the_noise() -> None:
    fed = [_shop([[5, 6, 7]], [100], [[1, 2]])]
    disjoint = join_diagnostics(_shop([[8, 9, 0]], [200], [[1, 2]], clicked=(1,) * 20 + (0,) * 480), fed)
    text = explain_miss(-0.06, 0.78, disjoint)
    assert "misses by 0.060" in text and "20 clicks" in text
    assert "0% of its item category/brand values" in text and "0% of its product keys" in text
    assert "user side-field" not in text  # those it shares with the federation
    ids_only = join_diagnostics(_shop([[0, 0, 0]], [0], [[0, 0]], clicked=(1,) * 20 + (0,) * 480), fed)
    chance = explain_miss(0.05, 0.51, ids_only)
    assert chance.startswith("reaches it") and "at chance" in chance and "no product keys" in chance
