"""A Sybil group: a share of many tiny shops sign-flipping together, with and without the small-update exemption.

`benchmarks/scale.py`'s per-shop world (about 900 impressions per shop, small encoder) with ``--shops`` shops;
every ``1 / share``-th shop (by node order: a mix of sizes) attacks every round. In-process (the real ClientApp and
ServerApp loop, `benchmarks/byzantine.py`'s attacker wrapper). Arms: FedAvg clean, FedAvg with the Sybils absent
(the floor), fedshop's default screens clean and under attack, and under attack with the exemption off
(``robust-small-pull-total = 0``). Reports the honest shops' mean test CTR AUC in the last round and who was left out.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/sybil.py --shops 200 --share 0.1 --rounds 3 \\
        --out benchmarks/results/sybil_200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from byzantine import SCREENS_OFF, Attacker, attack_fn  # noqa: E402 - benchmarks/ is on the path (this folder)
from scale import uptime, world_overrides  # noqa: E402

ARMS = {"fedavg-clean": ("fedavg", "none", {}), "fedavg-absent": ("fedavg", "absent", {}),
        "fedshop-clean": ("fedshop", "none", {}), "fedshop-signflip": ("fedshop", "signflip", {}),
        "fedshop-signflip-no-exemption": ("fedshop", "signflip", {"robust-small-pull-total": 0.0})}


class Sybils(Attacker):
    """`byzantine.Attacker` for a set of nodes."""

    def __init__(self, app: Any, node_ids: set[int], attack: str) -> None:
        super().__init__(app, -1, attack_fn(attack, 5.0, np.random.default_rng(0)), absent=attack == "absent")
        self.node_ids = node_ids

    def attacks(self, msg: Any, context: Any) -> bool:
        """Every training instruction to a Sybil node."""
        from flwr.app import MessageType

        return context.node_id in self.node_ids and msg.metadata.message_type == MessageType.TRAIN


def run_arm(arm: str, shops_n: int, share: float, rounds: int) -> dict[str, Any]:
    """One federation of one arm; the honest shops' mean test CTR AUC and the left-out counts."""
    import torch

    from client.client_app import app as client_app
    from server.server_app import FederationSettings, run_federation
    from shared.atomic import atomic_write_text
    from shared.scenario import load_scenario
    from simulations.federated import SCENARIO_FILE, run_config
    from simulations.privacy.in_process_grid import InProcessGrid, nodes

    torch.set_num_threads(1)
    rule, attack, screens = ARMS[arm]
    scenario = load_scenario("default", world_overrides(shops_n, "per-shop"))
    shops = [s.name for s in scenario.federation_shops()]
    node_configs = nodes(len(shops))
    node_ids = sorted(node_configs)
    step = max(1, round(1 / share))
    sybil_idx = set(range(0, len(shops), step))
    with tempfile.TemporaryDirectory(prefix="fedshop-sybil-") as tmp:
        run_dir = Path(tmp) / arm
        run_dir.mkdir()
        atomic_write_text(run_dir / SCENARIO_FILE, tomli_w.dumps(scenario.raw))
        config = run_config(scenario, run_dir, method="fedshop", rounds=rounds, resume=False)
        config["strategy"] = "fedavg"
        config.update(SCREENS_OFF if rule == "fedavg" else screens)
        grid = InProcessGrid(Sybils(client_app, {node_ids[i] for i in sybil_idx}, attack), node_configs,
                             run_config=config)
        left: list[dict[str, int]] = []

        def on_round(report: Any, _total: int) -> None:
            out = set(report.left_out)
            sybil_names = {shops[i] for i in sybil_idx}
            left.append({"sybils_out": len(out & sybil_names), "honest_out": len(out - sybil_names),
                         "exempt": len(report.exempt), "sybils_exempt": len(set(report.exempt) & sybil_names)})

        start = time.perf_counter()
        run_federation(grid, FederationSettings.from_config(config), on_round)
        rows = pd.read_csv(run_dir / "metrics.csv")
    honest = [s for i, s in enumerate(shops) if i not in sybil_idx]
    ctr = rows[(rows["task"] == "ctr") & (rows["metric"] == "auc") & (rows["split"] == "test")
               & rows["shop"].isin(honest)]
    by_round = ctr.groupby("round")["value"].mean()
    return {"arm": arm, "rule": rule, "attack": attack, "screens": screens, "shops": len(shops),
            "sybils": len(sybil_idx), "honest_ctr_auc_last": float(by_round.iloc[-1]),
            "honest_ctr_auc_by_round": by_round.round(4).tolist(), "rounds": left,
            "seconds": round(time.perf_counter() - start, 1), "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shops", type=int, default=200)
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sybil.json")
    args = parser.parse_args()
    before = uptime()
    arms = args.arms.split(",")
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(run_arm, arms, [args.shops] * len(arms), [args.share] * len(arms),
                             [args.rounds] * len(arms)))
    clean = next((r["honest_ctr_auc_last"] for r in runs if r["arm"] == "fedavg-clean"), None)
    for r in runs:
        r["cost_vs_fedavg_clean"] = round(clean - r["honest_ctr_auc_last"], 4) if clean is not None else None
        print(json.dumps({k: r[k] for k in ("arm", "honest_ctr_auc_last", "cost_vs_fedavg_clean", "rounds",
                                            "seconds")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "uptime_before": before, "uptime_after": uptime(),
                                    "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
