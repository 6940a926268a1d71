"""The coordinator's Flower ServerApp: one of Flower's strategies over the shared encoder only.

Each round it sends the encoder, aggregates the usable replies, then collects every shop's
per-task metrics into `<run-dir>/metrics.csv` and checkpoints the encoder, round, strategy and RNG
state atomically into `<run-dir>/checkpoints/`. With `resume = true` it continues from the newest
checkpoint. Settings come from the run config (`[tool.flwr.app.config]`, `--run-config`), or
from `make_server_app(overrides)` when `simulations.federated` runs it in-process.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
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
from server.metrics_log import MetricsLog, eval_rows_by_split, train_rows
from server.node_identity import check_identities
from server.polling_grid import faster_polling
from server.strategies import RoundReport, ShopStrategy, build_strategy
from server.wire import Wire
from shared.atomic import atomic_write_text
from shared.compression import check_mode
from shared.model import SharedEncoder
from shared.scenario import Scenario, load_scenario

logger = logging.getLogger(__name__)
SHARE_MODES = ("encoder", "all-shareable")
STOP_FILE = "stopped.txt"  # why a run ended before its last round (e.g. the privacy budget), for the caller
DP_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")  # mean-based: noise zS/n is calibrated to these


@dataclass
class FederationSettings:
    """Run-config keys of a federated run (kebab-case in TOML, snake_case here)."""

    scenario: str = "default"  # built-in scenario name or path to a scenario TOML
    num_server_rounds: int = 5
    strategy: str = "fedavg"  # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | krum
    fraction_train: float = 1.0
    min_shops: int = 2  # a round with fewer usable updates is skipped (global model kept)
    max_short_rounds: int = 3  # the run fails when more rounds than this in a row are short of min-shops
    local_epochs: int = 1
    personal_mix: float = 0.0  # n0 of the personal mix (client.client_app.mixed_start); 0 = off
    proximal_mu: float = 0.0  # FedProx
    server_lr: float = 0.0  # FedAdam / FedYogi eta, FedAvgM server lr; 0 = the strategy's default
    server_momentum: float = 0.0  # FedAvgM
    warmup_rounds: int = 0  # rounds a late joiner trains its local part only (encoder frozen) before its updates count
    max_steps: int = 0  # cap on local optimiser steps per round (0 = none)
    round_timeout: float = 600.0  # seconds; a shop not replying by then is left out of the round
    seed: int = -1  # -1 = the scenario's seed
    run_dir: str = ""  # where metrics, checkpoints and simulated shop state go
    method: str = "fedshop"  # label in metrics.csv
    share: str = "encoder"  # encoder | all-shareable (FedAvg-all baseline: heads averaged too)
    eval_split: str = "val+test"  # split(s) evaluated after each round ("val+test": both, so reports can pick
    # each shop's best-validation round); with a single split, the last round evaluates final_split
    final_split: str = "test"
    join_round: int = 0  # round at which the scenario's late joiners join (0 = they never do)
    objective: str = "fedavg"  # fedavg | meta (Reptile: a few inner steps, reply moves part-way; docs/transfer.md)
    meta_inner_steps: int = 20  # inner optimiser steps per round with objective = meta
    meta_outer_step: float = 1.0  # Reptile outer step: the reply is before + step * (after - before)
    resume: bool = False
    keep_checkpoints: int = 2
    fault_inject: str = ""  # test-only: "nan:1", "error:2", "sleep:1@2" (kind:shop-index[@round])
    fault_sleep: float = 30.0
    dpsgd_noise_multiplier: float = 0.0  # > 0: every shop trains with DP-SGD (Opacus), see shared/privacy/dpsgd.py
    dpsgd_clipping_norm: float = 1.0  # S: per-unit gradient bound
    dpsgd_unit: str = "user"  # user | record: the unit of privacy inside a shop
    dpsgd_sample_rate: float = 0.05  # q: Poisson sampling rate of units per step
    dpsgd_steps: int = 0  # steps per round; 0 = one expected pass (ceil(1/q))
    dpsgd_lr: float = 0.01
    dpsgd_delta: float = 1e-5
    dpsgd_max_epsilon: float = 0.0  # a shop refuses a round that would exceed this (0 = no budget)
    compression: str = "none"  # none | fp16 | sparse-fp16 | sparse-int8: encoder messages (server/wire.py)
    app_signature: str = ""  # deployment: the coordinator's FAB signature, checked by each merchant's SuperNode

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FederationSettings:
        """Parse a run config; unknown keys are an error naming the key and the known ones."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"run config key '{key}' is unknown. Fix: use one of "
                                 f"{sorted(k.replace('_', '-') for k in known)}")
            default = known[name].default
            values[name] = type(default)(value) if not isinstance(default, str) else str(value)
        settings = cls(**values)
        if settings.personal_mix < 0:
            raise ValueError(f"run config personal-mix={settings.personal_mix} is negative. Fix: give n0 >= 0 "
                             "(0 = off)")
        if settings.max_short_rounds < 0:
            raise ValueError(f"run config max-short-rounds={settings.max_short_rounds} is negative. Fix: give 0 "
                             "(stop at the first round short of min-shops) or more")
        check_mode(settings.compression)
        if settings.share not in SHARE_MODES:
            raise ValueError(f"run config share='{settings.share}' is unknown. Fix: use one of {SHARE_MODES}")
        if settings.dpsgd_noise_multiplier > 0:  # fail here, not on every shop, for a bad unit or rate
            from shared.privacy.dpsgd import DPSGDConfig  # Opacus: imported only when DP-SGD is on

            DPSGDConfig(**settings.dpsgd_kwargs())
        return settings

    def dpsgd_kwargs(self) -> dict[str, Any]:
        """The shops' `DPSGDConfig` keyword arguments (without seed)."""
        return {"noise_multiplier": self.dpsgd_noise_multiplier, "max_grad_norm": self.dpsgd_clipping_norm,
                "unit": self.dpsgd_unit, "sample_rate": self.dpsgd_sample_rate, "steps_per_round": self.dpsgd_steps,
                "lr": self.dpsgd_lr, "delta": self.dpsgd_delta, "max_epsilon": self.dpsgd_max_epsilon or None}

    def client_config(self, seed: int) -> dict[str, Any]:
        """What every shop needs to know each round (forwarded in the messages' ConfigRecord)."""
        return {"scenario": self.scenario, "seed": seed, "local-epochs": self.local_epochs, "share": self.share,
                "personal-mix": self.personal_mix,
                "run-dir": self.run_dir, "max-steps": self.max_steps, "fault-inject": self.fault_inject,
                "fault-sleep": self.fault_sleep, "join-round": self.join_round, "warmup-rounds": self.warmup_rounds,
                "objective": self.objective, "meta-inner-steps": self.meta_inner_steps,
                "meta-outer-step": self.meta_outer_step, **self.dpsgd_config()}

    def dpsgd_config(self) -> dict[str, Any]:
        """The `dpsgd-*` keys shops need, only when DP-SGD is on (messages stay small otherwise)."""
        if self.dpsgd_noise_multiplier <= 0:
            return {}
        return {f"dpsgd-{f.name[len('dpsgd_'):].replace('_', '-')}": getattr(self, f.name)
                for f in fields(self) if f.name.startswith("dpsgd_")}


def split_privacy(config: dict[str, Any]) -> tuple[FederationSettings, bool, Any, central_dp.CentralDPSettings]:
    """(settings, secure aggregation on?, SecAgg+ settings, central DP settings) of a full run config.

    G's `secagg-*`/`dp-*` keys are taken out first, so `FederationSettings.from_config` still
    rejects every other unknown key.
    """
    from server import secure  # server.secure imports this module

    on, secagg, rest = secure.split_config(config)
    dp, rest = central_dp.split_config(rest)
    settings = FederationSettings.from_config(rest)
    if dp.enabled and settings.join_round > 0:
        raise ValueError("dp-noise-multiplier > 0 with join-round > 0 is not supported: noise is calibrated to all "
                         "federation shops, but waiting joiners are not averaged. "
                         "Fix: set join-round = 0 under central DP")
    check_compression(settings, secure=on, central_dp=dp.enabled)
    if on and dp.enabled:
        raise ValueError("secure-aggregation = true with dp-noise-multiplier > 0 is not supported: the SecAgg+ "
                         "path has no central-DP noise. Fix: choose one, or use dpsgd-* for DP with SecAgg+")
    return settings, on, secagg, dp


def check_compression(settings: FederationSettings, *, secure: bool, central_dp: bool) -> None:
    """Refuse compression where it would break a privacy path (ValueError naming the keys and the fix)."""
    if settings.compression == "none":
        return
    if secure:
        raise ValueError(f"compression='{settings.compression}' with secure-aggregation = true is refused: SecAgg+ "
                         "masks dense, fixed-size vectors, and a row-sparse delta is neither. Fix: set "
                         "compression = 'none'")
    if central_dp:
        raise ValueError(f"compression='{settings.compression}' with dp-noise-multiplier > 0 is refused: fp16/int8 "
                         "rounding of a clipped update can exceed dp-clipping-norm, which the noise is calibrated to. "
                         "Fix: set compression = 'none'")


def initial_encoder(scenario: Scenario) -> ArrayRecord:
    """The encoder every shop starts from: what `build_model(..., seed=scenario.seed)` builds first."""
    torch.manual_seed(scenario.seed)
    return ArrayRecord(SharedEncoder(scenario.model, scenario.features).state_dict())


def _fingerprint(scenario: Scenario, settings: FederationSettings) -> dict[str, Any]:
    """Settings that must not change when a run resumes."""
    raw = json.dumps(scenario.raw, sort_keys=True, default=str)
    return {"scenario": hashlib.sha256(raw.encode()).hexdigest()[:16], "strategy": settings.strategy,
            "share": settings.share, "seed": scenario.seed}


Progress = Callable[[RoundReport, int], None]  # (report, total rounds)
COORDINATOR = "coordinator"  # shop label of the coordinator's own rows in metrics.csv
PRIVACY_TASK = "privacy"
DPSGD_EPSILON = "dp-epsilon"  # allow-listed train metric: a shop's DP-SGD epsilon so far


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
    check_compression(settings, secure=False, central_dp=dp.enabled)
    run_dir = Path(settings.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(run_dir)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    settings.run_dir = str(run_dir)
    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    if not (run_dir / "config.toml").exists():
        atomic_write_text(run_dir / "config.toml", tomli_w.dumps({"run": asdict(settings), "scenario": scenario.raw}))
    base = build_strategy(settings.strategy, fraction_train=settings.fraction_train,
                          min_shops=settings.min_shops, proximal_mu=settings.proximal_mu,
                          server_lr=settings.server_lr, server_momentum=settings.server_momentum)
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
        try:  # in deployment the coordinator may not hold the shops' data: fall back to indices
            return [s.name for s in scenario.federation_shops()]
        except (OSError, ValueError) as exc:
            logger.warning("shop names unavailable (%s); labelling shops by index", exc)
            return []

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
        both = "+" in settings.eval_split
        return {"eval-split": settings.eval_split if both or rnd < total else settings.final_split}

    def on_round_end(report: RoundReport) -> None:
        for shop, metrics in report.train.items():
            log.add(report.server_round, shop, "train", train_rows(metrics))
            if DPSGD_EPSILON in metrics:  # the shop's own DP-SGD spend so far
                log.add(report.server_round, shop, "train", [(PRIVACY_TASK, "epsilon", metrics[DPSGD_EPSILON])])
        if isinstance(inner, central_dp.CentralDP):
            log.add(report.server_round, COORDINATOR, "train",
                    [(PRIVACY_TASK, k, v) for k, v in inner.round_metrics().items()])
        for shop, metrics in report.evaluate.items():
            for split, rows in eval_rows_by_split(metrics, report.eval_split).items():
                log.add(report.server_round, shop, split, rows)
        log.write()
        save_checkpoint(run_dir, Checkpoint(report.server_round, {k: a.numpy() for k, a in report.arrays.items()},
                                            strategy_state(base), capture_rng(), fingerprint),
                        keep=settings.keep_checkpoints)
        if progress is not None:
            progress(report, total)

    def shop_name(index: int) -> str:
        names = shop_names()
        return names[index] if index < len(names) else f"shop-{index}"

    strategy = ShopStrategy(inner, min_shops=settings.min_shops, shop_name=shop_name, on_round_end=on_round_end,
                            round_config=round_config, round_offset=done, max_short_rounds=settings.max_short_rounds,
                            wire=Wire(settings.compression, omit_evaluate_encoder=serves_own_encoder(settings)))
    try:
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=total - done, timeout=settings.round_timeout,
                       train_config=ConfigRecord(settings.client_config(scenario.seed)),
                       evaluate_config=ConfigRecord(settings.client_config(scenario.seed)))
    except PrivacyBudgetExhausted as exc:  # a planned end: the last checkpoint is the final model
        logger.error("run stopped: %s", exc)
        atomic_write_text(run_dir / STOP_FILE, f"{exc}\n")
    return run_dir


def serves_own_encoder(settings: FederationSettings) -> bool:
    """Whether shops evaluate their own encoder (personal mix; as `client.client_app.personal_mix` decides)."""
    return settings.personal_mix > 0 and settings.share == "encoder" and settings.objective == "fedavg"


def stop_reason(run_dir: Path) -> str | None:
    """Why the run in ``run_dir`` ended before its last round (None if it did not)."""
    path = Path(run_dir) / STOP_FILE
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def make_server_app(overrides: dict[str, Any] | None = None, progress: Progress | None = None) -> ServerApp:
    """A ServerApp whose settings are the run config updated with ``overrides``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **(overrides or {})}
        if not config.get("run-dir"):
            config["run-dir"] = str(Path.cwd() / "runs" / f"flwr-{context.run_id}")
        settings, secure_on, secagg, dp = split_privacy(config)
        grid = faster_polling(grid)  # deployment: pull replies every 0.1 s, not flwr's 3 s
        grid = check_identities(grid, settings.run_dir)  # deployment: replies must match the node's registration
        if secure_on:
            from server.secure import run_secure_federation

            run_secure_federation(grid, context, settings, secagg, progress=progress)
        else:
            run_federation(grid, settings, progress, dp=dp)

    return server


app = make_server_app()
