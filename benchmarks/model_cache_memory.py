"""Memory of the per-process model cache (client/model_cache.py): bytes per cached shop model.

Caches the models of the first ``--shops`` training shops of a scenario as a pool worker does after a
round (built, restored fresh, saved with the personal mix's own encoder, so the cache holds it too)
and reports, per model, the bytes the cache accounts (parameters, persistent buffers, own encoder)
and the growth of this process's resident memory (RSS, after garbage collection). Then extrapolates
to every shop of the scenario: the cache's whole footprint if one process held them all.

    .venv/bin/python benchmarks/model_cache_memory.py --scenario scale --shops 100
    .venv/bin/python benchmarks/model_cache_memory.py --scenario default

Writes benchmarks/results/model_cache_memory_<scenario>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """Resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Cache ``--shops`` models, print and write the per-model bytes and the extrapolation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--shops", type=int, default=0, help="shops to cache (0 = every training shop)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from flwr.app import Context, RecordDict

    from client import model_cache
    from client.local_state import Shop, restore_local_part, save_local_part
    from shared.features import build_shop_tensors
    from shared.scenario import load_scenario

    torch.set_num_threads(1)
    scenario = load_scenario(args.scenario)
    t0 = time.perf_counter()
    data = scenario.training_shops()
    world_s = time.perf_counter() - t0
    chosen = data[: args.shops or len(data)]
    tensors = [build_shop_tensors(d, scenario.features) for d in chosen]
    model_cache.clear()
    per_model, rss_growth = [], []
    with tempfile.TemporaryDirectory(prefix="fedshop-cache-mem-") as tmp:
        gc.collect()
        base = rss_bytes()
        for i, t in enumerate(tensors):
            shop = Shop(t.name, i, scenario, t, Path(tmp) / t.name)
            before_bytes, before_rss = model_cache.stats()["bytes"], rss_bytes()
            model = shop.round_model()
            context = Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={})
            restore_local_part(model, context, shop.state_dir, server_round=1, run="bench")
            save_local_part(model, context, shop.state_dir, shop=shop.name, server_round=1, keep_own_encoder=True,
                            run="bench")
            del model, context
            gc.collect()
            per_model.append(model_cache.stats()["bytes"] - before_bytes)
            rss_growth.append(rss_bytes() - before_rss)
        total_rss = rss_bytes() - base
    n_all = len(data)
    mean = statistics.mean(per_model)
    res = {"scenario": args.scenario, "shops_cached": len(per_model), "shops_in_scenario": n_all,
           "accounted_bytes_mean": mean, "accounted_bytes_max": max(per_model),
           "accounted_bytes_min": min(per_model), "rss_growth_total_bytes": total_rss,
           "rss_growth_per_model_bytes": total_rss / len(per_model),
           "extrapolated_all_shops_accounted_bytes": mean * n_all,
           "extrapolated_all_shops_rss_bytes": total_rss / len(per_model) * n_all,
           "default_budget_mb_per_process": model_cache.DEFAULT_BUDGET_MB, "world_seconds": world_s,
           "loadavg": os.getloadavg()}
    mib = 2**20
    print(f"{args.scenario}: {len(per_model)} of {n_all} shops cached; per model: accounted {mean / mib:.3f} MiB "
          f"(min {min(per_model) / mib:.3f}, max {max(per_model) / mib:.3f}), RSS growth "
          f"{total_rss / len(per_model) / mib:.3f} MiB; all {n_all} shops: accounted {mean * n_all / mib:.0f} MiB, "
          f"RSS ~{total_rss / len(per_model) * n_all / mib:.0f} MiB (load {os.getloadavg()[0]:.1f})")
    out = args.out or ROOT / "benchmarks" / "results" / f"model_cache_memory_{args.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
