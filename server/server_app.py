"""The coordinator's Flower ServerApp: one of Flower's strategies over the shared encoder only.

Each round it sends the encoder, aggregates the usable replies, then collects every shop's
per-task metrics into `<run-dir>/metrics.csv` and checkpoints the encoder, round, strategy and RNG
state atomically into `<run-dir>/checkpoints/`. With `resume = true` it continues from the newest
checkpoint. Settings come from the run config (`[tool.flwr.app.config]`, `--run-config`), or
from `make_server_app(overrides)` when `simulations.federated` runs it in-process.
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

from server.checkpoint import (
    Checkpoint,
    capture_rng,
    check_settings,
    latest_checkpoint,
    load_strategy_state,
    restore_rng,
    save_checkpoint,
    strategy_state,
)
from server.metrics_log import MetricsLog, eval_rows_by_split, train_rows
from server.strategies import RoundReport, ShopStrategy, build_strategy
from shared.atomic import atomic_write_text
from shared.model import SharedEncoder
from shared.scenario import Scenario, load_scenario

logger = logging.getLogger(__name__)
SHARE_MODES = ("encoder", "all-shareable")


@dataclass
class FederationSettings:
    """Run-config keys of a federated run (kebab-case in TOML, snake_case here)."""

    scenario: str = "default"  # built-in scenario name or path to a scenario TOML
    num_server_rounds: int = 5
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | krum
    fraction_train: float = 1.0
    min_shops: int = 2  # a round fails when fewer shops send a usable update
    local_epochs: int = 1
    proximal_mu: float = 0.0  # FedProx
    server_lr: float = 0.1  # FedAdam / FedYogi server learning rate
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
    resume: bool = False
    keep_checkpoints: int = 2
    fault_inject: str = ""  # test-only: "nan:1", "error:2", "sleep:1@2" (kind:shop-index[@round])
    fault_sleep: float = 30.0

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
        if settings.share not in SHARE_MODES:
            raise ValueError(f"run config share='{settings.share}' is unknown. Fix: use one of {SHARE_MODES}")
        return settings

    def client_config(self, seed: int) -> dict[str, Any]:
        """What every shop needs to know each round (forwarded in the messages' ConfigRecord)."""
        return {"scenario": self.scenario, "seed": seed, "local-epochs": self.local_epochs, "share": self.share,
                "run-dir": self.run_dir, "max-steps": self.max_steps, "fault-inject": self.fault_inject,
                "fault-sleep": self.fault_sleep, "join-round": self.join_round, "warmup-rounds": self.warmup_rounds}


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


def run_federation(grid: Grid, settings: FederationSettings, progress: Progress | None = None) -> Path:
    """Run (or resume) a federation on ``grid``; returns the run directory."""
    run_dir = Path(settings.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings.run_dir = str(run_dir)
    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    if not (run_dir / "config.toml").exists():
        atomic_write_text(run_dir / "config.toml", tomli_w.dumps({"run": asdict(settings), "scenario": scenario.raw}))
    inner = build_strategy(settings.strategy, fraction_train=settings.fraction_train,
                           min_shops=settings.min_shops, proximal_mu=settings.proximal_mu)
    if hasattr(inner, "eta"):
        inner.eta = settings.server_lr
    log = MetricsLog(run_dir / "metrics.csv", settings.method)
    fingerprint = _fingerprint(scenario, settings)
    ckpt = latest_checkpoint(run_dir) if settings.resume else None
    if ckpt is not None:
        check_settings(ckpt, fingerprint)
        arrays, done = ArrayRecord({k: Array(np.asarray(v)) for k, v in ckpt.arrays.items()}), ckpt.server_round
        load_strategy_state(inner, ckpt.strategy_state)
        restore_rng(ckpt.rng)
        log.resume(done)
        logger.info("resuming %s after round %d", run_dir, done)
    else:
        arrays, done = initial_encoder(scenario), 0
        random.seed(scenario.seed)
        np.random.seed(scenario.seed)
    total = settings.num_server_rounds
    if done >= total:
        logger.info("%s already has %d of %d rounds; nothing to do", run_dir, done, total)
        return run_dir

    def round_config(rnd: int, kind: str) -> dict[str, Any]:
        if kind == "train":
            return {}
        both = "+" in settings.eval_split
        return {"eval-split": settings.eval_split if both or rnd < total else settings.final_split}

    def on_round_end(report: RoundReport) -> None:
        for shop, metrics in report.train.items():
            log.add(report.server_round, shop, "train", train_rows(metrics))
        for shop, metrics in report.evaluate.items():
            for split, rows in eval_rows_by_split(metrics, report.eval_split).items():
                log.add(report.server_round, shop, split, rows)
        log.write()
        save_checkpoint(run_dir, Checkpoint(report.server_round, {k: a.numpy() for k, a in report.arrays.items()},
                                            strategy_state(inner), capture_rng(), fingerprint),
                        keep=settings.keep_checkpoints)
        if progress is not None:
            progress(report, total)

    @functools.cache
    def shop_names() -> list[str]:
        try:  # in deployment the coordinator may not hold the shops' data: fall back to indices
            return [s.name for s in scenario.federation_shops()]
        except (OSError, ValueError) as exc:
            logger.warning("shop names unavailable (%s); labelling shops by index", exc)
            return []

    def shop_name(index: int) -> str:
        names = shop_names()
        return names[index] if index < len(names) else f"shop-{index}"

    strategy = ShopStrategy(inner, min_shops=settings.min_shops, shop_name=shop_name, on_round_end=on_round_end,
                            round_config=round_config, round_offset=done)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=total - done, timeout=settings.round_timeout,
                   train_config=ConfigRecord(settings.client_config(scenario.seed)),
                   evaluate_config=ConfigRecord(settings.client_config(scenario.seed)))
    return run_dir


def make_server_app(overrides: dict[str, Any] | None = None, progress: Progress | None = None) -> ServerApp:
    """A ServerApp whose settings are the run config updated with ``overrides``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **(overrides or {})}
        if not config.get("run-dir"):
            config["run-dir"] = str(Path.cwd() / "runs" / f"flwr-{context.run_id}")
        run_federation(grid, FederationSettings.from_config(config), progress)

    return server


app = make_server_app()
