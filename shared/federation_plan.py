"""Whether a federation can run at all: its settings against its shops, checked wherever a run starts.

One check, three callers: the scenario loader's `Scenario.check_federation` (`fedshop simulate`/`compare`
and `simulations.federated.run_federated`), the ServerApp (`flwr run .` with a run config:
`server.federation_settings.check_runnable`) and `fedshop coordinator run` (min_shops against the merchants
registered at the SuperLink: `simulations.deploy.coordinator.check_registered_merchants`).

Refused, because no round could count or the run would hang: min_shops above the federation's shops or
above those training from round 1; join_round after the last round; SecAgg+ with fewer than two shops
(Flower's legacy sampling waits up to a day for at least two). Not refused: a `fraction_train` whose share of the shops
rounds below min_shops. Flower's FedAvg (flwr 1.42, `configure_train`) samples
``max(int(connected x fraction_train), min_train_nodes)`` nodes, and fedshop sets `min_train_nodes` (and
`min_available_nodes`) to min_shops, so such a round samples min_shops shops; that is logged as a warning
because fraction_train then has no effect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from shared.settings import FederationTable, ScenarioError, run_key

logger = logging.getLogger(__name__)

SECAGG_MIN_SHOPS = 2  # server/secure.py: Flower's legacy sampling waits for max(2, min_shops) clients


@dataclass(frozen=True)
class ShopCount:
    """How many shops a federation has: those training from round 1 and the late joiners."""

    first: int  # shops that train from round 1 (every node but the late joiners)
    joiners: int  # late joiners; they get a node only when join_round > 0

    def members(self, join_round: int) -> int:
        """Shops with a node in the run (late joiners only when they join)."""
        return self.first + (self.joiners if join_round > 0 else 0)


def field_name(name: str, style: Literal["scenario", "run"]) -> str:
    """A federation field as the user wrote it: `federation.min_shops` (scenario) or `min-shops` (run config)."""
    return f"federation.{name}" if style == "scenario" else run_key(name)


def check_federation_plan(fed: FederationTable, shops: ShopCount | None, where: str, *,
                          style: Literal["scenario", "run"] = "scenario", rounds: int | None = None) -> None:
    """Refuse (a `ScenarioError` naming ``where``, the field and the fix) a federation that cannot run.

    ``shops`` is None where the shops cannot be counted (a coordinator without the merchants' data): only
    the shop-free checks run. ``rounds`` is the run's round count when it differs from `fed.rounds`.
    """
    def n(name: str) -> str:
        return field_name(name, style)

    total = int(rounds if rounds is not None else fed.rounds)
    min_shops, join = fed.min_shops, fed.join_round
    rounds_name = "rounds" if style == "scenario" else n("rounds")
    if join > total:
        raise ScenarioError(f"{where}: {n('join_round')} = {join} is after the last round ({rounds_name} = "
                            f"{total}): the late joiners would never join. Fix: set {n('join_round')} between 1 "
                            f"and {total}, or 0 to keep them out")
    if shops is None:
        return
    members, first = shops.members(join), shops.first
    if min_shops > members:
        raise ScenarioError(f"{where}: {n('min_shops')} = {min_shops}, but the federation has only {members} "
                            f"shop(s): no round could ever count. Fix: set {n('min_shops')} to at most "
                            f"{members}, or add shops")
    if min_shops > first:
        raise ScenarioError(f"{where}: {n('min_shops')} = {min_shops}, but only {first} shop(s) train from "
                            f"round 1 ({shops.joiners} late joiner(s) wait for {n('join_round')}): round 1 would "
                            f"be short of shops. Fix: set {n('min_shops')} to at most {first}, or fewer late "
                            "joiners (data.synthetic.n_late_joiners or transfer.late_joiners)")
    if fed.secure_aggregation and members < SECAGG_MIN_SHOPS:
        raise ScenarioError(f"{where}: {n('secure_aggregation')} = true with {members} shop(s): SecAgg+ needs at "
                            f"least {SECAGG_MIN_SHOPS} (it masks each update with the others' keys; Flower's "
                            "sampling would wait a day for a second one). Fix: set "
                            f"{n('secure_aggregation')} = false, or add shops")
    sampled = int(members * fed.fraction_train)
    if sampled < min_shops:
        logger.warning("%s: %s = %s of %d shop(s) is %d, below %s = %d: Flower samples %d shops each round, so "
                       "fraction_train has no effect", where, n("fraction_train"), fed.fraction_train, members,
                       sampled, n("min_shops"), min_shops, min_shops)
