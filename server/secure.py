"""The coordinator with SecAgg+: Flower's `SecAggPlusWorkflow` on the legacy workflow path.

In flwr 1.42 SecAgg+ runs only as `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` over a
`LegacyContext` and a legacy strategy. The coordinator receives each shop's encoder only as a
masked, quantised integer vector and learns just the sum; no cryptography here is our own.
What still arrives in plaintext: each shop's training metrics, its weight and evaluation metrics.

Selected by run config `secure-aggregation = true` (the main ServerApp, `server.server_app`, then
calls `run_secure_federation`) with options `secagg-num-shares`, `secagg-reconstruction-threshold`,
`secagg-clipping-range`, `secagg-quantization-range`, `secagg-max-weight`, `secagg-weighting`
(uniform | examples), `secagg-timeout`. Shops answer through the main ClientApp, which hands these
legacy messages to `client.secure_client.secure_app`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import Checkpoint, capture_rng, save_checkpoint
from server.dp import split_config as split_dp_config
from server.metrics_log import MetricsLog, eval_rows_by_split, train_rows
from server.server_app import FederationSettings, Progress, initial_encoder
from server.strategies import RoundReport
from shared.scenario import load_scenario

logger = logging.getLogger(__name__)

SECURE_SWITCH = "secure-aggregation"


@dataclass
class SecAggSettings:
    """SecAgg+ run options (`secagg-*` in the run config)."""

    num_shares: float = 1.0  # <= 1: share of sampled shops each key is shared with; > 1: a count
    reconstruction_threshold: float = 0.6  # <= 1: share of num_shares needed to unmask; > 1: a count
    clipping_range: float = 8.0  # weights are clipped to +-this before quantisation
    quantization_range: int = 1 << 22
    max_weight: float = 1.0  # largest per-shop weight; 1 with uniform weighting (full precision)
    weighting: str = "uniform"  # uniform | examples (weight = num-examples; raise max-weight to match)
    timeout: float = 0.0  # seconds per protocol stage; 0 = wait for every reply

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ fit workflow with these settings."""
        def count_or_share(v: float) -> int | float:
            return int(v) if v > 1 else float(v)
        return SecAggPlusWorkflow(num_shares=count_or_share(self.num_shares),
                                  reconstruction_threshold=count_or_share(self.reconstruction_threshold),
                                  max_weight=self.max_weight, clipping_range=self.clipping_range,
                                  quantization_range=int(self.quantization_range),
                                  timeout=self.timeout or None)

    def quantisation_step(self) -> float:
        """One quantum: stochastic rounding moves each shop's value, hence the mean, by less than this."""
        return 2 * self.clipping_range / self.quantization_range


def split_config(config: dict[str, Any]) -> tuple[bool, SecAggSettings, dict[str, Any]]:
    """(secure on?, SecAgg+ settings, the remaining run config for `FederationSettings`)."""
    known = {f.name for f in fields(SecAggSettings)}
    values: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in config.items():
        if key.startswith("secagg-"):
            name = key[len("secagg-"):].replace("-", "_")
            if name not in known:
                raise ValueError(f"run config key '{key}' is unknown. Fix: use one of "
                                 f"{sorted('secagg-' + k.replace('_', '-') for k in known)}")
            values[name] = value
        elif key != SECURE_SWITCH:
            rest[key] = value
    settings = SecAggSettings(**{k: (str(v) if k == "weighting" else float(v)) for k, v in values.items()})
    if settings.weighting not in ("uniform", "examples"):
        raise ValueError(f"secagg-weighting='{settings.weighting}' is unknown. Fix: use 'uniform' or 'examples'")
    return bool(config.get(SECURE_SWITCH, False)), settings, rest


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

    def aggregate_fit(self, server_round, results, failures):
        """SecAgg+ already replaced every result's parameters by the unmasked average; log and checkpoint."""
        self._report = RoundReport(server_round=server_round, arrays=ArrayRecord())
        for _, res in results:
            shop = self.shop_name(int(res.metrics.get("shop-index", -1)))
            self.log.add(server_round, shop, "train", train_rows(res.metrics))
            self._report.train[shop] = {k: float(v) for k, v in res.metrics.items() if k != "shop-index"}
        for failure in failures:
            logger.warning("round %d: a shop dropped out of secure aggregation (%s)", server_round,
                           type(failure).__name__)
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            arrays = dict(zip(self.keys, parameters_to_ndarrays(params), strict=True))
            arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
            params = ndarrays_to_parameters(list(arrays.values()))
            save_checkpoint(self.run_dir, Checkpoint(server_round, arrays, {}, capture_rng(),
                                                     {"secure-aggregation": True}), keep=self.keep)
            self._report.arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        self.log.write()
        return params, metrics

    def aggregate_evaluate(self, server_round, results, failures):
        """Log every shop's per-task metrics (split-prefixed keys go to their split) and report the round."""
        report = self._report or RoundReport(server_round=server_round, arrays=ArrayRecord())
        report.eval_split = self.eval_split(server_round)
        for _, res in results:
            shop = self.shop_name(int(res.metrics.get("shop-index", -1)))
            for split, rows in eval_rows_by_split(res.metrics, report.eval_split).items():
                self.log.add(server_round, shop, split, rows)
            report.evaluate[shop] = {k: float(v) for k, v in res.metrics.items() if k != "shop-index"}
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
    if settings.resume:
        raise ValueError("resume = true is not supported with secure-aggregation (its checkpoints hold no "
                         "strategy state). Fix: start a new run directory")
    if settings.share != "encoder" or settings.dpsgd_noise_multiplier > 0:
        raise ValueError("secure-aggregation supports share='encoder' without dpsgd-* only (the SecAgg+ shop "
                         "client trains with plain local training). Fix: drop share/dpsgd-* or secure-aggregation")
    run_dir = Path(settings.run_dir or Path.cwd() / "runs" / f"secure-{context.run_id}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    if initial is None:
        initial = {k: a.numpy() for k, a in initial_encoder(scenario).items()}
    keys = list(initial)

    @functools.cache
    def names() -> list[str]:
        if shop_names is not None:
            return shop_names
        try:  # a coordinator in deployment may not hold the shops' data
            return [s.name for s in scenario.federation_shops()]
        except (OSError, ValueError):
            return []

    def split_of(server_round: int) -> str:
        if "+" in settings.eval_split:  # both splits every round, as the main path does
            return settings.eval_split
        return settings.final_split if server_round == settings.num_server_rounds else settings.eval_split

    def client_config(server_round: int) -> dict[str, Any]:
        cfg = settings.client_config(scenario.seed)
        cfg.update({"server-round": server_round, "secagg-weighting": secagg.weighting,
                    "eval-split": split_of(server_round)})
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


def make_secure_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running the federation with SecAgg+ (settings: run config updated with ``overrides``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _, secagg, rest = split_config({**dict(context.run_config), **(overrides or {})})
        _, rest = split_dp_config(rest)  # central DP keys have no effect on this path
        run_secure_federation(grid, context, FederationSettings.from_config(rest), secagg)

    return app


app = make_secure_server_app()
