"""fedshop with a local-only fallback chosen on validation, from recorded compare runs (no training).

Why: with enough data of its own, the best a shop can expect from federating is about what it trains alone, and
on the default world the largest shop (shop_00) ends a little below local-only (docs/results-log.md, "maxloss").
A shop that also trains its local-only model can serve, per task, whichever of the two validates better: the
compare protocol's own rule (each shop's test metric at its best-validation round) with local-only's epochs
added to fedshop's rounds as candidates. Test is never used to choose. The method is called
``fedshop+fallback``; it costs each shop one local-only training beside its federated rounds.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/local_fallback.py RUN_DIR [RUN_DIR ...] [--out summary.json]

Each run directory is a `fedshop compare` run (or several, pooled as `fedshop pool` pools them: one scenario,
no (method, seed) twice) holding local and fedshop for every seed, and central for gap closed. Prints the
targets of fedshop and of fedshop+fallback, computed by the same `simulations.compare.summarize`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.atomic import atomic_write_text  # noqa: E402
from shared.scenario import scenario_from_dict  # noqa: E402
from simulations.best_rounds import PRIMARY  # noqa: E402
from simulations.compare import _plain, ctr_test_sizes, small_shops_of, summarize  # noqa: E402
from simulations.pool import Pool, load_pool, read_compare_run  # noqa: E402
from simulations.run_report import seeded_final_table  # noqa: E402

FALLBACK = "fedshop+fallback"


def fallback_rows(rows: pd.DataFrame, method: str = "fedshop") -> pd.DataFrame:
    """``method``'s rows plus local-only's as one candidate set named `FALLBACK` (local epochs as rounds -1, -2, ...).

    `simulations.best_rounds.final_table` then picks, per seed, shop and task, the best-validation candidate among
    both; a negative round in the result says local-only was chosen.
    """
    fed = rows[rows["method"] == method]
    local = rows[rows["method"] == "local"]
    if fed.empty or local.empty:
        raise ValueError(f"the runs hold no {'local' if local.empty else method} rows. Fix: pass compare runs with "
                         f"--methods local,{method} (central too for gap closed)")
    local = local.assign(round=-local["round"])
    return pd.concat([fed, local], ignore_index=True).assign(method=FALLBACK)


def load_runs(run_dirs: list[Path]) -> tuple[pd.DataFrame, dict[str, Any], list[int]]:
    """Metric rows (with seed), the recorded scenario table and the seeds of one run or of pooled runs."""
    if len(run_dirs) == 1:
        config, rows = read_compare_run(run_dirs[0])
        return rows, dict(config["scenario"]), sorted(int(s) for s in rows["seed"].unique())
    pool: Pool = load_pool(run_dirs)
    return pool.rows, pool.scenario, pool.seeds


def fallback_summaries(rows: pd.DataFrame, scenario: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """`summarize` for fedshop and for fedshop+fallback on the same rows, and how often local-only was picked."""
    scenarios = [scenario_from_dict(scenario, {"seed": s}) for s in seeds]
    both = pd.concat([rows, fallback_rows(rows)], ignore_index=True)
    final = seeded_final_table(both)
    small, sizes = small_shops_of(scenarios[0]), ctr_test_sizes(scenarios)
    out: dict[str, Any] = {"seeds": seeds}
    for method in ("fedshop", FALLBACK):
        out[method] = summarize(final[final["method"].isin(["local", "central", method])], small_shops=small,
                                method=method, ctr_sizes=sizes)
    picked = final[final["method"] == FALLBACK]
    picked = picked[picked["metric"] == picked["task"].map(lambda t: PRIMARY[t][0])]
    out["local_picked"] = {task: {shop: int((g["round"] < 0).sum()) for shop, g in grp.groupby("shop")}
                           for task, grp in picked.groupby("task")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the summaries here (JSON)")
    args = parser.parse_args()
    rows, scenario, seeds = load_runs(args.run_dirs)
    out = fallback_summaries(rows, scenario, seeds)
    for method in ("fedshop", FALLBACK):
        s = out[method]
        print(f"== {method} (seeds {seeds[0]}-{seeds[-1]}, {len(seeds)})")
        for task, entry in s["tasks"].items():
            worst = (entry.get("worse_shops") or [{}])[0]
            means = " ".join(f"{m} {v:.4f}" for m, v in entry["mean"].items())
            print(f"  {task} {entry['metric']}: {means}; gap closed {entry.get('gap_closed')}; max loss "
                  f"{entry.get('max_loss')} ({worst.get('shop')}, se seeds {worst.get('margin_se_seeds')}); "
                  f"small-shop gain {(entry.get('small_shop_gain') or {}).get(method)}")
        for name, t in s["targets"].items():
            print(f"  target {name}: {t['value']} {t['target']} met={t['met']}")
    print("local-only picked (seeds of", len(seeds), "):", json.dumps(out["local_picked"]))
    if args.out:
        atomic_write_text(args.out, json.dumps(_plain(out), indent=2))


if __name__ == "__main__":
    main()
