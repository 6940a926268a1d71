"""The coordinator's run settings: the run config (`[tool.flwr.app.config]`, `--run-config`) parsed and checked.

`FederationSettings` holds the federation keys; `split_privacy` also takes out the SecAgg+ (`secagg-*`)
and central-DP (`dp-*`) keys and refuses combinations a path cannot honour, before round 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from server import dp as central_dp
from server.secagg_settings import SecAggSettings
from server.secagg_settings import split_config as split_secagg_config

SHARE_MODES = ("encoder", "all-shareable")
SECURE_STRATEGIES = ("fedavg", "fedprox")  # a weighted mean (FedProx: the same, plus the shops' proximal pull)
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")  # need each shop's update, SecAgg+ shows only the sum


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
    personal_mix: float = 0.0  # n0 of the personal mix (client.shop_round.mixed_start); 0 = off
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
        if settings.share not in SHARE_MODES:
            raise ValueError(f"run config share='{settings.share}' is unknown. Fix: use one of {SHARE_MODES}")
        if settings.dpsgd_noise_multiplier > 0:  # fail here, not on every shop, for a bad unit or rate
            from shared.privacy.dpsgd import DPSGDConfig  # Opacus: imported only when DP-SGD is on (its import
            # calls logging.basicConfig)

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


def split_privacy(config: dict[str, Any]) -> tuple[FederationSettings, bool, SecAggSettings,
                                                  central_dp.CentralDPSettings]:
    """(settings, secure aggregation on?, SecAgg+ settings, central DP settings) of a full run config.

    The `secagg-*`/`dp-*` keys are taken out first, so `FederationSettings.from_config` still
    rejects every other unknown key. Settings a path cannot honour are refused here, before round 1.
    """
    on, secagg, rest = split_secagg_config(config)
    dp, rest = central_dp.split_config(rest)
    settings = FederationSettings.from_config(rest)
    if dp.enabled and settings.join_round > 0:
        raise ValueError("dp-noise-multiplier > 0 with join-round > 0 is not supported: noise is calibrated to all "
                         "federation shops, but waiting joiners are not averaged. "
                         "Fix: set join-round = 0 under central DP")
    if on and dp.enabled:
        raise ValueError("secure-aggregation = true with dp-noise-multiplier > 0 is not supported: the SecAgg+ "
                         "path has no central-DP noise. Fix: choose one, or use dpsgd-* for DP with SecAgg+")
    if on:
        check_secure_supported(settings)
    return settings, on, secagg, dp


def check_secure_supported(settings: FederationSettings) -> None:
    """Refuse, by name and with the fix, every setting the SecAgg+ path cannot honour.

    The coordinator learns only the weighted mean of the shops' encoders. What the shops do before
    masking (stage, personal mix, objective, FedProx pull, DP-SGD) works as on the plain path; what
    needs individual updates or state the legacy SecAgg+ workflow does not carry does not.
    """
    fix = "Fix: set secure-aggregation = false, or "
    if settings.strategy in ROBUST_STRATEGIES:
        raise ValueError(f"strategy='{settings.strategy}' cannot run with secure-aggregation: a robust rule needs "
                         f"each shop's update, and SecAgg+ reveals only their sum. {fix}strategy = 'fedavg'")
    if settings.strategy not in SECURE_STRATEGIES:
        raise ValueError(f"strategy='{settings.strategy}' is not supported with secure-aggregation: its server "
                         "optimiser is not wired into the SecAgg+ workflow (Flower's legacy path), which applies "
                         f"the plain weighted mean. {fix}use one of {SECURE_STRATEGIES}")
    if settings.share != "encoder":
        raise ValueError(f"share='{settings.share}' is not supported with secure-aggregation: the masked vector "
                         f"holds the encoder only, so shared heads would never be averaged. {fix}share = 'encoder'")
    if settings.resume:
        raise ValueError("resume = true is not supported with secure-aggregation (its checkpoints hold no "
                         "strategy state). Fix: start a new run directory")
