"""In-process A/B of two trees' trainers: CPU per step of one task mix, interleaved in short chunks.

`local_throughput.py --baseline-ref` runs each arm in its own process for a few hundred steps; on the
shared 2-core machine other jobs move a 10-20 s measurement by +-15%, more than a few-percent change.
Here both trees' trainers live in one process (the baseline tree's `shared` package is imported first and
set aside under its own module objects, then the current tree's is imported), and the arms alternate in
chunks of ``--chunk`` steps (~1-2 s) in mirrored order, so load drift hits both alike. The ratio is
baseline CPU per step over current CPU per step (above 1: the current tree is faster).

    git archive e499819 | tar -x -C /tmp/base
    .venv/bin/python benchmarks/trainer_ab.py /tmp/base . --tasks ctr cvr ranking sales --rounds 12
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch


def load_trainer(tree: Path, tasks: list[str], scenario: str) -> Callable[[int], None]:
    """A closure running ``n`` training steps of ``tree``'s trainer on its own model of the largest shop.

    The tree's `shared` modules are removed from `sys.modules` afterwards (the closure keeps its own), so
    the next tree imports its own package.
    """
    sys.path.insert(0, str(tree))
    try:
        scen = importlib.import_module("shared.scenario")
        features = importlib.import_module("shared.features")
        model_mod = importlib.import_module("shared.model")
        train_mod = importlib.import_module("shared.train")
        sc = scen.load_scenario(scenario)
        # The largest training shop, as benchmarks/throughput_child.py picks it (older trees lack that file).
        tensors = features.build_shop_tensors(max(sc.training_shops(), key=lambda s: len(s.interactions)),
                                              sc.features)
        shop = replace(tensors, tasks=list(tasks))
        model = model_mod.build_model(shop, sc.model, sc.features, seed=sc.seed)
        cfg = replace(sc.train, epochs=10_000, seed=sc.seed)
        train = train_mod.train_shop
        train(model, shop, replace(cfg, max_steps=10))  # warm-up
        if Path(train_mod.__file__).resolve().parents[1] != tree.resolve():
            raise RuntimeError(f"trainer_ab: imported {train_mod.__file__}, not from {tree}")
    finally:
        for name in [n for n in sys.modules if n == "shared" or n.startswith("shared.")]:
            del sys.modules[name]
        sys.path.remove(str(tree))
    return lambda n: train(model, shop, replace(cfg, max_steps=n))


def main(argv: list[str] | None = None) -> None:
    """Alternate the two trees' trainers and print (and optionally write) CPU ms per step and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="tree of the baseline (e.g. a git archive export)")
    parser.add_argument("current", type=Path, help="tree of the current code")
    parser.add_argument("--tasks", nargs="+", default=["ctr", "cvr", "ranking", "sales"])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--rounds", type=int, default=12, help="chunks per arm")
    parser.add_argument("--chunk", type=int, default=60, help="steps per chunk")
    parser.add_argument("--out", type=Path, help="JSON result path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    arms = {"baseline": load_trainer(args.baseline, args.tasks, args.scenario),
            "current": load_trainer(args.current, args.tasks, args.scenario)}
    ms: dict[str, list[float]] = {a: [] for a in arms}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for arm in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
            cpu = time.process_time()
            arms[arm](args.chunk)
            ms[arm].append((time.process_time() - cpu) / args.chunk * 1000)
        load.append(os.getloadavg()[0])
    ratios = [b / c for b, c in zip(ms["baseline"], ms["current"], strict=True)]
    out = {"tasks": args.tasks, "baseline": str(args.baseline), "current": str(args.current), "chunk": args.chunk,
           "ms_per_step": ms, "median_ms": {a: statistics.median(v) for a, v in ms.items()},
           "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
           "loadavg_1min": [min(load), max(load)]}
    print(f"{'+'.join(args.tasks)}: CPU ms/step baseline {out['median_ms']['baseline']:.2f}, current "
          f"{out['median_ms']['current']:.2f}; baseline/current median {out['ratio_median']:.3f} "
          f"(pairs {min(ratios):.3f}-{max(ratios):.3f}), load {min(load):.1f}-{max(load):.1f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
