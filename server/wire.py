"""The coordinator's side of message compression (`federation.compression`, `shared.compression`).

Down: each node's message carries the encoder in full (first message, rejoin, resume, or after any
failed reply), as an exact patch of the global the node is known to hold, or, for an evaluation by a
shop that serves its own encoder (personal mix) and trained this round, not at all. A node holds a
global once it replied without error to a message that carried it; the client mod
(`client.wire_mod`) checks the patched global's digest, so a node never evaluates or trains on
anything but the coordinator's exact global. A node known to hold nothing gets a patch of the run's
initial encoder (`initial`, which a shop rebuilds from the scenario and checks by digest; round 1's
patch is empty), unless it failed a message sent so: then it gets the encoder in full. Up: train
replies are deltas against the global sent in the round; `receive` decodes them to dense before
screening and aggregation, and turns an undecodable one into an error reply naming the problem (a
left-out shop, never a crash).

It also counts the array payload bytes (npy framing included) each way, for mode "none" too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from server.decoded_array import DecodedArray, array_record
from shared.compression import CompressionError, check_mode, decode_delta, digest, encode_patch
from shared.npy_check import ArrayFormatError, checked_numpy
from shared.protocol import ERROR_CODE_UNDECODABLE, LOCAL_PREFIX, WIRE_FULL, WIRE_OMITTED, WIRE_PATCH, WIRE_RECORD

FULL, PATCH, OMITTED = WIRE_FULL, WIRE_PATCH, WIRE_OMITTED

logger = logging.getLogger(__name__)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of a record's serialised arrays (what its values take in a message)."""
    return sum(len(a.data) for a in record.values())


def _encoder(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items() if not k.startswith(LOCAL_PREFIX)}


class Wire:
    """Which global each node holds, per-node message encoding, reply decoding and byte counts."""

    def __init__(self, mode: str = "none", *, omit_evaluate_encoder: bool = False,
                 initial: Mapping[str, np.ndarray] | None = None) -> None:
        self.mode = check_mode(mode)
        self.omit_evaluate_encoder = omit_evaluate_encoder
        self._versions: dict[str, dict[str, np.ndarray]] = {}  # digest -> dense global some node holds
        # The run's initial encoder, which shops rebuild themselves: the base for nodes that hold nothing.
        self._initial = digest(initial) if initial is not None else ""
        if initial is not None:
            self._versions[self._initial] = dict(initial)
        self._no_initial: set[int] = set()  # nodes that failed a message patched against the initial
        self._pending_initial: set[int] = set()  # nodes sent such a patch this phase
        self._held: dict[int, str] = {}  # node -> digest of the global it holds (confirmed by a good reply)
        self._pending: dict[int, str] = {}  # node -> digest it holds if it answers this phase without error
        self._base: dict[str, np.ndarray] = {}  # this round's train global: what the replies are deltas of
        self.trained: set[int] = set()  # nodes whose train reply this round was aggregated
        self._touched: dict[str, np.ndarray] = {}  # key -> rows some decoded reply changed this round
        self.bytes: dict[str, int] = {"down": 0, "up": 0, "messages-down": 0, "replies-up": 0}

    def forget_offline(self, online: set[int]) -> None:
        """Forget what nodes that are not ``online`` hold, and the globals only they held.

        Without it a node that left (or a node ID that rotated) would keep its entry, and the dense copy of the
        global it last held, for the rest of the run. A node that comes back is sent what a new node gets.
        """
        self._held = {n: d for n, d in self._held.items() if n in online}
        self._no_initial &= online
        live = set(self._held.values())
        self._versions = {d: v for d, v in self._versions.items() if d in live or d == self._initial}

    def take_bytes(self) -> dict[str, int]:
        """The byte counts since the last call (one round), reset to zero."""
        out, self.bytes = self.bytes, dict.fromkeys(self.bytes, 0)
        return out

    def prepare(self, messages: Iterable[Message], key: str, kind: str) -> list[Message]:
        """Give each message its own content: the encoder full, patched or omitted (``kind``: train|evaluate)."""
        messages = list(messages)
        digests: dict[int, tuple[str, dict[str, np.ndarray]]] = {}  # id(record) -> (digest, dense encoder)
        patches: dict[tuple[str, str], dict[str, Array]] = {}  # (held, target digest) -> patch arrays
        for msg in messages:
            record = msg.content[key]
            if self.mode == "none":
                self.bytes["down"] += record_bytes(record)
                self.bytes["messages-down"] += 1
                continue
            if id(record) not in digests:
                enc = _encoder(record)
                digests[id(record)] = (digest(enc), enc)
            target, enc = digests[id(record)]
            if kind == "train":
                self._base = enc
            node = msg.metadata.dst_node_id
            held = self._held.get(node)
            base = held if held in self._versions else self._initial if node not in self._no_initial else ""
            local = {k: a for k, a in record.items() if k.startswith(LOCAL_PREFIX)}
            if kind == "evaluate" and self.omit_evaluate_encoder and held and node in self.trained:
                form, arrays, self._pending[node] = OMITTED, ArrayRecord(local), held
            elif base:
                if (base, target) not in patches:  # nodes holding the same global get the same patch
                    patches[base, target] = {k: Array(v) for k, v in encode_patch(enc, self._versions[base]).items()}
                form, arrays = PATCH, ArrayRecord({**local, **patches[base, target]})
                self._pending[node], held = target, base
                if base != self._held.get(node):
                    self._pending_initial.add(node)
            else:
                form, arrays, self._pending[node] = FULL, record, target
            self._versions.setdefault(target, enc)
            content = RecordDict({key: arrays})
            for name, rec in msg.content.items():
                if name != key:
                    content[name] = rec
            content[WIRE_RECORD] = ConfigRecord({"mode": self.mode, "encoder": form, "base": held or "",
                                                 "target": target})
            msg.content = content
            self.bytes["down"] += record_bytes(arrays)
            self.bytes["messages-down"] += 1
        return messages

    def receive(self, replies: list[Message], sent: list[Message], kind: str) -> list[Message]:
        """Record which nodes now hold which global; decode train replies to dense (undecodable -> error)."""
        if self.mode == "none":
            for msg in replies:
                if kind == "train" and msg.has_content():
                    self.bytes["up"] += sum(record_bytes(r) for r in msg.content.array_records.values())
                    self.bytes["replies-up"] += 1
            return replies
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error() or node not in self._pending:
                self._held.pop(node, None)
                self._no_initial |= {node} & self._pending_initial  # e.g. its initial encoder differs
            else:
                self._held[node] = self._pending[node]
        for node in set(self._pending) - answered:  # silent: it may or may not have decoded
            self._held.pop(node, None)
            self._no_initial |= {node} & self._pending_initial
        self._pending, self._pending_initial = {}, set()
        if kind == "train":
            self._touched = {k: np.zeros(b.shape[0] if b.ndim else 1, bool) for k, b in self._base.items()}
            replies = [self._decode(msg, sent) for msg in replies]
            self.trained = set()
        live = set(self._held.values())
        self._versions = {d: v for d, v in self._versions.items() if d in live or d == self._initial}
        return replies

    def keep_untouched_rows(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The aggregate with rows no aggregated reply changed reset to this round's global, bit for bit.

        A weighted mean of equal rows is that row, but float rounding moves it by an ulp, which would
        make every row "changed" and the next patches and deltas dense. Only for mean strategies
        without server state (FedAvg, FedProx): momentum or adaptive steps legitimately move such rows.
        """
        if self.mode == "none":
            return merged
        for key, touched in self._touched.items():
            if key in merged and not touched.all():
                base = self._base[key]
                if merged[key].shape != base.shape:
                    continue
                a = np.array(merged[key], copy=True)
                keep = ~touched if a.ndim else np.ones((), bool)
                a[keep] = base[keep]
                merged[key] = a
        return merged

    def _decode(self, msg: Message, sent: list[Message]) -> Message:
        """A train reply with its delta decoded to the dense encoder, or an error reply saying why not."""
        if msg.has_error() or len(msg.content.array_records) != 1:
            return msg  # screening reports these as they are
        name, record = next(iter(msg.content.array_records.items()))
        self.bytes["up"] += record_bytes(record)
        self.bytes["replies-up"] += 1
        try:
            delta = {k: checked_numpy(k, a) for k, a in record.items() if not k.startswith(LOCAL_PREFIX)}
            dense = decode_delta(delta, self._base)
            for name_, a in delta.items():  # the rows this reply changed (only valid replies get here)
                key, _, part = name_.rpartition("@")
                if part == "rows":
                    self._touched[key][a] = True
                elif part in ("dense", "full"):
                    self._touched[key][:] = True
        except Exception as exc:  # malformed bytes too: the shop is left out with the reason, the round goes on
            known = (CompressionError, ArrayFormatError)
            reason = exc if isinstance(exc, known) else f"arrays do not parse ({type(exc).__name__})"
            ins = next((m for m in sent if m.metadata.message_id == msg.metadata.reply_to_message_id), None)
            logger.warning("compressed update from node %d rejected: %s", msg.metadata.src_node_id, reason)
            if ins is None:
                msg.content = RecordDict(dict(msg.content.metric_records))  # screened out: no ArrayRecord
                return msg
            return Message(Error(code=ERROR_CODE_UNDECODABLE, reason=f"compressed update rejected: {reason}"),
                           reply_to=ins)
        out = array_record({k: DecodedArray(v) for k, v in dense.items()})  # no npy bytes unless read
        for k, a in record.items():
            if k.startswith(LOCAL_PREFIX):
                out[k] = a
        msg.content = RecordDict({name: out, **{k: r for k, r in msg.content.items() if k != name}})
        return msg
