"""Pieces both federation paths use, the plain one (`server.server_app`) and SecAgg+ (`server.secure`).

The encoder every shop starts from, the shops' names for the metric log, which split(s) a round
evaluates, and the progress callback's type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord

from server.strategies import RoundReport
from shared.model import initial_encoder_state
from shared.protocol import SPLIT_JOIN
from shared.scenario import Scenario

logger = logging.getLogger(__name__)

Progress = Callable[[RoundReport, int], None]  # (report, total rounds)


def initial_encoder(scenario: Scenario) -> ArrayRecord:
    """The encoder every shop starts from: what `build_model(..., seed=scenario.seed)` builds first."""
    return ArrayRecord(initial_encoder_state(scenario.model, scenario.features, scenario.seed))


def initial_encoder_arrays(scenario: Scenario) -> dict[str, np.ndarray]:
    """`initial_encoder` as numpy arrays, leaving torch's global RNG as it was (the wire's shared start)."""
    with torch.random.fork_rng(devices=[]):
        return {k: v.numpy() for k, v in initial_encoder_state(scenario.model, scenario.features,
                                                                scenario.seed).items()}


def scenario_shop_names(scenario: Scenario) -> list[str]:
    """The federation shops' names in shop-index order; empty when the coordinator cannot read the shops.

    In deployment the coordinator may not hold the shops' data: callers then label shops by index.
    """
    try:
        return [s.name for s in scenario.federation_shops()]
    except (OSError, ValueError) as exc:
        logger.warning("shop names unavailable (%s); labelling shops by index", exc)
        return []


def eval_split_for_round(eval_split: str, final_split: str, server_round: int, total_rounds: int) -> str:
    """The split(s) round ``server_round`` evaluates: `eval_split` when it names several, else `final_split`
    in the last round (so reports can pick each shop's best-validation round)."""
    if SPLIT_JOIN in eval_split or server_round < total_rounds:
        return eval_split
    return final_split
