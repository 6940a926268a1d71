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

import hashlib
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
MAX_DROPPED = 1000  # dropped replies `IdentityCheckedGrid.dropped` remembers (every one is logged)
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
            del self.dropped[:-MAX_DROPPED]  # the newest only: a node can be dropped every round of a long run
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
RestoredBinding = tuple[int, str]  # (node ID, sha256 of its public key or "") a checkpoint keeps for a shop-index


def public_key_digest(public_key: bytes) -> str:
    """``sha256:<hex>`` of a node's public key as Flower's ``NodeInfo`` gives it ("" when it has none)."""
    return f"sha256:{hashlib.sha256(public_key).hexdigest()}" if public_key else ""


def online_nodes(grid: Grid) -> tuple[set[int], dict[int, str]]:
    """(IDs of the nodes online now, node -> public-key fingerprint of those that have a key).

    Flower 1.42's ``grid.get_nodes()`` gives the ServerApp each online node's ``NodeInfo`` with the
    ``public_key`` it registered (a merchant's key with SuperNode authentication; a fresh key per start
    without it; random bytes per process in the simulation engine). A Grid without it gives node IDs only.
    """
    try:
        infos = list(grid.get_nodes())
    except Exception:  # noqa: BLE001 - a Grid without NodeInfo: node IDs alone still decide
        return {int(n) for n in grid.get_node_ids()}, {}
    keys = {int(n.node_id): bytes(getattr(n, "public_key", b"")) for n in infos}
    return set(keys), {node: public_key_digest(key) for node, key in keys.items() if key}


class ShopClaims:
    """Which shop each node may speak for in this run: checked claims, and trust on first use.

    A reply names its shop by ``shop-index``. A claim is refused (the reply is left out, the reason logged)
    when it is not a whole number (2.5, NaN, a bool), negative, or not below the number of shops; when its
    node already claimed another index in this run; or when another node already claimed that index. The
    first accepted claim of a node binds it (registered nodes start bound: ``node-bindings.json``). So a bad
    or hijacked node cannot write another shop's row of the round report, nor share its examples cap or
    leave-one-out history.

    Bindings outlive the process: `export` gives each bound index's node ID and the fingerprint of its public
    key (from `observe`), which the checkpoint keeps, and ``restored`` (a resumed run) holds them from the
    start. A restored binding is the same node when the node ID or the key fingerprint matches, so an
    authenticated merchant whose SuperLink restarted (new node ID, same key) keeps its shop, and any other
    node claiming that index is refused, online or not. When no restored identity is among the nodes online
    at the first `observe` (Flower's Ray simulation and unauthenticated SuperNodes get new IDs and keys in
    every process), the restored bindings are dropped with a warning and indexes bind afresh; with
    ``stable_keys`` (authenticated SuperNodes) those that carry a key are kept. Registered bindings win over
    restored ones, by node ID and by key.
    """

    def __init__(self, n_shops: Callable[[], int] | None = None, bindings: dict[int, int] | None = None,
                 restored: dict[int, RestoredBinding] | None = None, stable_keys: bool = False) -> None:
        self._n_shops = n_shops  # 0 (or None) = unknown: only MAX_SHOP_INDEX bounds a claim
        # nodes keep their public key across restarts (SuperNode authentication: `fedshop coordinator run`, whose run
        # dir holds node-bindings.json): restored bindings with a key are never dropped, even with every owner offline
        self.stable_keys = stable_keys
        self.node_index: dict[int, int] = dict(bindings or {})
        self.index_node: dict[int, int] = {index: node for node, index in self.node_index.items()}
        self.keys: dict[int, str] = {}  # node -> key fingerprint, of the nodes online at the last `observe`
        self.online: set[int] = set()  # nodes online at the last `observe`
        self._bound_key: dict[int, str] = {}  # index -> key fingerprint of the node it was bound to ("" unknown)
        # index -> (node, key) bound in an earlier process and not claimed in this one yet; registered ones win
        self.restored: dict[int, RestoredBinding] = {
            index: (node, key) for index, (node, key) in (restored or {}).items()
            if index not in self.index_node and node not in self.node_index}
        self._restored_node = {node: index for index, (node, _) in self.restored.items()}
        self._restored_key = {key: index for index, (_, key) in self.restored.items() if key}
        self._observed = False

    def limit(self) -> int:
        """One past the largest shop-index a reply may claim."""
        n = self._n_shops() if self._n_shops is not None else 0
        return n if n > 0 else MAX_SHOP_INDEX

    def observe(self, grid: Grid) -> set[int]:
        """Learn which nodes are online and their key fingerprints (returns the online node IDs); at the first
        call, drop restored bindings none of whose nodes is online (new node IDs and keys: a new simulation
        process, unauthenticated SuperNodes)."""
        online, self.keys = online_nodes(grid)
        self.online = online
        bound_keys = {self.keys[node] for node in self.node_index if node in self.keys}
        for index in [i for i, (_, key) in self.restored.items() if key in bound_keys]:
            self._forget_restored(index)  # its key is bound in this run already (registered under a new node ID)
        if self._observed:
            return online
        self._observed = True
        online_keys = set(self.keys.values())
        if self.restored and not any(node in online or key in online_keys for node, key in self.restored.values()):
            stale = [i for i, (_, key) in self.restored.items() if not (self.stable_keys and key)]
            if stale:
                log.warning("fedshop: none of the %d node(s) bound to a shop-index before the resume is online (new "
                            "node IDs and keys: a new simulation process, or SuperNodes without registered keys); "
                            "%d shop-index(es) bind on first use again. Fix for deployments: `fedshop coordinator "
                            "register --shop-index` binds an index to a merchant's key", len(self.restored), len(stale))
            for index in stale:
                self._forget_restored(index)
        return online

    def _restored_of(self, node: int) -> int | None:
        """The index ``node`` was bound to before the resume (by node ID, or by its key), else None."""
        index = self._restored_node.get(node)
        key = self.keys.get(node, "")
        return index if index is not None or not key else self._restored_key.get(key)

    def check(self, node: int, value: Any) -> tuple[int | None, str]:
        """(index, "") if ``node`` may claim ``value`` (binding it on first use), else (None, why)."""
        index = whole_index(value)
        if index is None:
            return None, f"'{SHOP_INDEX}' {repr(value)[:40]} is not a whole number"
        if not 0 <= index < self.limit():
            return None, f"'{SHOP_INDEX}' {index} is out of range (0..{self.limit() - 1})"
        bound = self.node_index.get(node)
        if bound is not None and bound != index:
            return None, f"node {node} claimed '{SHOP_INDEX}' {index} but is bound to {bound} in this run"
        owner = self.index_node.get(index)
        if owner is not None and owner != node:
            return None, f"node {node} claimed '{SHOP_INDEX}' {index}, which node {owner} holds in this run"
        if bound is None:
            before = self._restored_of(node)
            if before is not None and before != index:
                return None, (f"node {node} claimed '{SHOP_INDEX}' {index} but was bound to {before} before the "
                              "resume (checkpoint)")
            if index in self.restored and before != index:
                return None, (f"node {node} claimed '{SHOP_INDEX}' {index}, which node {self.restored[index][0]} "
                              "held before the resume (checkpoint; another node ID and key)")
            self._bind(node, index)
        elif not self._bound_key.get(index) and self.keys.get(node):  # a registered node: its key, once known
            self._bound_key[index] = self.keys[node]
        return index, ""

    def _bind(self, node: int, index: int) -> None:
        """Bind ``node`` to ``index`` in this run (a restored binding of the index becomes a live one)."""
        self.node_index[node] = index
        self.index_node[index] = node
        self._bound_key[index] = self.keys.get(node, "")
        self._forget_restored(index)

    def _forget_restored(self, index: int) -> None:
        """Drop the restored binding of ``index``, if any."""
        if index in self.restored:
            old_node, old_key = self.restored.pop(index)
            self._restored_node.pop(old_node, None)
            self._restored_key.pop(old_key, None)

    def export(self) -> dict[int, RestoredBinding]:
        """Index -> (node, key fingerprint) of every binding, live or restored and not yet claimed: what a
        checkpoint keeps."""
        out = dict(self.restored)
        out.update({index: (node, self._bound_key.get(index, "")) for index, node in self.index_node.items()})
        return dict(sorted(out.items()))
