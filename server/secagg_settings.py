"""SecAgg+ run options: the `secagg-*` keys of the run config, as the schema (shared/settings.py) validated them.

Kept apart from the workflow (`server.secure`) so the run-config parser (`server.federation_settings`)
can build them without importing the SecAgg+ run.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.server.workflow import SecAggPlusWorkflow

from shared.settings import FEDERATION_DEFAULTS, FederationTable

_D = FEDERATION_DEFAULTS  # defaults, ranges and the word check of `weighting` live in the schema


@dataclass
class SecAggSettings:
    """SecAgg+ run options (`secagg-*` in the run config)."""

    num_shares: float = _D["secagg_num_shares"]  # <= 1: share of sampled shops each key is shared with; > 1: a count
    reconstruction_threshold: float = _D["secagg_reconstruction_threshold"]  # <= 1: share of num_shares; > 1: count
    clipping_range: float = _D["secagg_clipping_range"]  # weights are clipped to +-this before quantisation
    quantization_range: int = _D["secagg_quantization_range"]
    max_weight: float = _D["secagg_max_weight"]  # largest per-shop weight; 1 with uniform weighting
    weighting: str = _D["secagg_weighting"]  # uniform | examples (weight = num-examples; raise max-weight to match)
    timeout: float = _D["secagg_timeout"]  # seconds per protocol stage; 0 = wait for every reply

    @classmethod
    def from_settings(cls, settings: FederationTable) -> SecAggSettings:
        """The SecAgg+ options of a run config the schema has already validated (no second check here)."""
        return cls(num_shares=settings.secagg_num_shares,
                   reconstruction_threshold=settings.secagg_reconstruction_threshold,
                   clipping_range=settings.secagg_clipping_range, quantization_range=settings.secagg_quantization_range,
                   max_weight=settings.secagg_max_weight, weighting=settings.secagg_weighting,
                   timeout=settings.secagg_timeout)

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
