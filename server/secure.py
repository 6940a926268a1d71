"""The coordinator with SecAgg+: Flower's `SecAggPlusWorkflow` on the legacy workflow path.

In flwr 1.42 SecAgg+ runs only as `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` over a
`LegacyContext` and a legacy strategy. The coordinator receives each shop's encoder only as a
masked, quantised integer vector and learns just the sum; no cryptography here is our own.
What still arrives in plaintext: each shop's training metrics, its weight and evaluation metrics.

Selected by run config `secure-aggregation = true` (the main ServerApp, `server.server_app`, then
calls `run_secure_federation`) with options `secagg-num-shares`, `secagg-reconstruction-threshold`,
`secagg-clipping-range`, `secagg-quantization-range`, `secagg-max-weight`, `secagg-weighting`
(uniform | examples), `secagg-timeout` (`server.secagg_settings`). Shops answer through the main
ClientApp, which hands these legacy messages to `client.secure_client.secure_app`; that runs the same
shop round as the plain path (`client.shop_round`), so join-round/warm-up (weight 0), personal-mix,
objective = meta, FedProx's proximal-mu and DP-SGD behave alike. Strategies other than fedavg/fedprox,
share = all-shareable and resume are refused by name before round 1
(`server.federation_settings.check_secure_supported`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from server.checkpoint import Checkpoint, capture_rng, save_checkpoint
from server.federation_common import Progress, eval_split_for_round, initial_encoder, scenario_shop_names
from server.federation_settings import FederationSettings, check_secure_supported
from server.metrics_log import MetricsLog, eval_rows_by_split, train_rows
from server.node_identity import ShopClaims
from server.secagg_settings import SecAggSettings
from server.strategies import RoundReport
from shared.protocol import EVAL_SPLIT, PROXIMAL_MU, SECAGG_WEIGHTING, SERVER_ROUND, SHOP_INDEX
from shared.scenario import load_scenario

logger = logging.getLogger(__name__)

class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg that logs per-shop plaintext metrics and checkpoints the (already summed) encoder."""

    def __init__(self, *, keys: list[str], run_dir: Path, method: str, shop_name: Callable[[int], str],
                 eval_split: Callable[[int], str], keep_checkpoints: int = 2, progress: Progress | None = None,
                 num_rounds: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys, self.run_dir, self.shop_name, self.keep = keys, run_dir, shop_name, keep_checkpoints
        self.eval_split = eval_split
        self.log = MetricsLog(run_dir / "metrics.csv", method)
        self.progress, self.num_rounds = progress, num_rounds
        self._report: RoundReport | None = None
        self.claims = ShopClaims()  # shop-index claims checked as on the plain path (server.node_identity)

    def _label(self, proxy: Any, metrics: dict[str, Any]) -> str:
        """The shop a result's row is labelled with: its checked `shop-index` claim, else `node-<id>` (logged).

        The sum is already unmasked here, so a refused claim cannot be left out of it, only out of another
        shop's row.
        """
        node = getattr(proxy, "node_id", None)
        node = int(node) if node is not None else int(getattr(proxy, "cid", -1))
        index, why = self.claims.check(node, metrics.get(SHOP_INDEX))
        if index is None:
            logger.warning("node %s: shop-index claim refused (%s); its metrics are labelled node-%s", node, why, node)
            return f"node-{node}"
        return self.shop_name(index)

    def aggregate_fit(self, server_round, results, failures):
        """SecAgg+ already replaced every result's parameters by the unmasked weighted mean; log and checkpoint.

        A round in which every shop sent weight 0 (late joiners waiting or warming up) has no mean:
        the global encoder is kept, as the plain path does.
        """
        self._report = RoundReport(server_round=server_round, arrays=ArrayRecord())
        for proxy, res in results:
            shop = self._label(proxy, dict(res.metrics))
            self.log.add(server_round, shop, "train", train_rows(res.metrics))
            self._report.train[shop] = {k: float(v) for k, v in res.metrics.items() if k != SHOP_INDEX}
        for failure in failures:
            logger.warning("round %d: a shop dropped out of secure aggregation (%s)", server_round,
                           type(failure).__name__)
        params = None
        if results and sum(res.num_examples for _, res in results) > 0:
            params = results[0][1].parameters  # the same unmasked mean in every result
        else:
            logger.warning("round %d: no shop's update counts (all weights 0); global encoder kept", server_round)
        if params is not None:
            arrays = dict(zip(self.keys, parameters_to_ndarrays(params), strict=True))
            arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
            params = ndarrays_to_parameters(list(arrays.values()))
            save_checkpoint(self.run_dir, Checkpoint(server_round, arrays, {}, capture_rng(),
                                                     {"secure-aggregation": True}), keep=self.keep)
            self._report.arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        self.log.write()
        return params, {}

    def aggregate_evaluate(self, server_round, results, failures):
        """Log every shop's per-task metrics (split-prefixed keys go to their split) and report the round."""
        report = self._report or RoundReport(server_round=server_round, arrays=ArrayRecord())
        report.eval_split = self.eval_split(server_round)
        for proxy, res in results:
            shop = self._label(proxy, dict(res.metrics))
            for split, rows in eval_rows_by_split(res.metrics, report.eval_split).items():
                self.log.add(server_round, shop, split, rows)
            report.evaluate[shop] = {k: float(v) for k, v in res.metrics.items() if k != SHOP_INDEX}
        self.log.write()
        if self.progress is not None:
            self.progress(report, self.num_rounds)
        self._report = None
        return super().aggregate_evaluate(server_round, results, failures)


def run_secure_federation(grid: Grid, context: Context, settings: FederationSettings,
                          secagg: SecAggSettings, *, initial: dict[str, np.ndarray] | None = None,
                          shop_names: list[str] | None = None, progress: Progress | None = None) -> Path:
    """Run ``settings.num_server_rounds`` SecAgg+ rounds on ``grid``; returns the run directory.

    ``initial`` (default: the scenario's initial encoder) fixes the array names and starting values.
    """
    check_secure_supported(settings)
    run_dir = Path(settings.run_dir or Path.cwd() / "runs" / f"secure-{context.run_id}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    if initial is None:
        initial = {k: a.numpy() for k, a in initial_encoder(scenario).items()}
    keys = list(initial)

    @functools.cache
    def names() -> list[str]:
        return shop_names if shop_names is not None else scenario_shop_names(scenario)

    def split_of(server_round: int) -> str:
        return eval_split_for_round(settings.eval_split, settings.final_split, server_round,
                                    settings.num_server_rounds)

    def client_config(server_round: int) -> dict[str, Any]:
        cfg = settings.client_config(scenario.seed)
        cfg.update({SERVER_ROUND: server_round, SECAGG_WEIGHTING: secagg.weighting, EVAL_SPLIT: split_of(server_round)})
        if settings.strategy == "fedprox":  # what Flower's FedProx sends on the plain path
            cfg[PROXIMAL_MU] = settings.proximal_mu
        return cfg

    strategy = SecureFedAvg(
        keys=keys, run_dir=run_dir, method=settings.method, progress=progress,
        num_rounds=settings.num_server_rounds, keep_checkpoints=settings.keep_checkpoints,
        shop_name=lambda i: names()[i] if 0 <= i < len(names()) else f"shop-{i}", eval_split=split_of,
        fraction_fit=settings.fraction_train, fraction_evaluate=1.0, min_fit_clients=max(2, settings.min_shops),
        min_evaluate_clients=max(2, settings.min_shops), min_available_clients=max(2, settings.min_shops),
        initial_parameters=Parameters(tensors=[], tensor_type=""),
        on_fit_config_fn=client_config, on_evaluate_config_fn=client_config,
        fit_metrics_aggregation_fn=lambda _: {}, evaluate_metrics_aggregation_fn=lambda _: {},
    )
    strategy.initial_parameters = ndarrays_to_parameters([np.asarray(a) for a in initial.values()])
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.num_server_rounds),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg.workflow())(grid, legacy)
    return run_dir
