"""Drop and report replies whose shop identity disagrees with the SuperNode's registration.

In a deployment the node key is the merchant's identity: the SuperLink authenticates the key, and a
reply names its shop by the allow-listed ``shop-index``. `fedshop coordinator register --shop-index N`
binds the node ID of a key to N, and `fedshop coordinator run` writes those bindings into the run dir
(``node-bindings.json``). A reply from a bound node that claims another shop-index (another merchant
starting with this key while its owner is offline, or a misconfigured SuperNode) is dropped before the
strategy sees it, so the round treats that node as silent, and a warning naming both is logged to the
run's output. A thief who also copies the victim's shop-index is not caught here: the key is the identity.
Without a bindings file (simulation, `flwr run` by hand) the Grid is returned unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from server.delegating_grid import DelegatingGrid
from shared.protocol import SHOP_INDEX

BINDINGS_FILE = "node-bindings.json"  # {"<node id>": <shop index>} in the run dir
log = logging.getLogger("flwr")


def load_bindings(run_dir: str | Path) -> dict[int, int]:
    """Node ID -> registered shop-index from ``run_dir/node-bindings.json`` (empty when there is none)."""
    path = Path(run_dir) / BINDINGS_FILE
    if not path.exists():
        return {}
    try:
        return {int(node): int(index) for node, index in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable node bindings ({err}). Fix: delete it and submit the run again with "
                         "`fedshop coordinator run`") from None


def claimed_shop_index(msg: Message) -> int | None:
    """The ``shop-index`` a reply names (None for error replies, replies without one, and a claim that is not a
    whole number: `ShopClaims` refuses those)."""
    if msg.has_error():
        return None
    for record in msg.content.metric_records.values():
        if SHOP_INDEX in record:
            return whole_index(record[SHOP_INDEX])
    return None


def whole_index(value: Any) -> int | None:
    """``value`` as a whole-number index (an int, or a float like 2.0), else None (2.5, NaN, inf, a bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def mismatch(msg: Message, bindings: dict[int, int]) -> tuple[int, int] | None:
    """(registered, claimed) shop-index when the reply's node is bound to another shop, else None."""
    node = msg.metadata.src_node_id
    claimed = claimed_shop_index(msg)
    if node not in bindings or claimed is None or claimed == bindings[node]:
        return None
    return bindings[node], claimed


class IdentityCheckedGrid(DelegatingGrid):
    """Delegates to ``inner``; `send_and_receive` drops replies whose shop-index disagrees with the binding."""

    def __init__(self, inner: Grid, bindings: dict[int, int]) -> None:
        super().__init__(inner)
        self.bindings = bindings
        self.dropped: list[tuple[int, int, int]] = []  # (node, registered, claimed)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The inner Grid's replies minus those from a node that claims another shop than it registered as."""
        kept = []
        for msg in self._inner.send_and_receive(messages, timeout=timeout):
            wrong = mismatch(msg, self.bindings)
            if wrong is None:
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            self.dropped.append((node, *wrong))
            log.warning("fedshop: reply dropped: SuperNode %s is registered as shop-index %s but replied as "
                        "shop-index %s (its key is used by another shop, or its --shop-index is wrong). Fix: "
                        "check that merchant; if its key leaked, `fedshop coordinator unregister %s` and rotate it",
                        node, wrong[0], wrong[1], node)
        return kept


def check_identities(grid: Grid, run_dir: str | Path) -> Grid:
    """Wrap ``grid`` when the run dir holds node bindings (a `fedshop coordinator run`); else return it."""
    bindings = load_bindings(run_dir) if run_dir else {}
    return IdentityCheckedGrid(grid, bindings) if bindings else grid


MAX_SHOP_INDEX = 1_000_000  # claims at or above are refused when the coordinator cannot count the shops


class ShopClaims:
    """Which shop each node may speak for in this run: checked claims, and trust on first use.

    A reply names its shop by ``shop-index``. A claim is refused (the reply is left out, the reason logged)
    when it is not a whole number (2.5, NaN, a bool), negative, or not below the number of shops; when its
    node already claimed another index in this run; or when another node already claimed that index. The
    first accepted claim of a node binds it (registered nodes start bound: ``node-bindings.json``). So a bad
    or hijacked node cannot write another shop's row of the round report, nor share its examples cap or
    leave-one-out history. Kept in memory for the run's process: a `--resume` starts unbound (node IDs of
    Flower's Ray simulation, and of a deployment whose SuperLink restarted, change between processes),
    except for the registered bindings, which the run dir keeps.
    """

    def __init__(self, n_shops: Callable[[], int] | None = None, bindings: dict[int, int] | None = None) -> None:
        self._n_shops = n_shops  # 0 (or None) = unknown: only MAX_SHOP_INDEX bounds a claim
        self.node_index: dict[int, int] = dict(bindings or {})
        self.index_node: dict[int, int] = {index: node for node, index in self.node_index.items()}

    def limit(self) -> int:
        """One past the largest shop-index a reply may claim."""
        n = self._n_shops() if self._n_shops is not None else 0
        return n if n > 0 else MAX_SHOP_INDEX

    def check(self, node: int, value: Any) -> tuple[int | None, str]:
        """(index, "") if ``node`` may claim ``value`` (binding it on first use), else (None, why)."""
        index = whole_index(value)
        if index is None:
            return None, f"'{SHOP_INDEX}' {value!r} is not a whole number"
        if not 0 <= index < self.limit():
            return None, f"'{SHOP_INDEX}' {index} is out of range (0..{self.limit() - 1})"
        bound = self.node_index.get(node)
        if bound is not None and bound != index:
            return None, f"node {node} claimed '{SHOP_INDEX}' {index} but is bound to {bound} in this run"
        owner = self.index_node.get(index)
        if owner is not None and owner != node:
            return None, f"node {node} claimed '{SHOP_INDEX}' {index}, which node {owner} holds in this run"
        self.node_index[node] = index
        self.index_node[index] = node
        return index, ""
