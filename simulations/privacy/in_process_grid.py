"""`InProcessGrid`: a Flower `Grid` whose nodes are ClientApp calls in this process.

It delivers each message to a ClientApp here and records everything the coordinator receives.
Flower's simulation engine (Ray) is the path for real runs; the attacks and the SecAgg+ tests need
the coordinator's exact view, dropouts on demand, and no per-message process start, which an
in-process grid gives. Hand-written because Flower's grids (`InMemoryGrid`, gRPC) only put messages
into a SuperLink's state for SuperNodes or the simulation engine to run; none calls a ClientApp itself.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from simulations.local_grid import LocalGridBase
from simulations.local_grid import node_configs as numbered_nodes

logger = logging.getLogger(__name__)

ERROR_CODE_CLIENT_EXCEPTION = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION

# (node_id, message) -> True to drop the message (the node "goes offline" from then on).
DropRule = Callable[[int, Message], bool]


@dataclass
class Received:
    """One reply as the coordinator got it (deep copy)."""

    node_id: int
    message_type: str
    group_id: str
    content: RecordDict | None
    error: str | None


@dataclass
class InProcessGrid(LocalGridBase):
    """In-process Grid: each node is a ClientApp call with its own persistent Context."""

    app: ClientApp
    node_configs: dict[int, dict]
    run_config: dict = field(default_factory=dict)
    drop: DropRule | None = None
    received: list[Received] = field(default_factory=list)
    seconds_in_clients: float = 0.0

    def __post_init__(self) -> None:
        self._open_run(self.run_config)
        self._contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                       run_config=dict(self.run_config)) for nid, cfg in self.node_configs.items()}
        self._offline: set[int] = set()
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        """Nodes still online."""
        return [nid for nid in self._contexts if nid not in self._offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now (a copy, as if serialised); keep replies for `pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            nid = msg.metadata.dst_node_id
            if nid in self._offline or (self.drop is not None and self.drop(nid, msg)):
                self._offline.add(nid)
                continue
            sent = Message(copy.deepcopy(msg.content), nid, msg.metadata.message_type,
                           group_id=msg.metadata.group_id)
            sent.metadata.__dict__["_message_id"] = msg.metadata.message_id
            start = time.perf_counter()
            try:
                reply = self.app(sent, self._contexts[nid])
            except Exception as exc:  # a shop's failure becomes an error reply, as in Flower's runtime
                logger.warning("node %d raised %s", nid, exc)
                reply = Message(Error(ERROR_CODE_CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=sent)
            self.seconds_in_clients += time.perf_counter() - start
            content = None if reply.has_error() else copy.deepcopy(reply.content)
            self.received.append(Received(nid, msg.metadata.message_type, msg.metadata.group_id, content,
                                          reply.error.reason if reply.has_error() else None))
            out = Message(content, reply_to=msg) if content is not None else Message(reply.error, reply_to=msg)
            self._replies[msg.metadata.message_id] = out
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to the given message IDs (each delivered once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def context_of(self, node_id: int) -> Context:
        """The node's persistent context (its local state lives here between rounds)."""
        return self._contexts[node_id]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and immediately pull: every online node answers synchronously."""
        return list(self.pull_messages(self.push_messages(list(messages))))


def nodes(n: int) -> dict[int, dict]:
    """Node configs for ``n`` simulated shops (`simulations.local_grid.node_configs`: IDs 101.., `partition-id` i)."""
    return numbered_nodes(n)
