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
from shared.protocol import SPLIT_JOIN, eval_splits
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


def lets_shops_skip_tests(test_every_round: bool, split: str, server_round: int, total_rounds: int) -> bool:
    """Whether round ``server_round``'s evaluate request lets shops skip test passes no report can pick.

    Only when the request names val before test, and never in the last round: a task whose validation
    score is never a number reports its last tested round, and some readers take the last round's test.
    """
    splits = eval_splits(split)
    return (not test_every_round and server_round < total_rounds and "val" in splits and "test" in splits
            and splits.index("val") < splits.index("test"))
