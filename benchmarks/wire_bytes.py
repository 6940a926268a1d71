"""Bytes on the wire per shop per round for each `federation.compression` mode, and what they cost in accuracy.

Runs the real ServerApp strategy (`run_federation`) against the real ClientApp (all its mods: the
wire mod and the leak guard included) through the in-process Grid (`simulations.privacy.in_process_grid`:
no Ray, no protobuf), one federation per (mode, seed). Bytes are the array payloads the coordinator's
`server.wire.Wire` counts (serialised npy arrays, framing included, config records excluded) for
train + evaluate messages down and train replies up, divided by the shops messaged. Accuracy: the
last round's test CTR AUC, mean over shops, against mode "none" with the same seed.

    .venv/bin/python benchmarks/wire_bytes.py [--scenario default] [--rounds 3] [--seeds 0 1 2] \
        [--modes none sparse-fp16 sparse-int8] [--set k=v ...] [--include earlier.json ...]

Runs are slow (minutes each on 2 busy cores): `--include` merges runs of earlier invocations (same
scenario, rounds and overrides) into one summary; `--seeds` with no value runs nothing new.

Prints a table and writes benchmarks/results/wire_bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console
from rich.table import Table

from client import client_app
from server.server_app import FederationSettings, run_federation
from shared.atomic import atomic_write_text
from shared.compression import MODES
from shared.scenario import load_scenario
from simulations.federated import run_config
from simulations.options import parse_overrides
from simulations.privacy.in_process_grid import InProcessGrid, nodes

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results" / "wire_bytes.json"
AUC_KEY = "test/ctr.auc"


def run_one(scenario_name: str, overrides: dict[str, Any], mode: str, seed: int, rounds: int) -> dict[str, Any]:
    """One federation: per-round byte counts, the last round's CTR AUC per shop, wall seconds."""
    scenario = load_scenario(scenario_name, {**overrides, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="fedshop-wire-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        config = run_config(scenario, run_dir, method="fedshop", rounds=rounds, resume=False)
        config["scenario"] = str(atomic_write_text(run_dir / "scenario.toml", tomli_w.dumps(scenario.raw)))
        config["compression"] = mode
        n_shops = len(scenario.federation_shops())
        grid = InProcessGrid(client_app.app, nodes(n_shops))
        reports: list[Any] = []
        start = time.perf_counter()
        run_federation(grid, FederationSettings.from_config(config), lambda report, _total: reports.append(report))
        wall = time.perf_counter() - start
    last = reports[-1]
    aucs = {shop: m[AUC_KEY] for shop, m in last.evaluate.items() if AUC_KEY in m}
    per_round = [{"round": r.server_round, **r.wire_bytes,
                  "down_per_shop": r.wire_bytes["down"] / n_shops, "up_per_shop": r.wire_bytes["up"] / n_shops,
                  "left_out": len(r.left_out)} for r in reports]
    return {"mode": mode, "seed": seed, "shops": n_shops, "wall_s": wall, "rounds": per_round,
            "ctr_auc_mean": statistics.mean(aucs.values()) if aucs else None, "ctr_auc": aucs}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: mean bytes per shop per round (all rounds, and rounds after the first), AUC vs 'none'."""
    base = {r["seed"]: r["ctr_auc_mean"] for r in runs if r["mode"] == "none"}
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        per = [(x["down_per_shop"], x["up_per_shop"]) for r in mine for x in r["rounds"]]
        steady = [(x["down_per_shop"], x["up_per_shop"]) for r in mine for x in r["rounds"][1:]] or per
        deltas = [r["ctr_auc_mean"] - base[r["seed"]] for r in mine
                  if r["seed"] in base and r["ctr_auc_mean"] is not None and base[r["seed"]] is not None]
        rows.append({"mode": mode, "seeds": [r["seed"] for r in mine],
                     "down_per_shop_round": statistics.mean(d for d, _ in per),
                     "up_per_shop_round": statistics.mean(u for _, u in per),
                     "total_per_shop_round": statistics.mean(d + u for d, u in per),
                     "steady_total_per_shop_round": statistics.mean(d + u for d, u in steady),
                     "ctr_auc_mean": statistics.mean(r["ctr_auc_mean"] for r in mine),
                     "ctr_auc_delta_vs_none": statistics.mean(deltas) if deltas else None,
                     "wall_s": statistics.mean(r["wall_s"] for r in mine)})
    none = next((r for r in rows if r["mode"] == "none"), None)
    for r in rows:
        r["ratio_vs_none"] = none["total_per_shop_round"] / r["total_per_shop_round"] if none else None
        r["steady_ratio_vs_none"] = (none["steady_total_per_shop_round"] / r["steady_total_per_shop_round"]
                                     if none else None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["none", "sparse-fp16", "sparse-int8"], choices=MODES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="scenario override k=v")
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="earlier results JSON whose runs (same scenario and rounds) join the summary")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    load_start = os.getloadavg()
    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            runs.append(run_one(args.scenario, overrides, mode, seed, args.rounds))
            Console(stderr=True).print(f"seed {seed} {mode}: {runs[-1]['wall_s']:.0f} s, "
                                       f"CTR AUC {runs[-1]['ctr_auc_mean']}")
    included = []
    for path in args.include:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        included.append({"file": str(path), "load_avg_1m_start": earlier["load_avg_1m_start"],
                         "load_avg_1m_end": earlier["load_avg_1m_end"]})
        if (earlier["scenario"], earlier["rounds"], earlier["overrides"]) != (args.scenario, args.rounds, overrides):
            raise SystemExit(f"{path}: other scenario, rounds or overrides; not mixed into this summary")
        runs = [*earlier["runs"], *runs]
    runs.sort(key=lambda r: (MODES.index(r["mode"]), r["seed"]))
    rows = summarise(runs)
    res = {"scenario": args.scenario, "rounds": args.rounds, "overrides": overrides, "summary": rows, "runs": runs,
           "cpus": os.cpu_count(), "load_avg_1m_start": load_start[0], "load_avg_1m_end": os.getloadavg()[0],
           "included": included}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=2))
    seeds = sorted({r["seed"] for r in runs})
    table = Table(title=f"wire bytes per shop per round, {args.scenario}, {args.rounds} rounds, seeds {seeds} "
                        f"(load {load_start[0]:.1f} -> {res['load_avg_1m_end']:.1f} on {res['cpus']} CPUs)")
    for col in ("mode", "down MB", "up MB", "total MB", "steady MB", "x smaller", "CTR AUC", "vs none"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        delta = r["ctr_auc_delta_vs_none"]
        table.add_row(r["mode"], f"{r['down_per_shop_round'] / 1e6:.3f}", f"{r['up_per_shop_round'] / 1e6:.3f}",
                      f"{r['total_per_shop_round'] / 1e6:.3f}", f"{r['steady_total_per_shop_round'] / 1e6:.3f}",
                      "-" if r["ratio_vs_none"] is None else f"{r['ratio_vs_none']:.1f}", f"{r['ctr_auc_mean']:.4f}",
                      "-" if delta is None else f"{delta:+.4f}")
    Console().print(table)
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
