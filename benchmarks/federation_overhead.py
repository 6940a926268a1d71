"""What federating costs: fedshop on Flower's simulation engine vs centralized training in one process.

Measures (1) wall time of a fedshop simulation against one process training a model on the same
shops' pooled examples for the same epochs (rounds x local epochs), with the same per-epoch
evaluation; (2) a per-round breakdown: local compute (each shop's training and evaluation, timed
in-process the way the ClientApp runs them, one thread), serialisation (the wire encoding of the
messages, Flower's own protobuf serde), aggregation (Flower's `aggregate_arrayrecords`) and
engine (the rest of the measured round time: Ray scheduling, message passing, client set-up);
(3) bytes sent per shop per round, encoder only vs the whole model vs FedAvg-all.

    .venv/bin/python benchmarks/federation_overhead.py [--scenario default] [--rounds 3] [--set k=v ...]

Prints a table and writes benchmarks/results/federation_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from rich.console import Console
from rich.table import Table

from shared.atomic import atomic_write_text
from shared.features import ShopTensors, build_shop_tensors, pool_shops
from shared.model import ShopModel, build_model
from shared.scenario import Scenario, load_scenario
from shared.train import evaluate_shop, train_shop
from simulations.options import parse_overrides

RESULTS = Path(__file__).resolve().parent / "results" / "federation_overhead.json"


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes of a state dict (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def wire_bytes(state: dict[str, torch.Tensor]) -> tuple[int, float, float]:
    """(serialised bytes, seconds to serialise, seconds to deserialise) of a message carrying ``state``.

    Uses Flower's own protobuf serde for a RecordDict, which is what crosses the wire in deployment.
    """
    start = time.perf_counter()
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
    blob = recorddict_to_proto(content).SerializeToString()
    encoded = time.perf_counter() - start
    start = time.perf_counter()
    back = recorddict_from_proto(type(recorddict_to_proto(RecordDict())).FromString(blob))
    back["arrays"].to_torch_state_dict()
    return len(blob), encoded, time.perf_counter() - start


def _model(tensors: ShopTensors, scenario: Scenario) -> ShopModel:
    return build_model(tensors, scenario.model, scenario.features, seed=scenario.seed)


def measure_shops(scenario: Scenario) -> list[dict[str, Any]]:
    """Per shop: one round of local training + evaluation timed in-process, and its message sizes."""
    torch.set_num_threads(1)  # the ClientApp trains on one thread per simulated shop
    out = []
    for shop in scenario.training_shops():
        start = time.perf_counter()
        tensors = build_shop_tensors(shop, scenario.features)
        model = _model(tensors, scenario)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        losses = train_shop(model, tensors, replace(scenario.train, epochs=int(scenario.federation["local_epochs"])))
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_shop(model, tensors, "val")
        eval_s = time.perf_counter() - start
        encoder, local = model.encoder_state(), model.local_state()
        shareable = {k: local[k] for k in model.shareable_local_keys()}
        enc_wire, enc_ser, enc_de = wire_bytes(encoder)
        out.append({"shop": shop.name, "small": bool(shop.meta.get("small", False)),
                    "train_examples": int(losses["num-examples"]), "setup_s": setup, "train_s": train_s,
                    "eval_s": eval_s, "encoder_bytes": state_bytes(encoder), "local_bytes": state_bytes(local),
                    "whole_model_bytes": state_bytes(encoder) + state_bytes(local),
                    "fedavg_all_bytes": state_bytes(encoder) + state_bytes(shareable),
                    "encoder_wire_bytes": enc_wire, "serialise_s": enc_ser, "deserialise_s": enc_de,
                    "_encoder": encoder, "_weight": float(losses["num-examples"])})
    return out


def measure_aggregation(shops: list[dict[str, Any]], repeats: int = 3) -> float:
    """Seconds Flower's FedAvg aggregation takes over every shop's encoder (median of ``repeats``)."""
    replies = [RecordDict({"arrays": ArrayRecord(s["_encoder"]),
                           "metrics": MetricRecord({"num-examples": s["_weight"]})}) for s in shops]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        aggregate_arrayrecords(replies, "num-examples")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_central(scenario: Scenario, epochs: int) -> dict[str, float]:
    """Pooled training of the same shops for ``epochs`` in this process; evaluation per epoch timed apart."""
    torch.set_num_threads(int(os.environ.get("FEDSHOP_BENCH_THREADS", torch.get_num_threads())))
    shops = scenario.training_shops()
    pooled, views = pool_shops(shops, scenario.features)
    model = _model(pooled, scenario)
    train_s = eval_s = 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train_shop(model, pooled, replace(scenario.train, epochs=1, seed=scenario.seed * 1000 + epoch))
        train_s += time.perf_counter() - start
        start = time.perf_counter()
        for view in views:
            evaluate_shop(model, view, "val")
        eval_s += time.perf_counter() - start
    return {"train_s": train_s, "eval_s": eval_s, "total_s": train_s + eval_s, "threads": torch.get_num_threads()}


def measure_federation(scenario: Scenario, rounds: int) -> dict[str, Any]:
    """Wall time of a fedshop simulation and the time between consecutive round ends."""
    from simulations.federated import backend_config, run_federated

    ends: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fedshop-bench-") as tmp:
        start = time.perf_counter()
        run_federated(scenario, Path(tmp) / "run", method="fedshop", rounds=rounds,
                      progress=lambda _report, _total: ends.append(time.perf_counter()))
        wall = time.perf_counter() - start
    round_s = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    return {"wall_s": wall, "round_s": round_s, "first_round_s": round_s[0] if round_s else None,
            "steady_round_s": statistics.median(round_s[1:]) if len(round_s) > 1 else None,
            "after_last_round_s": wall - (ends[-1] - start) if ends else None,
            "ray_cpus": backend_config()["init_args"]["num_cpus"]}


def breakdown(shops: list[dict[str, Any]], aggregation_s: float, fed: dict[str, Any]) -> dict[str, float | None]:
    """Per steady round: local compute on the critical path, serialisation, aggregation, and the engine rest.

    Shops run ``ray_cpus`` at a time, so the compute on the critical path is the shops' summed
    train + evaluate time divided by that parallelism (a lower bound on what the round must wait for).
    """
    parallel = max(1, min(int(fed["ray_cpus"]), len(shops)))
    compute = sum(s["train_s"] + s["eval_s"] for s in shops) / parallel
    # Each round: encoder down + up for training, down again for evaluation (3 encodings + 3 decodings per shop).
    serialise = 3 * sum(s["serialise_s"] + s["deserialise_s"] for s in shops)
    steady = fed["steady_round_s"] or fed["first_round_s"]
    engine = None if steady is None else steady - compute - serialise - aggregation_s
    return {"round_s": steady, "local_compute_s": compute, "serialisation_s": serialise,
            "aggregation_s": aggregation_s, "engine_s": engine}


def run(scenario: Scenario, rounds: int) -> dict[str, Any]:
    """Every measurement of the benchmark, as a JSON-ready dict."""
    epochs = rounds * int(scenario.federation["local_epochs"])
    shops = measure_shops(scenario)
    aggregation_s = measure_aggregation(shops)
    central = measure_central(scenario, epochs)
    fed = measure_federation(scenario, rounds)
    for s in shops:
        s.pop("_encoder"), s.pop("_weight")
    return {"scenario": scenario.name, "rounds": rounds, "local_epochs": int(scenario.federation["local_epochs"]),
            "n_shops": len(shops), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "federation": fed, "central": central,
            "ratio_fed_vs_central": fed["wall_s"] / central["total_s"],
            "ratio_fed_vs_central_train_only": fed["wall_s"] / central["train_s"],
            "per_round": breakdown(shops, aggregation_s, fed), "shops": shops,
            "bytes_per_shop_per_round": {
                "encoder_up": shops[0]["encoder_bytes"], "encoder_down": 2 * shops[0]["encoder_bytes"],
                "note": "encoder raw bytes; down = train + evaluate messages; the encoder is the same for every shop",
                "encoder_wire": shops[0]["encoder_wire_bytes"],
                "whole_model_mean": statistics.mean(s["whole_model_bytes"] for s in shops),
                "fedavg_all_mean": statistics.mean(s["fedavg_all_bytes"] for s in shops)}}


def print_results(console: Console, res: dict[str, Any]) -> None:
    """Rich tables of the headline, the per-round breakdown and per-shop bytes."""
    fed, central, per = res["federation"], res["central"], res["per_round"]
    head = Table(title=f"federation overhead: {res['scenario']}, {res['n_shops']} shops, {res['rounds']} rounds "
                       f"(load {res['load_avg_1m']:.1f} on {res['cpus']} CPUs)")
    head.add_column("measure")
    head.add_column("value", justify="right")
    head.add_row("fedshop simulation wall (s)", f"{fed['wall_s']:.1f}")
    head.add_row("centralized train + per-epoch eval (s)", f"{central['total_s']:.1f}")
    head.add_row("centralized train only (s)", f"{central['train_s']:.1f}")
    head.add_row("ratio fedshop / centralized", f"{res['ratio_fed_vs_central']:.1f}x")
    head.add_row("first round (s)", f"{fed['first_round_s']:.1f}")
    for key in ("round_s", "local_compute_s", "serialisation_s", "aggregation_s", "engine_s"):
        value = per[key]
        head.add_row(f"steady round: {key.removesuffix('_s').replace('_', ' ')} (s)",
                     "-" if value is None else f"{value:.3f}")
    console.print(head)
    shops = Table(title="per shop, per round")
    for col in ("shop", "train ex", "train s", "eval s", "encoder KB", "wire KB", "model KB", "fedavg-all KB"):
        shops.add_column(col, justify="left" if col == "shop" else "right", no_wrap=True)
    for s in res["shops"]:
        shops.add_row(s["shop"] + (" (small)" if s["small"] else ""), str(s["train_examples"]), f"{s['train_s']:.2f}",
                      f"{s['eval_s']:.2f}", f"{s['encoder_bytes'] / 1024:.0f}", f"{s['encoder_wire_bytes'] / 1024:.0f}",
                      f"{s['whole_model_bytes'] / 1024:.0f}", f"{s['fedavg_all_bytes'] / 1024:.0f}")
    console.print(shops)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default", help="scenario name or path to a .toml")
    parser.add_argument("--rounds", type=int, default=3, help="federation rounds (centralized: rounds x local epochs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="scenario override key=value")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    scenario = load_scenario(args.scenario, parse_overrides(args.overrides))
    res = run(scenario, args.rounds)
    print_results(Console(), res)
    atomic_write_text(args.out, json.dumps(res, indent=2))
    Console().print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
