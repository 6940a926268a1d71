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

``--turn-round N``: a late turn, the attacker is honest (``absent``: present) before round N, attacks from N on;
the floor is then the attacker absent from round N, and "attacker out" counts rounds N.. only.

    .venv/bin/python benchmarks/byzantine.py [--rounds 3] [--attacks none,x100,...] [--rules fedavg,...]

Prints the table and writes benchmarks/results/byzantine.json (atomically, after every run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from rich.console import Console
from rich.table import Table

from server.checkpoint import latest_checkpoint
from server.robust import RobustSettings, split_entry
from shared.atomic import atomic_write_text
from shared.protocol import NUM_EXAMPLES
from shared.scenario import load_scenario
from shared.settings import RunSettings, run_key
from simulations.best_rounds import final_table
from simulations.federated import SCENARIO_FILE, run_config
from simulations.options import parse_overrides

RESULTS = Path(__file__).resolve().parent / "results" / "byzantine.json"
ATTACKS = ("none", "x100", "x-10", "noise", "signflip", "absent")
RULES = ("fedavg", "fedshop", "fedmedian", "fedtrimmedavg", "multikrum", "bulyan")
SCREENS_OFF = {f"robust-{k.replace('_', '-')}": v for k, v in asdict(RobustSettings.off()).items()
               if k not in ("norm_action", "loo_rule")}


ROBUST_DEFAULTS = {run_key(n): f.default for n, f in RunSettings.model_fields.items() if n.startswith("robust_")}


def screens_for(rule: str, screens: dict[str, Any]) -> dict[str, Any]:
    """Every robust-* run-config value a run of ``rule`` uses (defaults, screens off, or --screens overrides)."""
    return {**ROBUST_DEFAULTS, **(SCREENS_OFF if rule != "fedshop" else screens)}


def same_screens(used: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True if an earlier run used ``wanted``; a key it lacks is a screen added since, off in that run."""
    return all(used.get(k, SCREENS_OFF.get(k)) == v for k, v in wanted.items())


def attack_fn(name: str, sigma: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """The attacker's rewrite of its honest delta."""
    return {"none": lambda d: d, "x100": lambda d: 100.0 * d, "x-10": lambda d: -10.0 * d,
            "noise": lambda d: d + rng.normal(0.0, sigma, d.shape), "signflip": lambda d: -d,
            "absent": lambda d: d}[name]


class Attacker:
    """The real ClientApp for every node; the attacker node's training replies are rewritten."""

    def __init__(self, app: Any, node_id: int, rewrite: Callable[[np.ndarray], np.ndarray],
                 absent: bool = False, turn_round: int = 1) -> None:
        self.app, self.node_id, self.rewrite, self.absent = app, node_id, rewrite, absent
        self.turn_round = turn_round  # honest before this server round

    def attacks(self, msg: Message, context: Context) -> bool:
        """True for a training instruction to the attacker node from its turn round on."""
        if context.node_id != self.node_id or msg.metadata.message_type != MessageType.TRAIN:
            return False
        if self.turn_round <= 1:
            return True
        config = msg.content.config_records.get("config")
        if config is None or "server-round" not in config:
            raise RuntimeError("--turn-round needs the training instruction's config['server-round'] (Flower's FedAvg "
                               "sets it); this message has none")
        return int(config["server-round"]) >= self.turn_round

    def __call__(self, msg: Message, context: Context) -> Message:
        if self.absent and self.attacks(msg, context):
            raise RuntimeError("absent: this shop sends no update (the best any screen can do)")
        reply = self.app(msg, context)
        if not self.attacks(msg, context) or reply.has_error():
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
            attacker: int, sigma: float, work: Path, screens: dict[str, Any] | None = None,
            turn_round: int = 1) -> dict[str, Any]:
    """One federation; returns honest shops' mean CTR AUC (best-val round and last round) and what was left out.

    The attacker attacks from ``turn_round`` on (honest before it)."""
    from client.client_app import app as client_app
    from server.server_app import FederationSettings, run_federation
    from simulations.privacy.in_process_grid import InProcessGrid, nodes

    scenario = load_scenario(scenario_name, overrides)
    turn_round = 1 if attack == "none" else turn_round
    run_dir = work / f"{rule}-{attack}-from{turn_round}"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
    config = run_config(scenario, run_dir, method="fedshop", rounds=rounds, resume=False)
    config["strategy"] = "fedavg" if rule == "fedshop" else rule
    config["test-every-round"] = True  # by_round and ctr_auc below read every round's test metrics
    if rule != "fedshop":
        config.update(SCREENS_OFF)
    else:
        config.update(screens or {})
    shops = [s.name for s in scenario.federation_shops()]
    node_ids = nodes(len(shops))
    attacker_node = sorted(node_ids)[attacker]
    rewrite = attack_fn(attack, sigma, np.random.default_rng(scenario.seed))
    grid = InProcessGrid(Attacker(client_app, attacker_node, rewrite, absent=attack == "absent",
                                  turn_round=turn_round), node_ids, run_config=config)
    left_out: dict[int, dict[str, str]] = {}
    claims: dict[str, float] = {}

    def on_round(report: Any, _total: int) -> None:
        left_out[report.server_round] = dict(report.left_out)
        for shop, metrics in report.train.items():
            claims.setdefault(shop, metrics.get(NUM_EXAMPLES, 0.0))

    start = time.perf_counter()
    run_federation(grid, FederationSettings.from_config(config), on_round)
    seconds = time.perf_counter() - start
    rows = pd.read_csv(run_dir / "metrics.csv")
    ckpt = latest_checkpoint(run_dir)
    honest = [s for i, s in enumerate(shops) if i != attacker]
    all_ctr = rows[(rows["task"] == "ctr") & (rows["metric"] == "auc")]
    ctr = all_ctr[all_ctr["shop"].isin(honest)]
    best = final_table(rows[rows["shop"].isin(honest)])
    best = best[(best["task"] == "ctr") & (best["metric"] == "auc")]
    last = ctr[(ctr["split"] == "test") & (ctr["round"] == ctr["round"].max())]
    screens_used = {k: v for k, v in config.items() if k.startswith("robust-")}
    return {"rule": rule, "attack": attack, "screens": screens_used, "attacker": shops[attacker],
            "attacker_index": attacker, "turn_round": turn_round, "rounds": rounds, "seed": scenario.seed,
            "overrides": overrides,
            "shops": shops, "claims": claims,
            "honest_ctr_auc_best_val": float(best["value"].mean()), "honest_ctr_auc_last": float(last["value"].mean()),
            "per_shop_best_val": dict(zip(best["shop"], best["value"].round(4), strict=True)),
            "by_round": ctr[ctr["split"] == "test"].groupby("round")["value"].mean().round(4).tolist(),
            "ctr_auc": {split: {shop: grp.sort_values("round")["value"].round(5).tolist()
                                for shop, grp in all_ctr[all_ctr["split"] == split].groupby("shop")}
                        for split in ("val", "test")},
            "left_out": {str(r): lo for r, lo in sorted(left_out.items())},
            # per shop, per screened round: its leave-one-out cosine and the round's weight under the run's rule
            "loo_cosines": {s: [split_entry(e)[0] for e in h] for s, h in (ckpt.loo_history if ckpt else {}).items()},
            "loo_weights": {s: [split_entry(e)[1] for e in h] for s, h in (ckpt.loo_history if ckpt else {}).items()},
            "loo_rule": RobustSettings().loo_rule,
            "loo_turns": ckpt.loo_turns if ckpt else {},
            "attacker_left_out_rounds": sum(shops[attacker] in lo for r, lo in left_out.items() if r >= turn_round),
            "attacker_left_out_before_turn": sum(shops[attacker] in lo for r, lo in left_out.items() if r < turn_round),
            "honest_left_out": sorted({s for lo in left_out.values() for s in lo if s != shops[attacker]}),
            "seconds": round(seconds, 1), "loadavg": os.getloadavg()}


def _turn(run: dict[str, Any]) -> int:
    """The round a run's attacker starts attacking (1 for runs from before --turn-round, and for clean runs)."""
    return 1 if run["attack"] == "none" else int(run.get("turn_round", 1))


def _honest_auc(run: dict[str, Any], attacker: str, upto: int) -> float:
    """Honest shops' mean test CTR AUC at each one's best-validation round among rounds 1..``upto``."""
    values = []
    for shop, val in run["ctr_auc"]["val"].items():
        if shop == attacker:
            continue
        best = int(np.argmax(val[:upto]))  # first best, as `simulations.best_rounds.final_table` picks
        values.append(run["ctr_auc"]["test"][shop][best])
    return float(np.mean(values))


def _false_positives(run: dict[str, Any], attacker: str | None, upto: int) -> tuple[int, int]:
    """(honest shop-rounds left out by a screen, honest shop-rounds) within rounds 1..``upto``."""
    honest = [s for s in run["shops"] if s != attacker]
    out = sum(1 for r, lo in run["left_out"].items() if int(r) <= upto for s in lo if s in honest)
    return out, len(honest) * min(upto, run["rounds"])


def _spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{np.mean(xs):+.3f} ({min(xs):+.3f}..{max(xs):+.3f})"


def summarise(runs: list[dict[str, Any]], report_rounds: list[int], defended: str = "fedshop"
              ) -> list[dict[str, Any]]:
    """Per report round, attacker and attack: the defended rule's honest AUC cost against clean FedAvg and
    against the floor (FedAvg without the attacker), over seeds, with screened-out honest shop-rounds."""
    by = {(r["rule"], r["attack"], "" if r["attack"] == "none" else r["attacker"], r["seed"], _turn(r)): r
          for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    attackers = sorted({r["attacker"] for r in runs if r["attack"] != "none"})
    attacks = [a for a in ATTACKS if a not in ("none", "absent") and any(r["attack"] == a for r in runs)]
    turns = sorted({_turn(r) for r in runs if r["attack"] not in ("none", "absent")})
    rows = []
    for upto in report_rounds:
        for attacker, attack, turn in [(None, "none", 1)] + [(a, x, t) for a in attackers for x in attacks
                                                              for t in turns]:
            who = attacker or ""
            cost_clean, cost_floor, floor_cost, aucs, fp, fp_total, caught, got = [], [], [], [], 0, 0, 0, []
            shares = []
            for seed in seeds:
                run = by.get((defended, attack, "" if attack == "none" else who, seed, turn))
                clean, floor = by.get(("fedavg", "none", "", seed, 1)), by.get(("fedavg", "absent", who, seed, turn))
                if run is None or clean is None or run["rounds"] < upto or (attacker and floor is None):
                    continue
                auc = _honest_auc(run, who, upto)
                aucs.append(auc)
                cost_clean.append(_honest_auc(clean, who, upto) - auc)
                if floor is not None:
                    cost_floor.append(_honest_auc(floor, who, upto) - auc)
                    floor_cost.append(_honest_auc(clean, who, upto) - _honest_auc(floor, who, upto))
                n_fp, n_all = _false_positives(run, attacker, upto)
                fp, fp_total = fp + n_fp, fp_total + n_all
                caught += sum(1 for r, lo in run["left_out"].items() if turn <= int(r) <= upto and who in lo)
                if attacker and clean.get("claims"):
                    shares.append(clean["claims"][attacker] / sum(clean["claims"].values()))
                got.append(seed)
            if not got:
                continue
            target = 0.005 if attack == "none" else 0.01
            rows.append({"rounds": upto, "attacker": attacker, "attacker_share": float(np.mean(shares)) if shares
                         else None, "attack": attack, "turn_round": turn, "seeds": got,
                         "attacker_rounds": max(0, upto - turn + 1) * len(got), "auc": aucs,
                         "cost_vs_clean": cost_clean,
                         "cost_vs_floor": cost_floor, "floor_cost": floor_cost, "honest_left_out": fp,
                         "honest_shop_rounds": fp_total, "attacker_left_out_rounds": caught if attacker else None,
                         "target": target, "met": float(np.mean(cost_clean)) <= target})
    return rows


DIRECTION_ATTACKS = ("signflip", "x-10")
_wmean = lambda c, w: float(np.dot(c, w) / np.sum(w)) if np.sum(w) > 0 else float(np.mean(c))  # noqa: E731
# name -> (round weight: None, "agreement" or "consensus"; (cosines, weights) of a shop's rounds 1..k -> its score)
LOO_RULES: dict[str, tuple[str | None, Callable[[list[float], list[float]], float]]] = {
    "this round alone": (None, lambda c, w: c[-1]),
    "min(round, mean) [before 2026-12-06]": (None, lambda c, w: min(c[-1], float(np.mean(c)))),
    "mean over rounds incl. this [until 2026-12-06]": (None, lambda c, w: float(np.mean(c))),
    "both below (max)": (None, lambda c, w: max(c[-1], float(np.mean(c)))),
    "agreement-weighted mean": ("agreement", _wmean),
    "consensus-weighted mean [default]": ("consensus", _wmean),
}
SCREENED_OUT = ("update norm", "against the round's median")  # left out before the leave-one-out screen


def _weights(run: dict[str, Any], shop: str, kind: str | None) -> list[float] | None:
    """A shop's round weights of ``kind`` (None if the run did not record them; 1 each for kind None).

    Agreement: recorded (`loo_agreement`, or `loo_weights` of a run under that rule). Consensus: the median of the
    round's recorded cosines of the updates the earlier screens kept, at least 0 (exact when every shop is screened
    every round, as in these runs)."""
    cosines = run["loo_cosines"]
    n = len(cosines[shop])
    if kind is None:
        return [1.0] * n
    if kind == "agreement":
        if "loo_agreement" in run:
            return run["loo_agreement"][shop]
        return run["loo_weights"][shop] if run.get("loo_rule") == "agreement" else None
    if len({len(v) for v in cosines.values()}) != 1:
        return None
    out = []
    for k in range(n):
        reasons = run["left_out"].get(str(k + 1), {})
        kept = [v[k] for s, v in cosines.items() if not any(x in reasons.get(s, "") for x in SCREENED_OUT)]
        out.append(max(0.0, float(np.median(kept))) if kept else 0.0)
    return out


def loo_analysis(runs: list[dict[str, Any]], bound: float) -> list[dict[str, Any]]:
    """Per leave-one-out rule, from the recorded per-round cosines of the ``fedshop`` runs: the honest shops'
    lowest score and the attackers' highest (the margin between them), and the shop-rounds each rule puts below
    ``bound``. Attackers count only for attacks that reverse the direction (x100 keeps its honest cosine, noise
    scores ~0: the norm bound catches those). Offline: a run's later rounds followed the rule in force then."""
    rows = []
    for name, (kind, rule) in LOO_RULES.items():
        honest, attacker = [], []
        for run in runs:
            if run["rule"] != "fedshop" or not run.get("loo_cosines"):
                continue
            who = run["attacker"] if run["attack"] != "none" else None
            for shop, cosines in run["loo_cosines"].items():
                weights = _weights(run, shop, kind)
                if weights is None:
                    continue
                scores = [rule(cosines[:k + 1], weights[:k + 1]) for k in range(len(cosines))]
                if shop == who and run["attack"] not in DIRECTION_ATTACKS:
                    continue
                for k, score in enumerate(scores):  # a late turner is honest before its turn round
                    (attacker if shop == who and k + 1 >= _turn(run) else honest).append(
                        (round(score, 4), run["attack"], run["seed"], shop, k + 1))
        low, high = min(honest, default=None), max(attacker, default=None)
        rows.append({"rule": name, "honest_min": low, "attacker_max": high,
                     "margin": low[0] - high[0] if low and high else None,
                     "honest_below": sum(h[0] < bound for h in honest), "honest_total": len(honest),
                     "attacker_below": sum(a[0] < bound for a in attacker), "attacker_total": len(attacker)})
    return rows


def late_flip_delays(runs: list[dict[str, Any]], bound: float, shops: tuple[str, ...] = ("shop_00", "shop_07"),
                     ) -> list[dict[str, Any]]:
    """Offline late-turning attacker on the clean ``fedshop`` runs: shop s flips its update from round t on, so its
    leave-one-out cosine becomes minus the recorded one (exact: the others' mean does not contain it), the round
    weights are kept as recorded (approximate: a flip changes the round's agreement and later trajectory). Per
    rule, the rounds until its score first falls below ``bound`` (None: never within the run)."""
    rows = []
    for run in runs:
        if run["rule"] != "fedshop" or run["attack"] != "none" or not run.get("loo_cosines"):
            continue
        for shop in shops:
            cos = run["loo_cosines"].get(shop)
            if not cos:
                continue
            for start in range(2, len(cos) + 1, 2):
                row = {"seed": run["seed"], "shop": shop, "flip_from": start}
                for name, (kind, rule) in LOO_RULES.items():
                    weights = _weights(run, shop, kind)
                    if weights is None or "alone" in name or "(max)" in name:
                        continue
                    c = [x if k + 1 < start else -x for k, x in enumerate(cos)]
                    hit = next((k + 1 for k in range(start - 1, len(c)) if rule(c[:k + 1], weights[:k + 1]) < bound),
                               None)
                    row[name.split(" [")[0]] = None if hit is None else hit - start
                rows.append(row)
    return rows


def print_loo_analysis(console: Console, rows: list[dict[str, Any]], bound: float) -> None:
    """The rules' margins as a table (nothing when no run recorded cosines)."""
    if not any(r["honest_total"] for r in rows):
        return
    table = Table(title=f"leave-one-out rules on the recorded cosines (bound {bound:g}); (score, attack, seed, "
                        "shop, round)")
    for col in ("rule", "honest lowest", "attacker highest", "margin", "honest below", "attacker below"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["rule"], str(r["honest_min"]), str(r["attacker_max"]),
                      "-" if r["margin"] is None else f"{r['margin']:+.3f}",
                      f"{r['honest_below']}/{r['honest_total']}", f"{r['attacker_below']}/{r['attacker_total']}")
    console.print(table)


def print_summary(console: Console, rows: list[dict[str, Any]]) -> None:
    """One table per report round: mean (min..max over seeds) of each cost, and the verdict."""
    for upto in sorted({r["rounds"] for r in rows}):
        table = Table(title=f"fedshop's default screens, one attacker of 8, after {upto} rounds: honest shops' mean "
                            "test CTR AUC cost, mean (min..max) over seeds")
        for col in ("attacker (share)", "attack", "seeds", "vs clean FedAvg", "vs floor (attacker absent)",
                    "floor itself", "attacker out", "honest out", "target"):
            table.add_column(col, justify="left" if col in ("attacker (share)", "attack", "target") else "right")
        for r in (x for x in rows if x["rounds"] == upto):
            share = f" ({r['attacker_share']:.0%})" if r["attacker_share"] is not None else ""
            n = r.get("attacker_rounds", upto * len(r["seeds"]))
            out = "-" if r["attacker_left_out_rounds"] is None else f"{r['attacker_left_out_rounds']}/{n}"
            attack = r["attack"] if r.get("turn_round", 1) == 1 else f"{r['attack']} from round {r['turn_round']}"
            table.add_row(f"{r['attacker'] or 'none (all 8 honest)'}{share}", attack, str(len(r["seeds"])),
                          _spread(r["cost_vs_clean"]), _spread(r["cost_vs_floor"]), _spread(r["floor_cost"]), out,
                          f"{r['honest_left_out']}/{r['honest_shop_rounds']}",
                          f"{'met' if r['met'] else 'NOT met'} (<= {r['target']})")
        console.print(table)


def main() -> None:
    """Run the planned cells (in parallel processes), print the summary tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report-rounds", default="", help="also report as if the runs stopped after these rounds "
                        "(each shop's best-validation round among them), e.g. 3,10; default: --rounds")
    parser.add_argument("--attackers", default="0", help="indexes of the attacking training shop, one run each, "
                        "e.g. 0,3,7 (largest, mid, smallest of the default world)")
    parser.add_argument("--seeds", default="", help="scenario seeds, e.g. 0,1,2; default: the scenario's")
    parser.add_argument("--sigma", type=float, default=5.0, help="noise attack's standard deviation")
    parser.add_argument("--turn-round", type=int, default=1, help="the attacker is honest before this round and "
                        "attacks from it on (a late turn; 'absent' likewise leaves from it on)")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--cell", action="append", default=[], help="RULE:ATTACK,ATTACK,... (repeatable); replaces "
                        "--rules x --attacks, e.g. --cell fedavg:none,absent --cell fedshop:none,x100,signflip")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="scenario override k=v")
    parser.add_argument("--screens", action="append", default=[],
                        help="fedshop rule only: a run-config key=value replacing a default screen setting, "
                             "e.g. robust-weight-cap=4 (the JSON records every robust-* value used)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--include", type=Path, nargs="*", default=[],
                        help="earlier output JSON files whose runs are reused (same settings) instead of rerun")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    cells = [(c.partition(":")[0], c.partition(":")[2].split(",")) for c in args.cell] or \
        [(rule, args.attacks.split(",")) for rule in args.rules.split(",")]
    unknown = sorted({a for _, atk in cells for a in atk} - set(ATTACKS)) + sorted({r for r, _ in cells} - set(RULES))
    if unknown:
        parser.error(f"unknown attack/rule {unknown}; attacks: {ATTACKS}, rules: {RULES}")
    overrides = parse_overrides(args.sets)
    screens = {k: float(v) if k != "robust-norm-action" else v
               for k, _, v in (item.partition("=") for item in args.screens)}
    seeds = [int(s) for s in args.seeds.split(",") if s] or [load_scenario(args.scenario, overrides).seed]
    attackers = [int(a) for a in args.attackers.split(",")]
    report_rounds = [int(r) for r in args.report_rounds.split(",") if r] or [args.rounds]
    if not 1 <= args.turn_round <= args.rounds:
        parser.error(f"--turn-round {args.turn_round} must be within rounds 1..{args.rounds}")
    if max(report_rounds) > args.rounds:
        parser.error(f"--report-rounds {report_rounds} goes beyond --rounds {args.rounds}")
    plan = []
    for seed in seeds:
        for rule, attacks in cells:
            for attack in attacks:
                for attacker in attackers[:1] if attack == "none" else attackers:
                    plan.append((rule, attack, attacker, seed))
    previous = [r for path in args.include for r in json.loads(path.read_text(encoding="utf-8"))["runs"]]
    meta = {"scenario": args.scenario, "overrides": overrides, "rounds": args.rounds, "report_rounds": report_rounds,
            "sigma": args.sigma, "turn_round": args.turn_round, "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}
    runs: list[dict[str, Any]] = []
    todo = []
    for rule, attack, attacker, seed in plan:
        screens_used = screens_for(rule, screens)
        old = [r for r in previous if r["rule"] == rule and r["attack"] == attack and r["seed"] == seed
               and r["rounds"] == args.rounds and (attack == "none" or r["attacker_index"] == attacker)
               and (attack == "none" or _turn(r) == args.turn_round)
               and r["overrides"] == {**overrides, "seed": seed}
               and same_screens(r["screens"], screens_used)]
        if old:
            runs.append(old[0])
        else:
            todo.append((rule, attack, attacker, seed))
    console.print(f"{len(plan)} runs planned, {len(runs)} reused, {len(todo)} to run with {args.jobs} job(s)")
    with tempfile.TemporaryDirectory(prefix="byzantine-") as tmp, \
            ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, args.scenario, {**overrides, "seed": seed}, rule, attack, rounds=args.rounds,
                               attacker=attacker, sigma=args.sigma, work=Path(tmp) / f"{seed}-{attacker}",
                               screens=screens, turn_round=args.turn_round): (rule, attack, attacker, seed)
                   for rule, attack, attacker, seed in todo}
        for future in as_completed(futures):
            res = future.result()
            runs.append(res)
            console.print(f"seed {res['seed']} {res['rule']:>8} {res['attack']:>8} attacker {res['attacker']}: "
                          f"honest CTR AUC best-val {res['honest_ctr_auc_best_val']:.4f}, attacker left out in "
                          f"{res['attacker_left_out_rounds']}/{args.rounds} rounds, honest left out "
                          f"{res['honest_left_out']} ({res['seconds']:.0f} s, load {res['loadavg'][0]:.1f})")
            atomic_write_text(args.out, json.dumps({**meta, "runs": runs}, indent=1) + "\n")
    meta["loadavg_end"] = os.getloadavg()
    summary = summarise(runs, report_rounds)
    print_summary(console, summary)
    bound = float(screens_for("fedshop", screens)["robust-loo-min-cosine"])
    analysis = loo_analysis(runs, bound)
    print_loo_analysis(console, analysis, bound)
    delays = late_flip_delays(runs, bound)
    if delays:
        table = Table(title="late-turning attacker offline (a clean run's cosines negated from round 'from' on): "
                            "rounds until caught (0 = its first flipped round; - = not within the run)")
        names = [k for k in delays[0] if k not in ("seed", "shop", "flip_from")]
        for col in ("seed", "shop", "from", *names):
            table.add_column(col)
        for row in delays:
            table.add_row(str(row["seed"]), row["shop"], str(row["flip_from"]),
                          *("-" if row.get(k) is None else str(row[k]) for k in names))
        console.print(table)
    atomic_write_text(args.out, json.dumps({**meta, "summary": summary, "loo_analysis": analysis,
                                            "late_flip_delays": delays, "runs": runs}, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
