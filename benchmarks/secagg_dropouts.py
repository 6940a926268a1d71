"""SecAgg+ rounds under dropouts at every stage: Flower 1.42's workflow against fedshop's `DropTolerantSecAggPlus`.

Seven toy shops (fixed updates, no training) over `InProcessGrid`; three of them may each be gone at one
stage (none, setup, share_keys, collect_masked_vectors, unmask): all 125 combinations, with each key shared
with every shop (`secagg-num-shares` 1.0) and with 5 (random neighbour sets). A round is "exact" when the
checkpoint is the plain mean of the shops that sent a masked vector (within one quantum), "halted" when
SecAgg+ stopped it (threshold not met, or every survivor failed unmasking), "wrong" or "crash" otherwise.
Writes benchmarks/results/secagg_dropouts.json.

    .venv/bin/python benchmarks/secagg_dropouts.py
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.server.workflow import SecAggPlusWorkflow

import server.secagg_settings as secagg_settings
from client.secure_client import make_secure_app
from server.checkpoint import latest_checkpoint
from server.federation_settings import FederationSettings
from server.secagg_settings import DropTolerantSecAggPlus, SecAggSettings
from server.secure import run_secure_federation
from server.strategies import RunFailed
from shared.atomic import atomic_write_text
from simulations.privacy.in_process_grid import InProcessGrid, nodes

SHAPES = {"emb.weight": (64, 8), "tower.weight": (8, 16), "tower.bias": (8,)}
STAGES = (None, "setup", "share_keys", "collect_masked_vectors", "unmask")
N_SHOPS = 7


def _update(shop: int) -> list[np.ndarray]:
    """Shop ``shop``'s fixed update."""
    rng = np.random.default_rng(shop)
    return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in SHAPES.values()]


class _Shop(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.shop = int(context.node_config["partition-id"])

    def fit(self, parameters, config):
        return _update(self.shop), 1, {"shop-index": self.shop}

    def evaluate(self, parameters, config):
        return 0.0, 1, {"shop-index": self.shop}


def one_round(gone: dict[int, str], num_shares: float) -> str:
    """exact | halted | wrong | crash: one SecAgg+ round with node ``n`` gone at stage ``gone[n]``."""
    def drop(nid, msg):
        return nid in gone and gone[nid] == msg.content.config_records.get("secaggplus_configs", {}).get("stage")

    grid = InProcessGrid(make_secure_app(lambda ctx: _Shop(ctx).to_client()), nodes(N_SHOPS), drop=drop)
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            run_secure_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                  FederationSettings(num_server_rounds=1, run_dir=run_dir, min_shops=2),
                                  SecAggSettings(num_shares=num_shares, reconstruction_threshold=0.6),
                                  initial={k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
                                  shop_names=[f"s{i}" for i in range(N_SHOPS)])
        except RunFailed:
            return "halted"
        except Exception:  # what the coordinator would crash with
            return "crash"
        ckpt = latest_checkpoint(run_dir)
    sent = [s for s in range(N_SHOPS) if gone.get(101 + s) in (None, "unmask")]  # a masked vector went out
    plain = [np.mean([_update(s)[j] for s in sent], axis=0) for j in range(len(SHAPES))]
    err = max(float(np.abs(ckpt.arrays[k] - p).max()) for k, p in zip(SHAPES, plain, strict=True))
    return "exact" if err < SecAggSettings().quantisation_step() else "wrong"


def main() -> None:
    """Every combination, with Flower's workflow and with fedshop's; prints and writes the counts."""
    logging.disable(logging.WARNING)
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, workflow in (("flower", SecAggPlusWorkflow), ("fedshop", DropTolerantSecAggPlus)):
        secagg_settings.DropTolerantSecAggPlus = workflow  # what `SecAggSettings.workflow` builds
        try:
            for shares in (1.0, 5):
                counts: Counter[str] = Counter()
                for combo in itertools.product(STAGES, repeat=3):
                    counts[one_round({101 + i: s for i, s in enumerate(combo) if s}, shares)] += 1
                out.setdefault(name, {})[f"num_shares={shares:g}"] = dict(counts)
                print(name, f"num_shares={shares:g}", dict(counts), flush=True)
        finally:
            secagg_settings.DropTolerantSecAggPlus = DropTolerantSecAggPlus
    path = Path(__file__).parent / "results" / "secagg_dropouts.json"
    atomic_write_text(path, json.dumps({"shops": N_SHOPS, "combinations": len(STAGES) ** 3, **out}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
