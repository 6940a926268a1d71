"""The coordinator's Flower ServerApp: one of Flower's strategies over the shared encoder only.

Each round it sends the encoder, aggregates the usable replies, then collects every shop's
per-task metrics (with the personal mix and `fuse-evaluate`, from the train replies; evaluate messages
go only to shops whose evaluation is missing) into `<run-dir>/metrics.csv` and checkpoints the
encoder, round, strategy and RNG state atomically into `<run-dir>/checkpoints/`. With `resume = true`
it continues from the newest checkpoint. Settings come from the run config (`[tool.flwr.app.config]`,
`--run-config`), or from `make_server_app(overrides)` when `simulations.federated` runs it in-process.

Privacy options: `secure-aggregation = true` runs the federation on Flower's SecAgg+ workflow
(`server.secure`); `dp-noise-multiplier > 0` wraps the strategy in central DP (`server.dp`) and logs
epsilon every round; `dpsgd-*` keys are forwarded to the shops, which then train with DP-SGD.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from server import dp as central_dp
from server.checkpoint import (
    Checkpoint,
    capture_rng,
    check_settings,
    latest_checkpoint,
    load_strategy_state,
    remove_orphans,
    restore_rng,
    save_checkpoint,
    strategy_state,
)
from server.federation_common import (
    Progress,
    eval_split_for_round,
    initial_encoder,
    initial_encoder_arrays,
    lets_shops_skip_tests,
    scenario_shop_names,
)
from server.federation_settings import FederationSettings, check_runnable, split_privacy
from server.metrics_log import PRIVACY_TASK, MetricsLog, eval_rows_by_split, train_rows
from server.node_identity import BINDINGS_FILE, ShopClaims, check_identities, load_bindings
from server.polling_grid import faster_polling
from server.secure import run_secure_federation
from server.strategies import FAILED_FILE, RoundReport, RunFailed, ShopStrategy, build_strategy, failure_recorded
from server.wire import Wire
from shared.atomic import atomic_write_text
from shared.protocol import EVAL_SPLIT, TEST_ON_IMPROVEMENT
from shared.protocol import serves_own_encoder as shops_serve_own_encoder
from shared.scenario import Scenario, load_scenario

logger = logging.getLogger(__name__)
STOP_FILE = "stopped.txt"  # why a run ended before its last round (e.g. the privacy budget), for the caller
DP_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")  # mean-based: noise zS/n is calibrated to these


def _fingerprint(scenario: Scenario, settings: FederationSettings) -> dict[str, Any]:
    """Settings that must not change when a run resumes."""
    raw = json.dumps(scenario.raw, sort_keys=True, default=str)
    return {"scenario": hashlib.sha256(raw.encode()).hexdigest()[:16], "strategy": settings.strategy,
            "share": settings.share, "seed": scenario.seed}


COORDINATOR = "coordinator"  # shop label of the coordinator's own rows in metrics.csv


def _check_dp(settings: FederationSettings) -> None:
    """Refuse settings under which central DP's noise would not be calibrated."""
    if settings.share != "encoder":
        raise ValueError(f"central DP clips and noises the encoder only, but share='{settings.share}'. "
                         "Fix: use share='encoder' (method fedshop) with dp-noise-multiplier")
    if settings.fraction_train < 1.0:
        raise ValueError(f"central DP samples every shop each round (no amplification), but fraction-train="
                         f"{settings.fraction_train}. Fix: set fraction-train = 1.0")
    if settings.strategy not in DP_STRATEGIES:
        raise ValueError(f"central DP noise is calibrated to a mean, but strategy='{settings.strategy}'. "
                         f"Fix: use one of {DP_STRATEGIES}")


def run_federation(grid: Grid, settings: FederationSettings, progress: Progress | None = None,
                   dp: central_dp.CentralDPSettings | None = None) -> Path:
    """Run (or resume) a federation on ``grid``; returns the run directory.

    With ``dp`` enabled the strategy is wrapped in central DP; when the privacy budget would be
    exceeded the run stops before that round, writes why to `<run-dir>/stopped.txt` and returns.
    """
    dp = dp or central_dp.CentralDPSettings()
    if dp.enabled:
        _check_dp(settings)
    run_dir = Path(settings.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(run_dir)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # before anything can fail
    settings.run_dir = str(run_dir)
    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    if not (run_dir / "config.toml").exists():
        record = {"run": settings.to_run_config(), "scenario": scenario.raw}
        atomic_write_text(run_dir / "config.toml", tomli_w.dumps(record))
    base = build_strategy(settings.strategy, fraction_train=settings.fraction_train,
                          min_shops=settings.min_shops, proximal_mu=settings.proximal_mu,
                          server_lr=settings.server_lr, server_momentum=settings.server_momentum,
                          num_malicious=settings.robust_num_malicious, trim_beta=settings.robust_trim_beta)
    log = MetricsLog(run_dir / "metrics.csv", settings.method)
    fingerprint = _fingerprint(scenario, settings)
    if dp.enabled:  # the ledger replayed on resume is only right for the same z, S and shops
        fingerprint["central-dp"] = f"z={dp.noise_multiplier},S={dp.clipping_norm},n={dp.num_shops}"
    ckpt = latest_checkpoint(run_dir) if settings.resume else None
    if ckpt is not None:
        check_settings(ckpt, fingerprint)
        arrays, done = ArrayRecord({k: Array(np.asarray(v)) for k, v in ckpt.arrays.items()}), ckpt.server_round
        load_strategy_state(base, ckpt.strategy_state)
        restore_rng(ckpt.rng)
        log.resume(done)
        logger.info("resuming %s after round %d", run_dir, done)
    else:
        arrays, done = initial_encoder(scenario), 0
        random.seed(scenario.seed)
        np.random.seed(scenario.seed)

    @functools.cache
    def shop_names() -> list[str]:
        return scenario_shop_names(scenario)

    total = settings.num_server_rounds
    if done >= total:
        logger.info("%s already has %d of %d rounds; nothing to do", run_dir, done, total)
        return run_dir
    inner = base
    if dp.enabled:
        names = shop_names()
        if not names and not dp.num_shops:
            raise ValueError("central DP needs the number of shops per round, and the coordinator cannot list "
                             "the scenario's shops. Fix: set dp-num-shops")
        inner = central_dp.wrap(base, dp, num_shops=len(names), completed_rounds=done)

    def round_config(rnd: int, kind: str) -> dict[str, Any]:
        if kind == "train":
            return {}
        split = eval_split_for_round(settings.eval_split, settings.final_split, rnd, total)
        return {EVAL_SPLIT: split, TEST_ON_IMPROVEMENT: lets_shops_skip_tests(settings.test_every_round, split, rnd,
                                                                             total)}

    def on_round_end(report: RoundReport) -> None:
        for shop, metrics in report.train.items():
            log.add(report.server_round, shop, "train", train_rows(metrics))  # with its DP-SGD epsilon, if any
        if isinstance(inner, central_dp.CentralDP):
            log.add(report.server_round, COORDINATOR, "train",
                    [(PRIVACY_TASK, k, v) for k, v in inner.round_metrics().items()])
        for shop, metrics in report.evaluate.items():
            for split, rows in eval_rows_by_split(metrics, report.eval_split).items():
                log.add(report.server_round, shop, split, rows)
        log.write()
        save_checkpoint(run_dir, Checkpoint(report.server_round, {k: a.numpy() for k, a in report.arrays.items()},
                                            strategy_state(base), capture_rng(), fingerprint,
                                            first_claims=strategy.first_claims,
                                            loo_history=strategy.loo_history, loo_turns=strategy.loo_turns,
                                            shop_bindings=strategy.claims.export()),
                        keep=settings.keep_checkpoints)
        if progress is not None:
            progress(report, total)

    def shop_name(index: int) -> str:
        names = shop_names()
        return names[index] if index < len(names) else f"shop-{index}"

    # Shops rebuild the initial encoder from the scenario: compressed messages patch it instead of sending it.
    shared_start = None if settings.compression == "none" else initial_encoder_arrays(scenario)
    strategy = ShopStrategy(inner, min_shops=settings.min_shops, shop_name=shop_name, on_round_end=on_round_end,
                            round_config=round_config, round_offset=done, max_short_rounds=settings.max_short_rounds,
                            robust=settings.robust_settings(),
                            wire=Wire(settings.compression, omit_evaluate_encoder=serves_own_encoder(settings),
                                      initial=shared_start),
                            first_claims=ckpt.first_claims if ckpt is not None else None,
                            loo_history=ckpt.loo_history if ckpt is not None else None,
                            loo_turns=ckpt.loo_turns if ckpt is not None else None,
                            fuse_evaluate=settings.fuse_evaluate and serves_own_encoder(settings),
                            # shop-index claims: in range, one node per shop (registered bindings first, then the
                            # checkpoint's: a resumed run keeps who was bound to which shop)
                            claims=ShopClaims(lambda: len(shop_names()), load_bindings(run_dir),
                                              ckpt.shop_bindings if ckpt is not None else None,
                                              stable_keys=(run_dir / BINDINGS_FILE).exists()))
    try:
        with failure_recorded(run_dir):
            strategy.start(grid=grid, initial_arrays=arrays, num_rounds=total - done, timeout=settings.round_timeout,
                           train_config=ConfigRecord(settings.client_config(scenario.seed)),
                           evaluate_config=ConfigRecord(settings.client_config(scenario.seed)))
            if strategy.aggregated_rounds == 0:  # the model never moved: not a completed run
                raise RunFailed(f"every round ({done + 1}-{total}) was skipped, none updated the model; last: "
                                f"{strategy.last_skip}. Fix: check the left-out shops' logs, then `--resume` the run")
    except PrivacyBudgetExhausted as exc:  # a planned end: the last checkpoint is the final model
        logger.error("run stopped: %s", exc)
        atomic_write_text(run_dir / STOP_FILE, f"{exc}\n")
    return run_dir


def serves_own_encoder(settings: FederationSettings) -> bool:
    """Whether shops evaluate their own encoder (the personal mix is in force: the shops' own rule)."""
    return shops_serve_own_encoder(settings.personal_mix, settings.share, settings.objective)


def failure_reason(run_dir: Path) -> str | None:
    """Why the run in ``run_dir`` failed (None if it did not)."""
    path = Path(run_dir) / FAILED_FILE
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def stop_reason(run_dir: Path) -> str | None:
    """Why the run in ``run_dir`` ended before its last round (None if it did not)."""
    path = Path(run_dir) / STOP_FILE
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


NODE_WAIT_SECONDS = 60.0  # how long a simulation's ServerApp waits for its virtual nodes before round 1


def wait_for_nodes(grid: Grid, expected: int, timeout: float = NODE_WAIT_SECONDS) -> int:
    """Wait until ``expected`` nodes are connected (or ``timeout`` passed); returns how many are.

    Flower samples the nodes connected when a round starts (`fraction_train` of them, at least
    `min-shops`), and its simulation engine registers the virtual nodes in a thread that runs beside the
    ServerApp. Under load round 1 could start with two of three shops registered, which made a run (and a
    resumed one) depend on thread timing: `test_resume_after_round_one_gives_the_same_encoder` flaked so.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    if connected < expected:
        logger.warning("%d of the %d expected nodes connected within %.0f s; starting with those", connected,
                       expected, timeout)
    return connected


def server_settings(config: dict[str, Any]) -> tuple[FederationSettings, bool, Any, central_dp.CentralDPSettings]:
    """The ServerApp's settings of a full run config (`split_privacy`), refused before round 1 when the
    federation cannot run against its scenario's shops (`check_runnable`: min-shops, join-round, SecAgg+)."""
    settings, secure_on, secagg, dp = split_privacy(config)
    check_runnable(settings)
    return settings, secure_on, secagg, dp


def make_server_app(overrides: dict[str, Any] | None = None, progress: Progress | None = None,
                    expected_nodes: int = 0) -> ServerApp:
    """A ServerApp whose settings are the run config updated with ``overrides``.

    ``expected_nodes`` (a simulation, where every shop's node exists) makes it wait for them all before
    round 1, so round 1 samples every shop whatever the threads' timing.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **(overrides or {})}
        if not config.get("run-dir"):
            config["run-dir"] = str(Path.cwd() / "runs" / f"flwr-{context.run_id}")
        settings, secure_on, secagg, dp = server_settings(config)
        grid = faster_polling(grid)  # deployment: pull replies every 0.1 s, not flwr's 3 s
        grid = check_identities(grid, settings.run_dir)  # deployment: replies must match the node's registration
        if expected_nodes:
            wait_for_nodes(grid, expected_nodes)
        if secure_on:
            run_secure_federation(grid, context, settings, secagg, progress=progress)
        else:
            run_federation(grid, settings, progress, dp=dp)

    return server


app = make_server_app()
