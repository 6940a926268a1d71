"""SecAgg+ run options: the `secagg-*` keys of the run config, as the schema (shared/settings.py) validated them.

Kept apart from the workflow (`server.secure`) so the run-config parser (`server.federation_settings`)
can build them without importing the SecAgg+ run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow

from shared.settings import FEDERATION_DEFAULTS, FederationTable

_D = FEDERATION_DEFAULTS  # defaults, ranges and the word check of `weighting` live in the schema


class DropTolerantSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, except that a shop gone before its key shares went out is simply not in the round.

    Flower 1.42 treats every node sampled at set-up that is not active at unmasking as a dropout whose
    pairwise masks must be removed, and asks the others for shares of its key. A shop that refused (or
    failed) at set-up or at share-keys never gave anyone such shares (nor did anyone mask against it), so
    every other shop fails unmasking (`KeyError` on its node ID) and the whole round halts: one refusing
    shop stopped the federation; and a later dropout's masks were then removed against every sampled
    neighbour, gone ones included (the coordinator crashed: no public keys of a node gone at set-up). After
    share-keys the round's members, and each node's neighbours, are therefore the nodes that sent their key
    shares (the SecAgg+ paper's U2); a later dropout is recovered as before. Nothing else changes: the
    threshold, the shares and the masks are Flower's, and the coordinator still asks for either a node's
    mask-seed shares (it answered) or its key shares (it dropped out), never both.
    """

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's share-keys stage, then only the nodes whose key shares went out remain the round's members."""
        super().share_keys_stage(grid, context, state)
        members = set(state.active_node_ids)
        state.sampled_node_ids = members
        # a later dropout's masks are removed against its neighbours; it masked only with members (those whose
        # key shares reached it), and a node gone at set-up has no public keys to compute a mask with
        state.nid_to_neighbours = {nid: set(nbs) & members for nid, nbs in state.nid_to_neighbours.items()
                                   if nid in members}
        # Flower's own check, over the members only (a node gone at set-up has no active neighbours to count)
        return bool(state.sampled_node_ids) and self._check_threshold(state)


@dataclass
class SecAggSettings:
    """SecAgg+ run options (`secagg-*` in the run config)."""

    num_shares: float = _D["secagg_num_shares"]  # <= 1: share of sampled shops each key is shared with; > 1: a count
    reconstruction_threshold: float = _D["secagg_reconstruction_threshold"]  # <= 1: share of num_shares; > 1: count
    clipping_range: float = _D["secagg_clipping_range"]  # weights are clipped to +-this before quantisation
    quantization_range: int = _D["secagg_quantization_range"]
    max_weight: float = _D["secagg_max_weight"]  # largest per-shop weight; 1 with uniform weighting
    weighting: str = _D["secagg_weighting"]  # uniform | examples (weight = num-examples; raise max-weight to match)
    timeout: float = _D["secagg_timeout"]  # seconds per protocol stage; 0: the grid's bound (round-timeout)

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
        return DropTolerantSecAggPlus(num_shares=count_or_share(self.num_shares),
                                  reconstruction_threshold=count_or_share(self.reconstruction_threshold),
                                  max_weight=self.max_weight, clipping_range=self.clipping_range,
                                  quantization_range=int(self.quantization_range),
                                  timeout=self.timeout or None)

    def quantisation_step(self) -> float:
        """One quantum: stochastic rounding moves each shop's value, hence the mean, by less than this."""
        return 2 * self.clipping_range / self.quantization_range
