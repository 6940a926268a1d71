"""`privacy.md` and `privacy.json`: the tables of every privacy attack and the privacy-utility rows."""

from __future__ import annotations

import json
from pathlib import Path

from shared.atomic import atomic_write_text
from shared.privacy.attacks import AttackResult
from simulations.privacy.utility import plot_utility


def _fmt_attack(res: AttackResult) -> str:
    return (f"{res.auc:.3f} [{res.auc_ci[0]:.3f}, {res.auc_ci[1]:.3f}] | {res.tpr_at_1pct:.3f} "
            f"[{res.tpr_at_1pct_ci[0]:.3f}, {res.tpr_at_1pct_ci[1]:.3f}] | {res.tpr_at_01pct:.3f}")


def write_report(run_dir: Path, prop: dict[str, object], mia: dict[str, object],
                 ids: dict[str, float] | None = None, utility: list[dict[str, object]] | None = None) -> Path:
    """`privacy.md` (tables) and `privacy.json` (all numbers) in the run directory."""
    lines = ["# Privacy evaluation", "", "## Membership inference (user level)", "",
             f"Shop `{mia['shop']}`: {mia['members']} member users, {mia['nonmembers']} non-member users.", "",
             "| training | attack | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR |", "|---|---|---|---|---|"]
    for key, value in mia.items():
        if isinstance(value, AttackResult):
            mode, attack = key.split("/")
            lines.append(f"| {mode} | {attack} | {_fmt_attack(value)} |")
    rep = mia.get("dpsgd_report", {})
    lines += ["", f"DP-SGD: {rep}. ROC points above e^eps*FPR+delta (must be 0): {mia.get('dp_violations')}.", "",
              "## Property inference from individual encoder updates", "",
              f"Property: {prop['property']} of {prop['n_shops']} target shops (classes {prop['classes']}, "
              f"counts {prop['target_class_counts']}). Meta-classifier (gradient-boosted trees) trained on "
              f"{prop['n_shadow_shops']} shadow shops of an independently drawn world (seed "
              f"{prop['shadow_world_seed']}) from features of the first-order (wide) rows of the public category "
              "buckets. AUC = one-vs-rest macro AUC over categories; pooled = binary 'is category c dominant' "
              "over all (shop, c) pairs; 95% CIs bootstrap over target shops. Update L2 norms (min, median, max): "
              f"{', '.join(f'{v:.3g}' for v in prop['update_l2_norm'])}; share above the clipping norm: "
              f"{prop['share_clipped']:.2f}.", "",
              "| coordinator sees | macro AUC [95% CI] | pooled AUC [95% CI] | top-1 (majority guess) |",
              "|---|---|---|---|"]
    for name, r in prop["attacks"].items():
        lines.append(f"| {name} | {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | "
                     f"{r['pooled_auc']:.3f} [{r['pooled_auc_ci'][0]:.3f}, {r['pooled_auc_ci'][1]:.3f}] | "
                     f"{r['top1']:.2f} ({r['top1_chance']:.2f}) |")
    lines += ["", "## Sold products readable from global-product embedding rows", "",
              "| protection | recall (share of sold products readable) | precision (attributable to the shop) |",
              "|---|---|---|"]
    for name, v in prop["product_leakage"].items():
        lines.append(f"| {name} | {v['recall']:.3f} | {v['precision']:.3f} |")
    if ids is not None:
        lines += ["", "## User IDs in outgoing messages", "",
                  f"Share of {int(ids['user_ids'])} user IDs found in any reply: plain round {ids['plain']:.3f} "
                  f"({int(ids['plain_replies'])} replies), SecAgg+ round {ids['secagg']:.3f} "
                  f"({int(ids['secagg_replies'])} replies, train and evaluate). "
                  + ("Zero, as the design requires; every byte of every reply was scanned."
                     if ids["plain"] == 0 and ids["secagg"] == 0 else "**Not zero: user IDs left a shop (a bug).**")]
    if utility:
        plot_utility(utility, Path(run_dir) / "privacy_utility.png")
        lines += ["", "## Privacy-utility", "",
                  "Mean over shops of the test-split metric; epsilon is shop-level (Flower's RDP accountant, every "
                  "shop in every round, no sampling amplification; inf = no DP). 'local only' trains each shop "
                  "alone for the same number of epochs: nothing leaves it.", "",
                  "| protection | z | epsilon | delta | rounds | metric (test) | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in utility:
            lines.append(f"| {r['protection']} | {r['noise_multiplier']} | {r['epsilon']:.3g} | {r['delta']:g} | "
                         f"{r['rounds']} | {r['metric']} = {r['value']:.4f} | {r.get('seconds', float('nan')):.0f} |")
        lines += ["", "'SecAgg+ and central DP' rows are composed in the evaluation (fedshop's runtime refuses the "
                  "pair): shops clip their updates to S, a real SecAgg+ round averages them, the coordinator adds "
                  "N(0, (zS/n)^2); same z, S, shops and rounds as the central-DP rows, hence the same epsilon. "
                  "'SecAgg+ (composed, clipped)' is that loop with z = 0.",
                  "", "![privacy-utility](privacy_utility.png)"]
    path = atomic_write_text(Path(run_dir) / "privacy.md", "\n".join(lines) + "\n")
    atomic_write_text(Path(run_dir) / "privacy.json", json.dumps(
        {"property": prop, "mia": {k: (v.as_dict() if isinstance(v, AttackResult) else v) for k, v in mia.items()},
         "user_ids": ids, "utility": utility},
        indent=2, default=str))
    return path
