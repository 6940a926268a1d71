"""Why early-round CTR AUC was below 0.5: each shop of a world trained alone for one epoch, with and without the prior.

For every training shop: test CTR AUC of the untrained model, then after one local epoch (no Flower, no personal
mix) its train/val/test AUC, the mean logit against the log-odds of the shop's CTR, the Spearman correlation of
the logit with a field-frequency score (sum over the row's shared fields of log(1 + training count)), and the AUC
of the item's training impression count on train and test (a popularity shift between the splits would show
there). Arm ``prior``: the CTR/CVR towers start at the shop's base-rate log-odds (`shared.model.prior_logits`);
arm ``zero``: they start at 0 (`model.tower_prior`, default "zero"). The reported AUC is checked against
sklearn on the scores.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ctr_first_epoch.py --seeds 0,1 \\
        --out benchmarks/results/ctr_first_epoch.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _scores(model: Any, rows: dict) -> np.ndarray:
    """CTR logits of impression rows (eval mode, no gradients)."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model.impression_logits(rows, model.all_items())["ctr"].numpy()
    model.train()
    return out


def shop_figures(shop: Any, scenario: Any, seed: int) -> dict[str, Any] | None:
    """One shop's figures (see the module docstring), or None when it has no CTR task."""
    import torch
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from shared.features import build_shop_tensors
    from shared.model import build_model
    from shared.train import evaluate_shop, train_shop

    tensors = build_shop_tensors(shop, scenario.features)
    if "ctr" not in tensors.tasks:
        return None
    model = build_model(tensors, scenario.model, scenario.features, seed=seed)
    train = tensors.rows["train"]
    ctr = float(train["clicked"].double().mean())

    def fields(rows: dict) -> np.ndarray:
        return torch.cat([model.user_cat[rows["user"]], model.item_cat[rows["item"]], rows["ctx_cat"]], 1).numpy()

    counts = np.bincount(fields(train).ravel()).astype(float)
    counts[0] = 0
    item_counts = np.bincount(train["item"].numpy(), minlength=tensors.n_items).astype(float)
    out: dict[str, Any] = {"shop": shop.name, "train_rows": int(len(train["clicked"])), "ctr": round(ctr, 4),
                           "logit_ctr": round(math.log(ctr / (1 - ctr)), 3)}
    test = tensors.rows["test"]
    out["untrained_test_auc"] = round(roc_auc_score(test["clicked"].numpy(), _scores(model, test)), 4)
    train_shop(model, tensors, replace(scenario.train, epochs=1, seed=seed * 1000 + 1))
    for split in ("train", "val", "test"):
        rows = tensors.rows[split]
        y, s = rows["clicked"].numpy(), _scores(model, rows)
        auc = roc_auc_score(y, s)
        reported = evaluate_shop(model, tensors, split, tasks=["ctr"])["ctr"]["auc"]
        if abs(reported - auc) > 1e-5:  # the report scores float32 sigmoids: a few near ties
            raise AssertionError(f"{shop.name} {split}: reported AUC {reported} != sklearn {auc}")
        f = fields(rows)
        freq = (np.log1p(np.take(counts, np.minimum(f, len(counts) - 1))) * (f > 0)).sum(1)
        out[f"{split}_auc"] = round(auc, 4)
        out[f"{split}_mean_logit"] = round(float(s.mean()), 3)
        out[f"{split}_rho_logit_field_freq"] = round(float(spearmanr(s, freq)[0]), 3)
        out[f"{split}_item_count_auc"] = round(roc_auc_score(y, item_counts[rows["item"].numpy()]), 4)
    return out


def run(seed: int, arm: str) -> list[dict[str, Any]]:
    """Every training shop of the default world at ``seed`` under one arm ('prior' or 'zero')."""
    import torch

    from shared.scenario import load_scenario

    torch.set_num_threads(1)
    scenario = load_scenario("default", {"seed": seed, "model.tower_prior": "base-rate" if arm == "prior" else "zero"})
    figures = [shop_figures(shop, scenario, seed) for shop in scenario.training_shops()]
    return [dict(f, seed=seed, arm=arm) for f in figures if f is not None]


def main() -> None:
    """Run both arms in fresh processes and write the JSON."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ctr_first_epoch.json")
    args = parser.parse_args()
    jobs = [(int(s), arm) for s in args.seeds.split(",") for arm in ("zero", "prior")]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        results = list(pool.map(run, *zip(*jobs, strict=True)))
    rows = [r for part in results for r in part]
    for (seed, arm), part in zip(jobs, results, strict=True):
        print(f"seed {seed} {arm:5s}: mean untrained test AUC {np.mean([r['untrained_test_auc'] for r in part]):.3f}; "
              f"after 1 epoch train {np.mean([r['train_auc'] for r in part]):.3f} "
              f"test {np.mean([r['test_auc'] for r in part]):.3f}; "
              f"shops with test AUC < 0.5: {sum(r['test_auc'] < 0.5 for r in part)}/{len(part)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "shops": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
