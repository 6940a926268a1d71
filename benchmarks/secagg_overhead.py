"""SecAgg+ round-time overhead against plain FedAvg, and the rounding error it adds, for 8 and 32 shops.

Shops replay a fixed encoder update (no training), in one process over `InProcessGrid`, so the
numbers are the protocol's own cost: key agreement, secret sharing, masking, unmasking. Prints a
table and writes benchmarks/results/secagg_overhead.json.

    .venv/bin/python benchmarks/secagg_overhead.py [--shops 8 32] [--scenario default]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from server.secure import SecAggSettings
from server.server_app import initial_encoder
from shared.atomic import atomic_write_text
from shared.scenario import load_scenario
from simulations.privacy.eval_config import eval_overrides
from simulations.privacy.in_process_grid import InProcessGrid, nodes
from simulations.privacy.secagg_view import secagg_view


def _updates(initial: dict[str, np.ndarray], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(scale=0.01, size=v.shape) for k, v in initial.items()} for _ in range(n)]


def _fedavg_seconds(initial: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]]) -> tuple[float, dict]:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        u = updates[int(context.node_config["partition-id"])]
        rec = msg.content["arrays"]
        out = ArrayRecord({k: Array((rec[k].numpy() + u[k]).astype(np.float32)) for k in rec.keys()})
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = InProcessGrid(app, nodes(len(updates)))
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(updates), min_train_nodes=len(updates))
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v.astype(np.float32))
                                                                   for k, v in initial.items()}),
                            num_rounds=1, train_config=ConfigRecord({}))
    return time.perf_counter() - start, {k: a.numpy() for k, a in result.arrays.items()}


def main() -> None:
    """Measure and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shops", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--num-shares", type=float, nargs="+", default=[1.0, 7],
                        help="SecAgg+ neighbourhood: <= 1 share of shops (1.0 = all pairs), > 1 a count")
    parser.add_argument("--full-size", action="store_true", help="the scenario's own encoder (default: eval size)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg_overhead.json")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    scenario = load_scenario(args.scenario, None if args.full_size else eval_overrides(args.scenario))
    initial = {k: a.numpy().astype(np.float64) for k, a in initial_encoder(scenario).items()}
    n_params = int(sum(v.size for v in initial.values()))
    rows = []
    for n in args.shops:
        updates = _updates(initial, n, seed=n)
        plain_s, plain = _fedavg_seconds(initial, updates)
        exact = {k: initial[k] + np.mean([u[k] for u in updates], axis=0) for k in initial}
        plain_err = max(float(np.abs(plain[k] - exact[k]).max()) for k in exact)
        for shares in args.num_shares:
            if shares > 1 and shares >= n:
                continue
            # Threshold: 60% of each neighbourhood must survive (a count of 2 at least for tiny ones).
            secagg = SecAggSettings(num_shares=shares, reconstruction_threshold=0.6)
            with tempfile.TemporaryDirectory() as tmp:
                _, secure, secure_s = secagg_view(initial, updates, Path(tmp), secagg)
            err = max(float(np.abs(secure[k] - exact[k]).max()) for k in exact)
            rows.append({"shops": n, "params": n_params, "num_shares": shares, "fedavg_round_s": plain_s,
                         "secagg_round_s": secure_s, "overhead_x": secure_s / plain_s, "secagg_max_abs_error": err,
                         "fedavg_max_abs_error": plain_err, "quantum": secagg.quantisation_step()})
            print(f"{n:>4} shops  {n_params:>9} params  shares {shares:>4}  FedAvg {plain_s:7.2f}s  "
                  f"SecAgg+ {secure_s:7.2f}s  x{secure_s / plain_s:5.1f}  max |error| SecAgg+ {err:.2e} "
                  f"(FedAvg float32 {plain_err:.2e})")
    atomic_write_text(args.out, json.dumps({"scenario": args.scenario, "results": rows}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
