"""SecAgg+ run options: the `secure-aggregation` switch and `secagg-*` keys of the run config.

Kept apart from the workflow (`server.secure`) so the run-config parser (`server.federation_settings`)
can read them without importing the SecAgg+ run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow

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
