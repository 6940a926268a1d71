"""The `pool` simulation engine: the fedshop ServerApp over a `PoolGrid` of forked worker processes.

Selected by `fedshop simulate --engine pool` or `federation.engine = "pool"`. The ServerApp (strategy,
screening, checkpoints, metrics) and the ClientApp handlers are the same code as under Ray; only the
transport differs. The synthetic world is generated once here, before the workers fork, and shared
copy-on-write; each worker builds the tensors of the shops it owns. `scaled_world` gives the world
knobs for N shops that keep the total near one million impressions.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from shared.scenario import load_scenario
from simulations.local_grid import node_configs
from simulations.pool_grid import PoolGrid, default_workers

logger = logging.getLogger(__name__)

# What a shop's first message imports lazily (~2-3 CPU s in a fresh process: the optimizer's first step
# pulls in torch._dynamo, the metrics sklearn): imported once here, before the fork, so W workers do not
# import them W times (the centralised arm imports them once).
PRE_FORK_IMPORTS = ("torch._dynamo", "sklearn.metrics")
TOTAL_IMPRESSIONS = 1_000_000
SIZE_RATIO = 10.0  # largest / smallest shop of a scaled world


def scaled_world(n_shops: int, total: int = TOTAL_IMPRESSIONS, size_exponent: float = 1.2,
                 small_share: float = 3 / 8) -> dict[str, Any]:
    """`data.synthetic.*` overrides for ``n_shops`` power-law shops whose impressions add up to about ``total``.

    Keeps the default world's shape (largest shop `SIZE_RATIO` x the smallest, 3 in 8 flagged small)
    and drops the per-shop evaluation top-up, which alone would add 10,000 impressions per shop.
    """
    if n_shops < 1 or total < n_shops:
        raise ValueError(f"n_shops={n_shops}, total={total}: need 1 <= n_shops <= total impressions")
    rank = np.arange(1, n_shops + 1, dtype=float) ** -size_exponent
    unit = (rank - rank[-1]) / (rank[0] - rank[-1]) if n_shops > 1 else np.ones(1)
    smallest = max(1, int(total / (n_shops + (SIZE_RATIO - 1) * float(unit.sum()))))
    return {"data.synthetic.n_shops": n_shops, "data.synthetic.min_impressions": smallest,
            "data.synthetic.max_impressions": int(smallest * SIZE_RATIO),
            "data.synthetic.size_exponent": size_exponent,
            "data.synthetic.n_small_shops": max(0, min(n_shops - 1, round(n_shops * small_share))),
            "data.synthetic.eval_impressions": 0}


def import_before_fork(modules: tuple[str, ...] = PRE_FORK_IMPORTS) -> None:
    """Import the shops' lazily imported modules in the parent, so every forked worker shares them."""
    for name in modules:
        importlib.import_module(name)


def run_pool(server_app: Callable[[Any, Context], None], client_app: Any, config: dict[str, Any], n_shops: int,
             *, workers: int | None = None) -> PoolGrid:
    """Run ``server_app`` against ``n_shops`` nodes served by ``workers`` forked processes; returns the grid.

    The world the shops load (`config["scenario"]` at `config["seed"]`) is generated here first, so
    the workers inherit it instead of each regenerating it. Shops are spread over the workers by
    their interaction rows (`balanced_groups`), so one worker does not get all the large shops.
    """
    seed = config.get("seed")
    scenario = load_scenario(str(config["scenario"]), {"seed": int(seed)} if seed is not None else None)
    shops = scenario.federation_shops()  # cached per process: the forked workers find it built
    if len(shops) != n_shops:
        raise ValueError(f"scenario has {len(shops)} federation shops, not {n_shops}")
    count = workers or default_workers()
    import_before_fork()
    logger.info("pool engine: %d shops on %d workers", n_shops, count)
    nodes = node_configs(n_shops)
    loads = {nid: float(len(shops[cfg["partition-id"]].interactions)) for nid, cfg in nodes.items()}
    grid = PoolGrid(client_app, nodes, workers=count, run_config=dict(config), loads=loads)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(config))
    with grid:
        server_app(grid, context)
    for failure in grid.failures:
        logger.warning("pool engine: %s", failure)
    return grid
