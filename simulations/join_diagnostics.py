"""Why a late joiner transfers well or badly: what of it the federation has seen, and how noisy its test is.

The transfer report uses these figures to say plainly why a target is missed: an item category or
product key no training shop has has an untrained embedding in the shared encoder, a joiner without
side fields gets nothing from the field embeddings, and a test split with few clicks cannot resolve
small AUC differences (Hanley & McNeil's standard error says how small).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from shared.features import ShopTensors
from shared.metrics import auc_standard_error


def _values(table: torch.Tensor) -> set[int]:
    return set(np.unique(table.numpy().ravel()).tolist()) - {0}


def seen_share(joiner: ShopTensors, federation: list[ShopTensors]) -> dict[str, float | None]:
    """Shares of the joiner's item field values, product keys and user field values that occur in the federation.

    Item-weighted for item fields and keys (share of the joiner's items whose value the federation has
    seen), None when the joiner has no such field at all.
    """
    fed_item = set().union(*(_values(t.item_cat) for t in federation))
    fed_key = set().union(*(_values(t.item_key) for t in federation))
    fed_user = set().union(*(_values(t.user_cat) for t in federation))
    out: dict[str, float | None] = {}
    cat = joiner.item_cat[1:].numpy()  # index 0 is padding
    present = cat > 0
    out["item_fields_seen"] = (float(np.isin(cat, list(fed_item))[present].mean()) if present.any() else None)
    key = joiner.item_key[1:].numpy()
    out["product_keys_seen"] = float(np.isin(key[key > 0], list(fed_key)).mean()) if (key > 0).any() else None
    ucat = joiner.user_cat[1:].numpy()
    out["user_fields_seen"] = (float(np.isin(ucat, list(fed_user))[ucat > 0].mean()) if (ucat > 0).any() else None)
    return out


def join_diagnostics(joiner: ShopTensors, federation: list[ShopTensors]) -> dict[str, Any]:
    """Overlap with the federation plus the size of the joiner's test split (clicks and impressions)."""
    test = joiner.rows["test"]
    clicks = int(test["clicked"].sum()) if "clicked" in test else 0
    return {**seen_share(joiner, federation), "test_impressions": int(test["user"].shape[0]),
            "test_clicks": clicks}


def explain_miss(gap: float, scratch_full: float, diag: dict[str, Any]) -> str:
    """One plain sentence on a late joiner's f=0.25 result, built from measured figures only."""
    n_pos, n_all = diag.get("test_clicks", 0), diag.get("test_impressions", 0)
    se = auc_standard_error(scratch_full, n_pos, n_all - n_pos)
    verdict = "reaches it" if gap >= 0 else f"misses by {-gap:.3f}"
    parts = [f"{verdict} (test split {n_all} impressions, {n_pos} clicks: one AUC has s.e. ~{se:.3f})"]
    if math.isfinite(scratch_full) and abs(scratch_full - 0.5) < 2 * se:
        parts.append(f"scratch at f = 1 is itself at chance ({scratch_full:.3f}), so there is no full-data bar to "
                     "reach")
    for key, label in (("item_fields_seen", "item category/brand values"), ("product_keys_seen", "product keys"),
                       ("user_fields_seen", "user side-field values")):
        share = diag.get(key)
        if share is None:
            parts.append(f"it has no {label}, so those encoder embeddings give it nothing")
        elif share < 0.5:
            parts.append(f"the federation saw only {share:.0%} of its {label}: their embeddings in the shared "
                         "encoder are untrained for it")
    return "; ".join(parts)
