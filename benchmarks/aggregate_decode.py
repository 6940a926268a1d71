"""Coordinator time to aggregate one round of train replies, and how many times it decodes their arrays.

Builds the scenario's initial encoder (default: 31 arrays, 6.8 MB float32), sends it to ``--replies``
shops through the real `ShopStrategy` (FedAvg inside, the default robust screens on), and answers
every message with an honest-looking update (every dense layer moved a little, 5% of embedding rows
changed), dense for `--mode none` or as the shop's wire delta (`shared.compression.encode_delta`) for
a compression mode. Times `aggregate_train` alone (`--repeat` times, fresh replies each time) and counts
the `np.load` calls it makes, i.e. array decodes (`flwr.app.Array.numpy`).

    .venv/bin/python benchmarks/aggregate_decode.py [--replies 32] [--repeat 3] [--modes none sparse-fp16]

Prints a table and writes benchmarks/results/aggregate_decode.json. Run it with another checkout on
PYTHONPATH to compare code versions on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from rich.console import Console
from rich.table import Table

from server.federation_common import initial_encoder
from server.robust import RobustSettings
from server.strategies import ShopStrategy, build_strategy
from server.wire import Wire
from shared.atomic import atomic_write_text
from shared.compression import encode_delta
from shared.scenario import load_scenario
from simulations.privacy.in_process_grid import InProcessGrid, nodes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "aggregate_decode.json"


def _update(base: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """An honest-looking trained encoder: small steps on dense layers and on 5% of embedding rows."""
    out = {}
    for k, b in base.items():
        step = np.zeros_like(b)
        if b.ndim == 2 and b.shape[0] > 1000:
            rows = rng.choice(b.shape[0], b.shape[0] // 20, replace=False)
            step[rows] = 0.01 * rng.standard_normal((rows.size, b.shape[1]), dtype=np.float32)
        else:
            step = 0.01 * rng.standard_normal(b.shape, dtype=np.float32)
        out[k] = (b + step).astype(b.dtype)
    return out


def _replies(sent: list[Message], base: dict[str, np.ndarray], mode: str, seed: int) -> list[Message]:
    """One reply per message: the update dense, or as its wire delta."""
    out = []
    for i, msg in enumerate(sent):
        new = _update(base, np.random.default_rng([seed, i]))
        arrays = new if mode == "none" else encode_delta(new, base, values="fp16")
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 1000 + 10 * i, "shop-index": i})})
        out.append(Message(content, reply_to=msg))
    return out


def measure(n: int, mode: str, repeat: int) -> dict[str, Any]:
    """Seconds per `aggregate_train` call and array decodes per call, for ``n`` replies in ``mode``."""
    encoder = initial_encoder(load_scenario("default"))
    base = {k: a.numpy() for k, a in encoder.items()}
    grid = InProcessGrid(app=None, node_configs=nodes(n))  # type: ignore[arg-type]  # no shop is ever called
    seconds, cpu, decodes = [], [], []
    real_load = np.load
    for r in range(repeat):
        strategy = ShopStrategy(build_strategy("fedavg", min_shops=2), min_shops=2, shop_name=lambda i: f"s{i}",
                                robust=RobustSettings(), wire=Wire(mode))
        sent = list(strategy.configure_train(1, ArrayRecord(dict(encoder)), ConfigRecord(), grid))
        for msg in sent:
            msg.metadata.__dict__["_message_id"] = f"m{r}-{msg.metadata.dst_node_id}"
        replies = _replies(sent, base, mode, seed=r)
        count = [0]

        def counting_load(*args: Any, _count: list[int] = count, **kwargs: Any) -> Any:
            _count[0] += 1
            return real_load(*args, **kwargs)

        np.load = counting_load
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            arrays, _ = strategy.aggregate_train(1, replies)
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        finally:
            np.load = real_load
        assert arrays is not None and len(strategy._report.train) == n, "every reply should be aggregated"
        decodes.append(count[0])
    wire_arrays = sum(len(m.content["arrays"]) for m in _replies(sent[:1], base, mode, seed=0))
    return {"mode": mode, "replies": n, "encoder_arrays": len(encoder), "wire_arrays_per_reply": wire_arrays,
            "seconds": seconds, "median_s": statistics.median(seconds), "cpu_seconds": cpu,
            "median_cpu_s": statistics.median(cpu), "best_cpu_s": min(cpu), "decodes_per_call": decodes[-1],
            "decodes_per_reply_array": decodes[-1] / (n * wire_arrays), "loadavg_end": os.getloadavg()}


def main() -> None:
    """Parse arguments, measure every mode, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["none", "sparse-fp16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    results = {"loadavg_start": os.getloadavg(), "commit": commit, "code": sys.modules["server.strategies"].__file__,
               "results": [measure(args.replies, mode, args.repeat) for mode in args.modes]}
    table = Table(title=f"aggregate_train, {args.replies} replies of the default encoder")
    for col in ("mode", "wall s (median)", "CPU s (median)", "CPU s (best)", "np.load calls", "per reply array",
                "load"):
        table.add_column(col)
    for res in results["results"]:
        table.add_row(res["mode"], f"{res['median_s']:.3f}", f"{res['median_cpu_s']:.3f}",
                      f"{res['best_cpu_s']:.3f}", str(res["decodes_per_call"]), f"{res['decodes_per_reply_array']:.2f}",
                      f"{res['loadavg_end'][0]:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
