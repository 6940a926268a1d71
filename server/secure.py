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

A shop that answers a stage with an error (a merchant's refusal, `client.merchant_policy`) or not at all
is left out of the round with its reason, as on the plain path: `StageErrors` records every error reply
with the stage it answered, the round's report and log name it (`left_out`). A round SecAgg+ could not
complete (too few shops left for its threshold) keeps the global encoder; more than `max-short-rounds`
such rounds in a row, or every round, fail the run (`RunFailed`, with the shops' reasons).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from server.checkpoint import Checkpoint, capture_rng, save_checkpoint
from server.delegating_grid import DelegatingGrid
from server.federation_common import Progress, eval_split_for_round, initial_encoder, scenario_shop_names
from server.federation_settings import FederationSettings, check_secure_supported
from server.metrics_log import MetricsLog, eval_rows_by_split, train_rows
from server.node_identity import ShopClaims
from server.secagg_settings import SecAggSettings
from server.strategies import RoundReport, RunFailed, failure_recorded
from shared.protocol import EVAL_SPLIT, PROXIMAL_MU, SECAGG_WEIGHTING, SERVER_ROUND, SHOP_INDEX
from shared.scenario import load_scenario

logger = logging.getLogger(__name__)


def _stage_of(msg: Message) -> str:
    """The SecAgg+ stage (or "evaluate") a message to a shop asks for, for the left-out reason."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return "evaluate"
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}) if msg.has_content() else {}
    return f"SecAgg+ {record.get('stage', 'train')}"


class StageErrors(DelegatingGrid):
    """Records, per node, why it answered a stage with an error or did not answer (SecAgg+ keeps only a bare
    `Exception(Error)` per failure, without the node, and counts a stage-2 failure twice).

    ``default_timeout`` bounds every exchange sent without a timeout: Flower's SecAgg+ stages with
    `secagg-timeout` 0 and its default evaluate step wait for every reply, so one silent shop would hang the
    run; with it, a silent shop is a dropout after the run's `round-timeout`.
    """

    def __init__(self, inner: Grid, default_timeout: float | None = None) -> None:
        super().__init__(inner)
        self.errors: dict[int, str] = {}  # node -> "<stage>: <reason>" since the last `take`
        self.default_timeout = default_timeout

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        """Flower's Grid API, delegated; every error reply and every missing reply is recorded."""
        messages = list(messages)
        stages = {m.metadata.dst_node_id: _stage_of(m) for m in messages}
        if timeout is None:
            timeout = self.default_timeout
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                reason = reply.error.reason or f"error reply (code {reply.error.code})"
                self.errors[node] = f"{stages.get(node, 'SecAgg+')}: {reason}"
        for node in stages.keys() - answered:
            within = f" within {timeout:g} s (secagg-timeout, else round-timeout)" if timeout else ""
            self.errors[node] = f"{stages[node]}: no reply{within}"
        return replies

    def take(self, kinds: tuple[str, ...]) -> dict[int, str]:
        """The recorded reasons whose stage starts with one of ``kinds``, forgotten once taken."""
        out = {n: why for n, why in self.errors.items() if why.startswith(kinds)}
        for node in out:
            del self.errors[node]
        return out


class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg that logs per-shop plaintext metrics and checkpoints the (already summed) encoder."""

    def __init__(self, *, keys: list[str], run_dir: Path, method: str, shop_name: Callable[[int], str],
                 eval_split: Callable[[int], str], keep_checkpoints: int = 2, progress: Progress | None = None,
                 num_rounds: int = 0, errors: StageErrors | None = None, max_short_rounds: int = 3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.errors, self.max_short_rounds = errors, max_short_rounds
        self.short_rounds, self.aggregated_rounds, self.last_short = 0, 0, ""
        self._node_shop: dict[int, str] = {}  # node -> the shop its checked claim named (for left-out reasons)
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
        self._node_shop[node] = self.shop_name(index)
        return self._node_shop[node]

    def _left_out(self, server_round: int, kinds: tuple[str, ...], report: RoundReport) -> dict[str, str]:
        """Every shop that answered a stage of ``kinds`` with an error or not at all: logged, added to ``report``
        (a shop already left out keeps its first reason)."""
        taken = self.errors.take(kinds) if self.errors is not None else {}
        out = {self._node_shop.get(node, f"node-{node}"): why for node, why in sorted(taken.items())}
        for shop, why in out.items():
            logger.warning("round %d: left out shop %s: %s", server_round, shop, why)
            report.left_out.setdefault(shop, why)
        return out

    def fit_halted(self, server_round: int) -> None:
        """SecAgg+ stopped the round before unmasking: keep the global encoder, report why, count a short round.

        More than `max-short-rounds` such rounds in a row fail the run (`RunFailed`), as on the plain path.
        """
        self._report = RoundReport(server_round=server_round, arrays=ArrayRecord())
        left_out = self._left_out(server_round, ("SecAgg+",), self._report)
        why = "; ".join(f"{shop}: {reason}" for shop, reason in left_out.items()) or "none"
        self.short_rounds += 1
        self.last_short = (f"round {server_round}: SecAgg+ could not complete the round, too few shops left for its "
                           f"threshold (left out: {why})")
        self._report.skipped = self.last_short
        if self.short_rounds > self.max_short_rounds:
            raise RunFailed(f"{self.last_short}; {self.short_rounds} short rounds in a row, more than "
                            f"max-short-rounds={self.max_short_rounds}. Fix: check the left-out shops' reasons "
                            "(a refusal names the key and the fix) and their logs, then run again")
        logger.warning("%s; global model kept (%d of at most %d short rounds in a row)", self.last_short,
                       self.short_rounds, self.max_short_rounds)

    def aggregate_fit(self, server_round, results, failures):
        """SecAgg+ already replaced every result's parameters by the unmasked weighted mean; log and checkpoint.

        A round in which every shop sent weight 0 (late joiners waiting or warming up) has no mean:
        the global encoder is kept, as the plain path does.
        """
        self._report = RoundReport(server_round=server_round, arrays=ArrayRecord())
        self.short_rounds, self.aggregated_rounds = 0, self.aggregated_rounds + 1
        for proxy, res in results:
            shop = self._label(proxy, dict(res.metrics))
            self.log.add(server_round, shop, "train", train_rows(res.metrics))
            self._report.train[shop] = {k: float(v) for k, v in res.metrics.items() if k != SHOP_INDEX}
        if not self._left_out(server_round, ("SecAgg+",), self._report) and failures:
            logger.warning("round %d: %d failure(s) in secure aggregation", server_round, len(failures))
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
        self._left_out(server_round, ("evaluate",), report)
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

    grid = errors = StageErrors(grid, default_timeout=settings.round_timeout)
    strategy = SecureFedAvg(
        errors=errors, max_short_rounds=settings.max_short_rounds,
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
    secure_fit = secagg.workflow()

    def fit_workflow(grid: Grid, ctx: Context) -> None:
        """One SecAgg+ round; a round it halted (no `aggregate_fit`) is a short round with its reasons."""
        done = strategy.aggregated_rounds
        secure_fit(grid, ctx)
        if strategy.aggregated_rounds == done:
            strategy.fit_halted(int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))

    with failure_recorded(run_dir):  # failed.txt, as the plain run writes it
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        if strategy.aggregated_rounds == 0:
            raise RunFailed(f"every round (1-{settings.num_server_rounds}) was short, none updated the model; last: "
                            f"{strategy.last_short}. Fix: check the left-out shops' reasons (a refusal names the key "
                            "and the fix) and their logs, then run again")
    return run_dir
