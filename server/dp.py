"""Central DP over shops: Flower's `DifferentialPrivacyClientSideFixedClipping` and its RDP accountant.

Each shop's encoder update is clipped to L2 norm S on the shop (`fixedclipping_mod` on the main
ClientApp's train handler, `client.client_app.clip_when_dp`); the coordinator averages the clipped
models with equal weights and adds N(0, (zS/n)^2) noise. The unit of privacy is a whole shop. Every round samples all
configured shops, so there is no sampling amplification (Flower's accountant requires that for
fixed clipping). Before a round whose release would push epsilon past `dp-max-epsilon`, the run
stops with `PrivacyBudgetExhausted`; nothing of that round is sent, and the previous round's
checkpoint stays the latest.

Run-config keys: `dp-noise-multiplier` (z, > 0 turns central DP on), `dp-clipping-norm` (S),
`dp-delta`, `dp-max-epsilon` (0 = no budget), `dp-num-shops` (shops per round; 0 = all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from shared.settings import FEDERATION_DEFAULTS, FederationTable

if TYPE_CHECKING:  # the module imports Opacus, whose import calls logging.basicConfig: load it only when DP runs
    from shared.privacy.accounting import PrivacyReport

logger = logging.getLogger(__name__)



@dataclass
class CentralDPSettings:
    """Central DP run options (`dp-*` in the run config)."""

    noise_multiplier: float = FEDERATION_DEFAULTS["dp_noise_multiplier"]  # z; 0 = central DP off
    clipping_norm: float = FEDERATION_DEFAULTS["dp_clipping_norm"]  # S: bound on each shop's encoder update (L2)
    delta: float = FEDERATION_DEFAULTS["dp_delta"]
    max_epsilon: float = FEDERATION_DEFAULTS["max_epsilon"]  # 0 = no budget
    num_shops: int = FEDERATION_DEFAULTS["dp_num_shops"]  # shops sampled per round; 0 = every training shop

    @classmethod
    def from_settings(cls, settings: FederationTable) -> CentralDPSettings:
        """The central-DP options of a run config the schema has already validated (ranges included)."""
        return cls(noise_multiplier=settings.dp_noise_multiplier, clipping_norm=settings.dp_clipping_norm,
                   delta=settings.dp_delta, max_epsilon=settings.max_epsilon, num_shops=settings.dp_num_shops)

    @property
    def enabled(self) -> bool:
        """True when a noise multiplier is set."""
        return self.noise_multiplier > 0


ReleaseHook = Callable[[int, "PrivacyReport"], None]  # (server round, privacy spent after it)


class CentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with accounting, equal shop weights and a per-round report."""

    def __init__(self, inner: FedAvg, settings: CentralDPSettings, *, num_shops: int, completed_rounds: int = 0,
                 on_release: ReleaseHook | None = None) -> None:
        if num_shops < 1:
            raise ValueError(f"central DP needs the number of shops per round; got {num_shops}")
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.delta, population_size=num_shops,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=settings.max_epsilon or None))
        if completed_rounds:  # resume: identical releases, so replaying the count restores the ledger
            accountant.compose(GaussianPrivacyEvent(settings.noise_multiplier, num_shops, num_shops),
                               count=completed_rounds)
        super().__init__(inner, settings.noise_multiplier, settings.clipping_norm, num_shops, accountant=accountant)
        self.settings = settings
        self.on_release = on_release
        self.last_report: PrivacyReport | None = None

    @property
    def arrayrecord_key(self) -> str:
        """The inner strategy's ArrayRecord name (used by wrappers such as `ShopStrategy`)."""
        return self.strategy.arrayrecord_key

    def report(self) -> PrivacyReport:
        """(epsilon, delta, unit=shop, q=1, z, S, rounds) spent so far."""
        from shared.privacy.accounting import PrivacyReport  # noqa: PLC0415 - Opacus; see the import above

        spent = self.accountant.get_privacy_spent()
        return PrivacyReport(epsilon=spent.epsilon, delta=spent.delta, unit="shop", sample_rate=1.0,
                             noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm,
                             steps=spent.num_releases)

    def round_metrics(self) -> dict[str, float]:
        """What to log for the coordinator each round (task 'privacy')."""
        r = self.report()
        return {"epsilon": r.epsilon, "delta": r.delta, "noise-multiplier": r.noise_multiplier,
                "clipping-norm": r.clipping_norm, "sample-rate": r.sample_rate, "releases": float(r.steps)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample shops, unless this round's release would exceed the budget (then stop the run)."""
        try:
            return super().configure_train(server_round, arrays, config, grid)
        except PrivacyBudgetExhausted:
            r = self.report()
            raise PrivacyBudgetExhausted(
                f"privacy budget reached: round {server_round} would take epsilon past dp-max-epsilon="
                f"{self.settings.max_epsilon} (spent epsilon={r.epsilon:.4f} at delta={r.delta:g} after "
                f"{r.steps} round(s), z={r.noise_multiplier}, S={r.clipping_norm}). The run stops here; the "
                "last checkpoint is the final model. Fix: raise dp-max-epsilon or dp-noise-multiplier") from None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average with equal shop weights (noise is calibrated to one clipped shop / n), add noise, account."""
        replies = list(replies)
        key = self.strategy.weighted_by_key
        for msg in replies:
            if not msg.has_error():
                for record in msg.content.metric_records.values():
                    record[key] = 1.0
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.last_report = self.report()
            logger.info("round %d: central DP epsilon=%.4f (delta=%g)", server_round, self.last_report.epsilon,
                        self.last_report.delta)
            if self.on_release is not None:
                self.on_release(server_round, self.last_report)
        return arrays, metrics


def wrap(inner: FedAvg, settings: CentralDPSettings, *, num_shops: int, completed_rounds: int = 0,
         on_release: ReleaseHook | None = None) -> FedAvg | CentralDP:
    """``inner`` wrapped in central DP when the settings enable it, else ``inner`` unchanged."""
    if not settings.enabled:
        return inner
    return CentralDP(inner, settings, num_shops=settings.num_shops or num_shops,
                     completed_rounds=completed_rounds, on_release=on_release)
