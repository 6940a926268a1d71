"""What the coordinator sees of given updates under SecAgg+: one real round over replayed updates."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.common import bytes_to_ndarray

from client.secure_client import make_secure_app
from server.checkpoint import latest_checkpoint
from server.secure import SecAggSettings, run_secure_federation
from server.server_app import FederationSettings
from simulations.privacy.in_process_grid import InProcessGrid, nodes


class ReplayShop(NumPyClient):
    """Sends a precomputed update through SecAgg+: the coordinator's view of real updates, without retraining."""

    def __init__(self, context: Context, initial: list[np.ndarray], updates: list[list[np.ndarray]]) -> None:
        self.index = int(context.node_config["partition-id"])
        self.initial, self.updates = initial, updates

    def fit(self, parameters, config):
        return [(a + u).astype(np.float32) for a, u in zip(self.initial, self.updates[self.index], strict=True)], 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def secagg_view(initial: Mapping[str, np.ndarray], updates: list[Mapping[str, np.ndarray]], run_dir: Path,
                secagg: SecAggSettings | None = None) -> tuple[list[np.ndarray], dict[str, np.ndarray], float]:
    """Run one SecAgg+ round over ``updates``: (per-shop vectors the coordinator got, the aggregate, seconds)."""
    keys = sorted(initial)
    init = [np.asarray(initial[k], np.float32) for k in keys]
    ups = [[np.asarray(u[k]) for k in keys] for u in updates]
    app = make_secure_app(lambda ctx: ReplayShop(ctx, init, ups).to_client())
    grid = InProcessGrid(app, nodes(len(updates)))
    settings = FederationSettings(num_server_rounds=1, run_dir=str(run_dir), min_shops=2, method="secagg-view")
    start = time.perf_counter()
    run_secure_federation(grid, Context(1, 0, {}, RecordDict(), {}), settings, secagg or SecAggSettings(),
                          initial=dict(zip(keys, init, strict=True)), shop_names=[f"shop-{i}" for i in range(len(ups))])
    seconds = time.perf_counter() - start
    views: dict[int, np.ndarray] = {}
    for r in grid.received:
        cfg = r.content.config_records.get("secaggplus_configs") if r.content is not None else None
        if cfg is not None and "masked_params" in cfg:
            # SecAgg+ puts the node's quantised weight factor in front of the parameters (flwr factor_combine).
            view = np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg["masked_params"][1:]])
            if view.size != sum(a.size for a in init):
                raise RuntimeError(f"SecAgg+ masked vector has {view.size} values, the encoder "
                                   f"{sum(a.size for a in init)}: Flower's masked_params layout changed")
            views[r.node_id] = view
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, "SecAgg+ round produced no aggregate"
    return [views[n].astype(np.float64) for n in sorted(views)], ckpt.arrays, seconds
