"""What the direction checks see on many tiny shops: per round, every update's cosines, pull and the decisions.

Runs `benchmarks/scale.py`'s per-shop world (about 900 impressions per shop, small encoder, pool engine) for
``--shops`` shops, with `server.robust.screen` wrapped to record its inputs and outputs each round, and replays
candidate rules on the recorded cosines (`replay`):

* ``absolute``: leave out below ``robust-min-cosine`` (the rule before the small-update exemption);
* ``robust-z K``: leave out below the threshold *and* K robust z-scores (median/MAD) below the round's cosines;
* ``small-pull P/T``: the small-update exemption (`server.robust.exempt_small`) with per-update pull P, total T
  (the direction check only; the replay does not re-run the leave-one-out check).

Also, per round, the cosine a sign-flipped tiny update would score (about minus its honest one, as one update of
hundreds barely moves the coordinate median): how far a flip can be told from an honest tiny update by direction.

    .venv/bin/python benchmarks/small_screen.py --shops 200 --rounds 3 --out benchmarks/results/small_screen_200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale import uptime, world_overrides  # noqa: E402 - benchmarks/ is on the path (this script's folder)


def robust_z(cosines: np.ndarray) -> np.ndarray:
    """Robust z-scores of a round's cosines: (c - median) / (1.4826 x MAD)."""
    med = float(np.median(cosines))
    mad = 1.4826 * float(np.median(np.abs(cosines - med)))
    return (cosines - med) / mad if mad > 0 else np.zeros_like(cosines)


CANDIDATES = ((0.001, 0.01), (0.01, 0.01), (0.01, 0.05), (0.01, 0.25))  # (robust-small-pull, -total)


def replay(rounds: list[dict[str, Any]], min_cosine: float) -> dict[str, list[int]]:
    """Per candidate rule, how many of each round's direction-checked updates it leaves out."""
    from server.robust import RobustSettings, exempt_small

    out: dict[str, list[int]] = {"absolute": [], "robust-z 3": [], "robust-z 4": []}
    for p, t in CANDIDATES:
        out[f"small-pull {p}/{t}"] = []
    for r in rounds:
        kept = r["kept_before_direction"]
        cos = np.asarray([r["cosines"][i] for i in kept])
        z = robust_z(cos)
        flagged = [i for i, c in zip(kept, cos, strict=True) if c < min_cosine]
        out["absolute"].append(len(flagged))
        for k in (3, 4):
            out[f"robust-z {k}"].append(int(sum(1 for c, zz in zip(cos, z, strict=True) if c < min_cosine and zz < -k)))
        pulls = {int(i): v for i, v in r["pulls"].items()}
        for p, t in CANDIDATES:
            small, _ = exempt_small(flagged, pulls, RobustSettings(small_pull=p, small_pull_total=t), 0.0)
            out[f"small-pull {p}/{t}"].append(len(flagged) - len(small))
    return out


def sybil_replay(rounds: list[dict[str, Any]], min_cosine: float, share: float = 0.05,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Per round, ``share`` of the shops (drawn at random) sign-flipping, on the recorded cosines and pulls.

    A flip's cosine is taken as minus its honest one (one update of hundreds barely moves the coordinate median;
    approximate: the flips' joint pull on the median is not modelled). Counts the flips the absolute threshold
    catches, those the default exemption (`server.robust.exempt_small`, honest flagged and flips competing for the
    budget, smallest pull first) still leaves out, the flips' exempted pull and the honest updates left out.
    """
    from server.robust import RobustSettings, exempt_small

    settings = RobustSettings()
    rng = np.random.default_rng(seed)
    out = []
    for r in rounds:
        kept = r["kept_before_direction"]
        pulls = {int(i): v for i, v in r["pulls"].items()}
        sybils = set(rng.choice(kept, size=int(share * len(kept)), replace=False).tolist())
        cos = {i: -r["cosines"][i] if i in sybils else r["cosines"][i] for i in kept}
        flagged = [i for i in kept if cos[i] < min_cosine]
        small, used = exempt_small(flagged, pulls, settings, 0.0)
        out.append({"sybils": len(sybils), "sybils_flagged_by_threshold": len(sybils & set(flagged)),
                     "sybils_left_out_with_exemption": len(sybils & (set(flagged) - set(small))),
                     "sybil_pull_exempted": round(sum(pulls[i] for i in small if i in sybils), 5),
                     "sybil_pull_total": round(sum(pulls[i] for i in sybils), 5),
                     "honest_left_out_with_exemption": len((set(flagged) - set(small)) - sybils),
                     "honest_flagged": len(set(flagged) - sybils), "pull_used": round(used, 5)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shops", type=int, default=200, help="0: the default world itself (8 shops)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="scenario override k=v")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "small_screen.json")
    parser.add_argument("--replay", type=Path, help="only replay the rules on this earlier output (no run)")
    args = parser.parse_args()
    if args.replay:
        earlier = json.loads(args.replay.read_text())
        for r in earlier["rounds"]:
            r["pulls"] = {int(i): v for i, v in r["pulls"].items()}
        print(json.dumps(replay(earlier["rounds"], earlier["rounds"][0]["min_cosine"]), indent=1))
        for share in (0.05, 0.2):
            print(f"sybils {share:.0%}:", json.dumps(sybil_replay(earlier["rounds"], earlier["rounds"][0]["min_cosine"],
                                                              share), indent=None))
        return

    import torch

    import server.robust as robust
    import server.strategies as strategies
    from shared.scenario import load_scenario
    from simulations.console import configure_logging
    from simulations.federated import run_federated

    configure_logging(False)
    torch.set_num_threads(1)
    overrides = world_overrides(args.shops, "per-shop") if args.shops else {}
    for kv in args.sets:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "-0123456789tf[" else v
    scenario = load_scenario("default", overrides)
    rounds: list[dict[str, Any]] = []
    real = robust.screen

    def recording(deltas: list[np.ndarray], claims: list[float], *a: Any, **kw: Any) -> robust.Screened:
        res = real(deltas, claims, *a, **kw)
        settings = a[1] if len(a) > 1 else kw["settings"]
        norm_out = {i for i, why in res.left_out.items() if why.startswith("update norm")}
        kept = [i for i in range(len(deltas)) if i not in norm_out]
        med = float(np.median(res.norms))
        agg = sum(res.weights[i] * deltas[i].astype(np.float64) for i in range(len(deltas)) if i not in res.left_out)
        wsum = sum(res.weights[i] for i in range(len(deltas)) if i not in res.left_out)
        rounds.append({
            "n": len(deltas), "median_norm": med,
            "aggregate_norm_over_median": float(np.linalg.norm(agg / wsum)) / med if wsum > 0 and med > 0 else None,
            "norms": [round(x, 6) for x in res.norms], "claims": [round(c, 1) for c in res.claims],
            "cosines": [round(c, 5) for c in res.cosines], "loo": {i: round(c, 5) for i, c in res.loo.items()},
            "pulls": {i: round(p, 7) for i, p in res.pulls.items()}, "kept_before_direction": kept,
            "left_out": {i: why[:60] for i, why in res.left_out.items()},
            "exempt": {i: why[:60] for i, why in res.exempt.items()}, "small_pull_used": res.small_pull_used,
            "min_cosine": settings.min_cosine, "loo_min_cosine": settings.loo_min_cosine,
        })
        return res

    strategies.screen = recording
    before, start = uptime(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedshop-small-screen-") as tmp:
        run_federated(scenario, Path(tmp) / "run", rounds=args.rounds, engine="pool", workers=args.workers)
    summary = []
    for n, r in enumerate(rounds, 1):
        kept = r["kept_before_direction"]
        cos = np.asarray([r["cosines"][i] for i in kept]) if r["cosines"] else np.zeros(0)
        loo = np.asarray(list(r["loo"].values())) if r["loo"] else np.zeros(0)
        pulls = np.asarray(list(r["pulls"].values())) if r["pulls"] else np.zeros(0)
        flagged = [i for i in kept if r["cosines"] and r["cosines"][i] < r["min_cosine"]]
        row = {"round": n, "updates": r["n"],
               "cosine_quantiles_0_1_5_50_95": np.quantile(cos, [0, 0.01, 0.05, 0.5, 0.95]).round(4).tolist()
               if cos.size else None,
               "flip_scores_above_min_cosine": int((-cos >= r["min_cosine"]).sum()) if cos.size else None,
               "loo_quantiles_0_1_5_50_95": np.quantile(loo, [0, 0.01, 0.05, 0.5, 0.95]).round(4).tolist()
               if loo.size else None,
               "loo_below_bound": int((loo < r["loo_min_cosine"]).sum()) if loo.size else None,
               "pull_max": float(pulls.max()) if pulls.size else None,
               "pull_median": float(np.median(pulls)) if pulls.size else None,
               "flagged_by_direction": len(flagged),
               "flagged_pull_sum": float(sum(r["pulls"].get(i, 0.0) for i in flagged)),
               "aggregate_norm_over_median": r["aggregate_norm_over_median"],
               "left_out": len(r["left_out"]), "exempt": len(r["exempt"]), "small_pull_used": r["small_pull_used"]}
        summary.append(row)
        print(json.dumps(row))
    result = {"argv": sys.argv[1:], "shops": args.shops, "overrides": {k: str(v) for k, v in overrides.items()},
              "seconds": time.perf_counter() - start, "uptime_before": before, "uptime_after": uptime(),
              "cpus": os.cpu_count(), "summary": summary,
              "replay_left_out_per_round": replay(rounds, rounds[0]["min_cosine"] if rounds else -0.1),
              "rounds": rounds}
    print(json.dumps(result["replay_left_out_per_round"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
