"""The coordinator's run settings: the run config (`[tool.flwr.app.config]`, `--run-config`) parsed and checked.

`FederationSettings` holds the federation keys; `split_privacy` also takes out the SecAgg+ (`secagg-*`)
and central-DP (`dp-*`) keys and refuses combinations a path cannot honour, before round 1.
"""

from __future__ import annotations

import logging
from typing import Any

from server import dp as central_dp
from server.robust import RobustSettings
from server.secagg_settings import SecAggSettings
from shared.federation_plan import ShopCount, check_federation_plan
from shared.settings import RunSettings

logger = logging.getLogger(__name__)

SECURE_STRATEGIES = ("fedavg", "fedprox")  # a weighted mean (FedProx: the same, plus the shops' proximal pull)
# need each shop's update, SecAgg+ shows only the sum
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class FederationSettings(RunSettings):
    """The run config as the coordinator reads it: the schema's `RunSettings` (shared/settings.py).

    Keys, defaults and ranges live in the schema; this adds only the check that needs Opacus.
    """

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "run config") -> FederationSettings:
        """Parse a run config; an unknown key or a bad value is a `ScenarioError` (a ValueError) naming it."""
        settings = super().from_config(config, where)
        if settings.dpsgd_noise_multiplier > 0:  # fail here, not on every shop, for a bad unit or rate
            from shared.privacy.dpsgd import DPSGDConfig  # Opacus: imported only when DP-SGD is on (its import
            # calls logging.basicConfig)

            DPSGDConfig(**settings.dpsgd_kwargs())
        return settings

    def robust_settings(self) -> RobustSettings:
        """The screens' settings (`server.robust`)."""
        return RobustSettings(norm_factor=self.robust_norm_factor, norm_action=self.robust_norm_action,
                              min_cosine=self.robust_min_cosine, examples_cap=self.robust_examples_cap,
                              weight_cap=self.robust_weight_cap, loo_min_cosine=self.robust_loo_min_cosine,
                              loo_turn_margin=self.robust_loo_turn_margin, small_pull=self.robust_small_pull,
                              small_pull_total=self.robust_small_pull_total)


def split_privacy(config: dict[str, Any]) -> tuple[FederationSettings, bool, SecAggSettings,
                                                  central_dp.CentralDPSettings]:
    """(settings, secure aggregation on?, SecAgg+ settings, central DP settings) of a full run config.

    The whole config is validated by the schema first (unknown keys, ranges, unsupported combinations, e.g.
    compression with SecAgg+ or central DP: `FederationTable._combinations` runs on every run config);
    its `secagg-*`/`dp-*` fields then become the SecAgg+ and central-DP settings objects. Settings the
    SecAgg+ path cannot honour are refused here, before round 1.
    """
    settings = FederationSettings.from_config(config)  # the schema also refuses unsupported combinations
    on, secagg = settings.secure_aggregation, SecAggSettings.from_settings(settings)
    dp = central_dp.CentralDPSettings.from_settings(settings)
    if on:
        check_secure_supported(settings)
    return settings, on, secagg, dp


def check_runnable(settings: FederationSettings, where: str = "run config") -> None:
    """Refuse a run config whose federation cannot run (`shared.federation_plan`), before round 1.

    The shops are the run's scenario's (`scenario` key), counted with the run config's `join-round`; a
    coordinator that cannot read them (deployment: the data stays with the merchants) checks what needs no
    shops, and `fedshop coordinator run` has checked min-shops against the registered merchants.
    """
    from shared.scenario import load_scenario

    scenario = load_scenario(settings.scenario, {"seed": settings.seed} if settings.seed >= 0 else None)
    counts: ShopCount | None = None
    if scenario.merchant_held:
        # a deployment's scenario lists no shop folders: each merchant brings its own (`merchant start --shop-dir`)
        logger.info("%s: the merchants hold the shops; min-shops is not checked here", where)
    else:
        try:
            counts = ShopCount(first=len(scenario.training_shops()), joiners=len(scenario.joining_shops()))
        except (OSError, ValueError) as exc:  # ShopDataError is a ValueError
            logger.info("%s: the scenario's shops are not readable here (%s); min-shops is not checked against "
                        "them", where, exc)
    check_federation_plan(settings, counts, where, style="run")


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
