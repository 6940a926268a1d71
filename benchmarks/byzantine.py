"""One malicious shop of 8: what each attack costs the honest shops under each aggregation rule.

Runs fedshop's real ServerApp loop (`server.server_app.run_federation`, screens and strategy included)
in-process over `simulations.privacy.in_process_grid.InProcessGrid`, whose nodes call the real ClientApp. The attacker
(``--attacker``, default shop_00, the largest shop, so its examples weight is the biggest) trains
honestly, then rewrites its reply's encoder as ``global + f(delta)``, ``delta = honest reply - global``:

    none: f(d) = d;  x100: 100 d;  x-10: -10 d;  noise: d + N(0, sigma^2) per value (sigma 5);  signflip: -d;
    absent: no update at all (an error reply), the reference a perfect screen could reach

Rules: ``fedavg`` (Flower's FedAvg, every screen off), ``fedshop`` (FedAvg behind the default screens of
`server.robust`), and Flower's ``fedmedian``, ``fedtrimmedavg`` (beta 0.2), ``multikrum`` and ``bulyan``
(num_malicious 1), each with the screens off so the rule alone is measured. Metric: the honest shops' mean
test CTR AUC, (a) at each shop's best-validation round (the project's reporting rule) and (b) after the
last round; "drop" is against clean FedAvg (attack none, rule fedavg).

    .venv/bin/python benchmarks/byzantine.py [--rounds 3] [--attacks none,x100,...] [--rules fedavg,...]

Prints the table and writes benchmarks/results/byzantine.json (atomically, after every run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from rich.console import Console
from rich.table import Table

from server.robust import RobustSettings
from shared.atomic import atomic_write_text
from shared.scenario import load_scenario
from simulations.best_rounds import final_table
from simulations.federated import SCENARIO_FILE, run_config
from simulations.options import parse_overrides

RESULTS = Path(__file__).resolve().parent / "results" / "byzantine.json"
ATTACKS = ("none", "x100", "x-10", "noise", "signflip", "absent")
RULES = ("fedavg", "fedshop", "fedmedian", "fedtrimmedavg", "multikrum", "bulyan")
SCREENS_OFF = {f"robust-{k.replace('_', '-')}": v for k, v in asdict(RobustSettings.off()).items()
               if k != "norm_action"}


def attack_fn(name: str, sigma: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """The attacker's rewrite of its honest delta."""
    return {"none": lambda d: d, "x100": lambda d: 100.0 * d, "x-10": lambda d: -10.0 * d,
            "noise": lambda d: d + rng.normal(0.0, sigma, d.shape), "signflip": lambda d: -d,
            "absent": lambda d: d}[name]


class Attacker:
    """The real ClientApp for every node; the attacker node's training replies are rewritten."""

    def __init__(self, app: Any, node_id: int, rewrite: Callable[[np.ndarray], np.ndarray],
                 absent: bool = False) -> None:
        self.app, self.node_id, self.rewrite, self.absent = app, node_id, rewrite, absent

    def __call__(self, msg: Message, context: Context) -> Message:
        if self.absent and context.node_id == self.node_id and msg.metadata.message_type == MessageType.TRAIN:
            raise RuntimeError("absent: this shop sends no update (the best any screen can do)")
        reply = self.app(msg, context)
        if context.node_id != self.node_id or msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        sent: ArrayRecord = msg.content["arrays"]
        arrays: ArrayRecord = next(iter(reply.content.array_records.values()))
        for key in list(arrays):
            honest = arrays[key].numpy()
            if key in sent and np.issubdtype(honest.dtype, np.floating):
                base = sent[key].numpy()
                arrays[key] = Array((base + self.rewrite(honest - base)).astype(honest.dtype))
        return reply


def run_one(scenario_name: str, overrides: dict[str, Any], rule: str, attack: str, *, rounds: int,
            attacker: int, sigma: float, work: Path, screens: dict[str, Any] | None = None) -> dict[str, Any]:
    """One federation; returns honest shops' mean CTR AUC (best-val round and last round) and what was left out."""
    from client.client_app import app as client_app
    from server.server_app import FederationSettings, run_federation
    from simulations.privacy.in_process_grid import InProcessGrid, nodes

    scenario = load_scenario(scenario_name, overrides)
    run_dir = work / f"{rule}-{attack}"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
    config = run_config(scenario, run_dir, method="fedshop", rounds=rounds, resume=False)
    config["strategy"] = "fedavg" if rule == "fedshop" else rule
    if rule != "fedshop":
        config.update(SCREENS_OFF)
    else:
        config.update(screens or {})
    shops = [s.name for s in scenario.federation_shops()]
    node_ids = nodes(len(shops))
    attacker_node = sorted(node_ids)[attacker]
    rewrite = attack_fn(attack, sigma, np.random.default_rng(scenario.seed))
    grid = InProcessGrid(Attacker(client_app, attacker_node, rewrite, absent=attack == "absent"), node_ids,
                        run_config=config)
    left_out: dict[int, dict[str, str]] = {}
    start = time.perf_counter()
    run_federation(grid, FederationSettings.from_config(config),
                   lambda report, _total: left_out.__setitem__(report.server_round, dict(report.left_out)))
    seconds = time.perf_counter() - start
    rows = pd.read_csv(run_dir / "metrics.csv")
    honest = [s for i, s in enumerate(shops) if i != attacker]
    ctr = rows[(rows["task"] == "ctr") & (rows["metric"] == "auc") & rows["shop"].isin(honest)]
    best = final_table(rows[rows["shop"].isin(honest)])
    best = best[(best["task"] == "ctr") & (best["metric"] == "auc")]
    last = ctr[(ctr["split"] == "test") & (ctr["round"] == ctr["round"].max())]
    screens_used = {k: v for k, v in config.items() if k.startswith("robust-")}
    return {"rule": rule, "attack": attack, "screens": screens_used, "attacker": shops[attacker], "rounds": rounds,
            "honest_ctr_auc_best_val": float(best["value"].mean()), "honest_ctr_auc_last": float(last["value"].mean()),
            "per_shop_best_val": dict(zip(best["shop"], best["value"].round(4), strict=True)),
            "by_round": ctr[ctr["split"] == "test"].groupby("round")["value"].mean().round(4).tolist(),
            "attacker_left_out_rounds": sum(shops[attacker] in lo for lo in left_out.values()),
            "honest_left_out": sorted({s for lo in left_out.values() for s in lo if s != shops[attacker]}),
            "seconds": round(seconds, 1), "loadavg": os.getloadavg()}


def main() -> None:
    """Run the grid, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attacker", type=int, default=0, help="index of the attacking training shop")
    parser.add_argument("--sigma", type=float, default=5.0, help="noise attack's standard deviation")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="scenario override k=v")
    parser.add_argument("--screens", action="append", default=[],
                        help="fedshop rule only: a run-config key=value replacing a default screen setting, "
                             "e.g. robust-weight-cap=4 (the JSON records every robust-* value used)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--combine", type=Path, nargs="+", default=[],
                        help="only join these JSON files of partial runs (e.g. one process per rule) into --out")
    args = parser.parse_args()
    console = Console()
    if args.combine:
        parts = [json.loads(p.read_text(encoding="utf-8")) for p in args.combine]
        results = [r for part in parts for r in part["results"]]
        meta = {**parts[0], "parts": [str(p) for p in args.combine],
                "loadavg_start": [p.get("loadavg_start") for p in parts],
                "loadavg_end": [p.get("loadavg_end") for p in parts]}
        meta.pop("results", None)
        write_table(console, meta, results, args.out)
        return
    attacks, rules = args.attacks.split(","), args.rules.split(",")
    unknown = sorted(set(attacks) - set(ATTACKS)) + sorted(set(rules) - set(RULES))
    if unknown:
        parser.error(f"unknown attack/rule {unknown}; attacks: {ATTACKS}, rules: {RULES}")
    overrides = parse_overrides(args.sets)
    screens = {k: float(v) if k != "robust-norm-action" else v
               for k, _, v in (item.partition("=") for item in args.screens)}
    results: list[dict[str, Any]] = []
    meta = {"scenario": args.scenario, "overrides": overrides, "rounds": args.rounds, "sigma": args.sigma,
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="byzantine-") as tmp:
        for rule in rules:
            for attack in attacks:
                res = run_one(args.scenario, overrides, rule, attack, rounds=args.rounds, attacker=args.attacker,
                              sigma=args.sigma, work=Path(tmp), screens=screens)
                results.append(res)
                console.print(f"{rule:>14} {attack:>8}: honest CTR AUC best-val {res['honest_ctr_auc_best_val']:.4f} "
                              f"last {res['honest_ctr_auc_last']:.4f}, attacker left out in "
                              f"{res['attacker_left_out_rounds']}/{args.rounds} rounds, honest left out "
                              f"{res['honest_left_out']} ({res['seconds']:.0f} s)")
                atomic_write_text(args.out, json.dumps({**meta, "results": results}, indent=2) + "\n")
    meta["loadavg_end"] = os.getloadavg()
    write_table(console, meta, results, args.out)


def write_table(console: Console, meta: dict[str, Any], results: list[dict[str, Any]], out: Path) -> None:
    """Add each run's drop against clean FedAvg, print the attack x rule table, write the JSON."""
    clean = next((r for r in results if r["rule"] == "fedavg" and r["attack"] == "none"), None)
    for r in results:
        for which in ("best_val", "last"):
            r[f"drop_{which}"] = (clean[f"honest_ctr_auc_{which}"] - r[f"honest_ctr_auc_{which}"]) if clean else None
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in results)]
    rules = [x for x in RULES if any(r["rule"] == x for r in results)]
    table = Table(title=f"honest shops' mean test CTR AUC, best-val round / last round (drop vs clean fedavg); "
                        f"attacker {results[0]['attacker']}, {meta['rounds']} rounds")
    table.add_column("rule")
    for attack in attacks:
        table.add_column(attack, justify="right")
    for rule in rules:
        cells = []
        for attack in attacks:
            r = next((x for x in results if x["rule"] == rule and x["attack"] == attack), None)
            if r is None:
                cells.append("not run")
                continue
            drop = "" if r["drop_best_val"] is None else f" ({r['drop_best_val']:+.3f}/{r['drop_last']:+.3f})"
            cells.append(f"{r['honest_ctr_auc_best_val']:.3f}/{r['honest_ctr_auc_last']:.3f}{drop}")
        table.add_row(rule, *cells)
    console.print(table)
    atomic_write_text(out, json.dumps({**meta, "results": results}, indent=2) + "\n")
    console.print(f"wrote {out}")

if __name__ == "__main__":
    main()
