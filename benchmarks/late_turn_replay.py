"""Late-turning attacker, offline: leave-one-out cosine histories replayed through the screen's own decision.

Takes the per-round leave-one-out cosines of clean ``fedshop`` runs recorded by `benchmarks/byzantine.py`
(``loo_cosines``; default `results/byzantine_loo30.json`: 30 rounds, 8 shops, seeds 0-2), or simulates them
(``--simulate``), and for each turner shop and turn round t negates that shop's cosines from round t on (a sign flip
scores exactly minus its honest cosine against the others' mean). Every round goes through
`server.robust.judge_loo`, the function `screen` calls, with the history and turn levels carried as `ShopStrategy`
carries them, once per ``--margins`` value (0 = the sudden-turn check off: the reputation alone).

Counts per (margin, turner, t), summed over runs: honest shop-rounds wrongly left out (the other shops in every
round, the turner before t and after its flipped rounds: those also apart) and flipped shop-rounds caught.
Approximate: a real flip, and a shop left out, also change the others' cosines and the later trajectory; the replay
keeps them as recorded.

    .venv/bin/python benchmarks/late_turn_replay.py [--inputs results/byzantine_loo30.json] [--turns 4,6,10,20]

Prints the table and writes benchmarks/results/late_turn_replay.json.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from server.robust import LooEntry, RobustSettings, TurnLevel, judge_loo
from shared.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def recorded(paths: list[Path]) -> list[dict[str, Any]]:
    """The clean fedshop runs of byzantine.py outputs that recorded every shop's cosine every round."""
    out = []
    for path in paths:
        for run in json.loads(path.read_text(encoding="utf-8"))["runs"]:
            cos = run.get("loo_cosines") or {}
            if run["rule"] == "fedshop" and run["attack"] == "none" and len({len(v) for v in cos.values()}) == 1:
                out.append({"source": path.name, "seed": run["seed"], "cosines": cos})
    return out


def simulated(runs: int, rounds: int, shops: int = 8) -> list[dict[str, Any]]:
    """Synthetic histories shaped like the recorded ones: a consensus falling from ~0.3 to ~0.03, each shop at its own
    fraction of it (the largest shop, shop_00, drifting below 0 late), plus per-round noise of 0.04."""
    out = []
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        level = np.r_[0.5, rng.uniform(0.8, 1.2, shops - 1)]
        cos: dict[str, list[float]] = {f"shop_{s:02d}": [] for s in range(shops)}
        for t in range(rounds):
            cons = 0.03 + 0.27 * np.exp(-t / 6)
            for s in range(shops):
                drift = -0.2 * (1 - np.exp(-t / 10)) if s == 0 else 0.0
                cos[f"shop_{s:02d}"].append(float(cons * level[s] + drift + rng.normal(0, 0.04)))
        out.append({"source": "simulated", "seed": seed, "cosines": cos})
    return out


def _flipped(rnd: int, turn: int, flip_for: int) -> bool:
    """True if round ``rnd`` is one of the turner's flipped rounds."""
    return rnd >= turn and (flip_for <= 0 or rnd < turn + flip_for)


def replay(cosines: dict[str, list[float]], settings: RobustSettings, turner: str | None, turn: int,
           flip_for: int = 0) -> tuple[dict[str, list[bool]], list[float]]:
    """Per shop, left out in each round; and each round's consensus. ``turner`` flips from round ``turn`` on, for
    ``flip_for`` rounds (0: to the end), honest again after."""
    shops = sorted(cosines)
    history: list[list[LooEntry]] = [[] for _ in shops]
    turns: list[TurnLevel | None] = [None] * len(shops)
    out: dict[str, list[bool]] = {s: [] for s in shops}
    consensus = []
    for k in range(len(cosines[shops[0]])):
        loo = {i: (-1.0 if s == turner and _flipped(k + 1, turn, flip_for) else 1.0) * cosines[s][k]
               for i, s in enumerate(shops)}
        verdict = judge_loo(loo, list(range(len(shops))), history, turns, settings)
        consensus.append(verdict.consensus)
        for i, s in enumerate(shops):
            history[i].append([loo[i], verdict.round_weight])
            if i in verdict.turns:
                turns[i] = verdict.turns[i]
            out[s].append(i in verdict.left_out)
    return out, consensus


def tally(runs: list[dict[str, Any]], margins: list[float], turners: list[str], turn_rounds: list[int],
          flip_for: int = 0) -> list[dict[str, Any]]:
    """One row per (margin, turner, turn round), summed over runs; turner None: the clean replay. The turner's
    honest rounds (before its turn, and after ``flip_for`` flipped rounds) count as honest shop-rounds."""
    rows = []
    for margin in margins:
        settings = replace(RobustSettings(), loo_turn_margin=margin)
        for turner, turn in [(None, 0)] + [(s, t) for s in turners for t in turn_rounds]:
            row = {"margin": margin, "turner": turner, "turn_round": turn or None, "runs": 0, "honest_out": 0,
                   "honest_total": 0, "turner_honest_out": 0, "turner_honest_total": 0, "flipped_caught": 0,
                   "flipped_total": 0, "caught_at_turn": 0,
                   "honest_out_where": []}
            for run in runs:
                n = len(next(iter(run["cosines"].values())))
                if turner is not None and (turner not in run["cosines"] or turn > n):
                    continue
                left, _ = replay(run["cosines"], settings, turner, turn or n + 1, flip_for)
                row["runs"] += 1
                for shop, flags in left.items():
                    for k, out in enumerate(flags):
                        if shop == turner and _flipped(k + 1, turn, flip_for):
                            row["flipped_total"] += 1
                            row["flipped_caught"] += out
                            row["caught_at_turn"] += out and k + 1 == turn
                        else:
                            row["honest_total"] += 1
                            row["honest_out"] += out
                            if shop == turner:
                                row["turner_honest_total"] += 1
                                row["turner_honest_out"] += out
                            if out:
                                row["honest_out_where"].append([run["source"], run["seed"], shop, k + 1])
            if row["runs"]:
                rows.append(row)
    return rows


def main() -> None:
    """Replay, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=Path, nargs="*", default=[RESULTS / "byzantine_loo30.json"])
    parser.add_argument("--simulate", type=int, default=0, help="also this many simulated 30-round histories")
    parser.add_argument("--turners", default="shop_00,shop_07")
    parser.add_argument("--turns", default="4,6,10,20")
    parser.add_argument("--margins", default="0,0.05,0.1,0.15,0.2")
    parser.add_argument("--flip-for", type=int, default=0, help="the turner flips this many rounds, then is honest "
                        "again (0: to the end)")
    parser.add_argument("--out", type=Path, default=RESULTS / "late_turn_replay.json")
    args = parser.parse_args()
    runs = recorded([p for p in args.inputs if p.exists()]) + simulated(args.simulate, 30)
    if not runs:
        parser.error("no recorded clean run with loo_cosines in --inputs, and --simulate 0")
    margins = [float(m) for m in args.margins.split(",")]
    rows = tally(runs, margins, args.turners.split(","), [int(t) for t in args.turns.split(",")], args.flip_for)
    table = Table(title=f"late turn (sign flip from round t), replayed through server.robust.judge_loo on {len(runs)} "
                        "histories; bound -0.08; margin 0 = reputation alone")
    for col in ("margin", "turner", "from round", "runs", "honest wrongly out", "of them the turner's own",
                "flipped caught", "caught at t"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['margin']:g}", r["turner"] or "none (clean)", str(r["turn_round"] or "-"), str(r["runs"]),
                      f"{r['honest_out']}/{r['honest_total']}",
                      "-" if r["turner"] is None else f"{r['turner_honest_out']}/{r['turner_honest_total']}",
                      "-" if r["turner"] is None else f"{r['flipped_caught']}/{r['flipped_total']}",
                      "-" if r["turner"] is None else f"{r['caught_at_turn']}/{r['runs']}")
    Console().print(table)
    atomic_write_text(args.out, json.dumps({"inputs": [str(p) for p in args.inputs], "simulated": args.simulate,
                                            "flip_for": args.flip_for,
                                            "loadavg": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
