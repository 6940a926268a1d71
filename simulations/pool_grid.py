"""`PoolGrid`: a Flower `Grid` that hands messages straight to a pool of forked worker processes.

Flower's simulation engine keeps every message in its in-memory link state, which each virtual
SuperNode scans every 0.1 s (O(N^2) per round at N shops), and ships each shop's context through
Ray. Here every node is registered before round 1, owned by one worker whose contexts never leave
it (`balanced_groups`: largest shop first, each to the least-loaded worker, so no worker gets all the
big shops), and a round's messages go to each worker once: messages that share
one RecordDict (the strategy sends the same encoder to all shops) are serialised once per worker.
Messages and replies cross the process boundary as Flower's own protobuf (`flwr.common.serde`),
so the ServerApp and the ClientApp see real `Message` objects, exactly as under a SuperLink.

Deadlines: a shop whose handler runs longer than the round timeout the strategy passes is late:
its worker is killed and restarted (the shop's local part is on disk) and the shop is left out of
the round. The whole round ends at ``timeout x`` the busiest worker's message count (its shops run
one after another). A handler that raises
gives an error reply (the shop is left out); a worker that dies is reported in `failures`, its
running shop gets an error reply and its queued shops are sent to a fresh worker.

Workers are forked (POSIX only) so the world built once in the parent is shared copy-on-write.
Each worker keeps its shops' built models between messages (`client.model_cache`; the local part is
re-read from disk only when the cache cannot prove it holds the file's): an idle shop's memory is its
cached model, within the cache's budget, not its state records.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing as mp
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
from flwr.common.serde_utils import metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.message_pb2 import Metadata as ProtoMetadata
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from simulations.local_grid import LocalGridBase, set_task_identity

logger = logging.getLogger(__name__)

# Records of `context.state` that the ClientApp also keeps in the shop's state directory
# (client.local_state, client.client_app): a worker drops them after each message, so an idle shop
# holds no copy of its state in memory; the next message reads the file, as a restarted SuperNode does.
ON_DISK_RECORDS = ("fedshop.local-part", "fedshop.own-encoder", "fedshop.local-lineage",
                   "fedshop.dpsgd-accountant")
POLL_SECONDS = 0.5  # how often the parent checks for dead or late workers while it waits


def balanced_groups(loads: Mapping[int, float], workers: int) -> list[list[int]]:
    """Node IDs split over ``workers`` groups: the next-largest load goes to the least-loaded group.

    Greedy longest-processing-time: the busiest group is at most 4/3 of the best split's. Ties go to
    the lower node ID and the lower group, so the split is deterministic. Groups may be empty (more
    workers than nodes); each group lists its nodes in ascending ID.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least one. Fix: pass workers >= 1")
    heap = [(0.0, g) for g in range(workers)]
    groups: list[list[int]] = [[] for _ in range(workers)]
    for nid in sorted(loads, key=lambda n: (-float(loads[n]), n)):
        total, g = heapq.heappop(heap)
        groups[g].append(nid)
        heapq.heappush(heap, (total + float(loads[nid]), g))
    return [sorted(group) for group in groups]


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _serve(app: Any, nodes: dict[int, dict], run_config: dict, tasks: Any, out: Connection,
           evict_state: bool) -> None:
    """Worker loop: run each message of each batch through ``app`` with its node's persistent context."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import torch

    torch.set_num_threads(1)  # one core per worker
    set_task_identity()
    from client import local_state, model_cache

    model_cache.clear()  # models the parent process may have cached are not this worker's
    local_state.contexts_drop_disk_records(evict_state)  # so saves keep them in the file and the model cache only
    contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                             run_config=dict(run_config)) for nid, cfg in nodes.items()}
    while True:
        batch = tasks.get()
        if batch is None:
            return
        content_bytes, metas = batch
        content = ProtoRecordDict.FromString(content_bytes) if content_bytes is not None else None
        for meta_bytes in metas:
            meta = ProtoMetadata.FromString(meta_bytes)
            out.send(("start", meta.message_id, time.time()))
            msg = message_from_proto(ProtoMessage(metadata=meta, content=content))
            context = contexts[meta.dst_node_id]
            try:
                reply = app(msg, context)
            except Exception as exc:  # a shop's failure is an error reply, as in Flower's runtimes
                logger.warning("node %d raised %s: %s", meta.dst_node_id, type(exc).__name__, exc)
                reply = _error_reply(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
            if evict_state:
                for name in ON_DISK_RECORDS:
                    context.state.pop(name, None)
            out.send(("reply", meta.message_id, message_to_proto(reply).SerializeToString()))


@dataclass
class _Worker:
    index: int
    nodes: dict[int, dict]
    proc: Any = None
    tasks: Any = None
    results: Connection | None = None


@dataclass
class _Pending:
    msg: Message
    worker: int
    content: bytes | None
    meta: bytes
    started: float | None = None


@dataclass
class PoolGrid(LocalGridBase):
    """In-process coordinator side of a worker pool; use as a context manager (starts and stops the workers)."""

    app: Any  # the ClientApp (or any callable (Message, Context) -> Message)
    node_configs: dict[int, dict]
    workers: int = 2
    run_config: dict = field(default_factory=dict)
    evict_state: bool = True  # drop on-disk records from memory after each message (needs a run-dir)
    loads: dict[int, float] | None = None  # node ID -> its shop's work (rows); None = every node alike
    failures: list[str] = field(default_factory=list)  # worker deaths and kills, in order

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: the pool needs at least one worker. Fix: pass workers >= 1")
        self._open_run(self.run_config)
        self._mp = mp.get_context("fork")
        ids = sorted(self.node_configs)
        count = min(self.workers, len(ids)) or 1
        loads = {nid: float((self.loads or {}).get(nid, 1.0)) for nid in ids}
        groups = balanced_groups(loads, count)
        self._pool = [_Worker(i, {nid: self.node_configs[nid] for nid in group}) for i, group in enumerate(groups)]
        self._owner = {nid: w.index for w in self._pool for nid in w.nodes}
        self._pending: dict[str, _Pending] = {}
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------------ worker processes
    def __enter__(self) -> PoolGrid:
        for worker in self._pool:
            self._spawn(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, worker: _Worker) -> None:
        worker.tasks = self._mp.Queue()
        receive, send = self._mp.Pipe(duplex=False)
        worker.proc = self._mp.Process(target=_serve, name=f"fedshop-pool-{worker.index}", daemon=True,
                                       args=(self.app, worker.nodes, self.run_config, worker.tasks, send,
                                             self.evict_state))
        worker.proc.start()
        send.close()  # the worker holds the only writer: its death reads as EOF here
        worker.results = receive

    def _stop(self, worker: _Worker, *, kill: bool) -> None:
        if worker.proc is None:
            return
        if kill:
            worker.proc.kill()
        else:
            worker.tasks.put(None)
        worker.proc.join(timeout=None if kill else 10)
        if worker.proc.is_alive():
            worker.proc.kill()
            worker.proc.join()
        worker.tasks.cancel_join_thread()  # a killed worker never drains its queue
        worker.tasks.close()
        worker.results.close()
        worker.proc = None

    def close(self) -> None:
        """Stop every worker (a clean exit, then a kill after 10 s)."""
        for worker in self._pool:
            self._stop(worker, kill=False)

    def _restart(self, worker: _Worker, reason: str) -> None:
        """Fail the shop that was running, restart the worker and resend its queued messages."""
        self.failures.append(reason)
        logger.error("%s", reason)
        self._stop(worker, kill=True)
        for mid, pend in list(self._pending.items()):
            if pend.worker == worker.index and pend.started is not None:
                code = ErrorCode.CLIENT_APP_CRASHED
                self._replies[mid] = _error_reply(pend.msg, code, reason)
                del self._pending[mid]
        self._spawn(worker)
        for pend in self._pending.values():
            if pend.worker == worker.index:
                worker.tasks.put((pend.content, [pend.meta]))

    # ------------------------------------------------------------------ Grid API
    def get_node_ids(self) -> Iterable[int]:
        """Every shop's node: all are registered before round 1."""
        return list(self._owner)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message on its node's worker; one serialised copy of shared content per worker."""
        batches: dict[tuple[int, int], tuple[bytes | None, list[bytes]]] = {}
        encoded: dict[int, bytes | None] = {}
        ids = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid not in self._owner:
                raise ValueError(f"message for node {nid}, which this pool does not hold. Fix: send to one of "
                                 "grid.get_node_ids()")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            key = id(msg.content) if msg.has_content() else 0
            if key not in encoded:
                encoded[key] = (recorddict_to_proto(msg.content).SerializeToString() if msg.has_content() else None)
            meta = metadata_to_proto(msg.metadata).SerializeToString()
            worker = self._owner[nid]
            batches.setdefault((worker, key), (encoded[key], []))[1].append(meta)
            self._pending[msg.metadata.message_id] = _Pending(msg, worker, encoded[key], meta)
            ids.append(msg.metadata.message_id)
        for (worker, _), batch in batches.items():
            self._pool[worker].tasks.put(batch)
        return ids

    def _drain(self, wait_seconds: float) -> None:
        """Read what workers sent within ``wait_seconds``; restart the dead ones."""
        live = {w.results: w for w in self._pool if w.results is not None}
        for conn in wait(list(live), timeout=wait_seconds):
            worker = live[conn]
            try:
                while conn.poll(0):
                    kind, mid, payload = conn.recv()
                    if mid not in self._pending:
                        continue  # a message already failed (e.g. its worker was restarted)
                    if kind == "start":
                        self._pending[mid].started = time.monotonic()
                    else:
                        del self._pending[mid]
                        self._replies[mid] = message_from_proto(ProtoMessage.FromString(payload))
            except (EOFError, OSError):
                worker.proc.join(timeout=5)
                code = worker.proc.exitcode
                running = [p.msg.metadata.dst_node_id for p in self._pending.values()
                           if p.worker == worker.index and p.started is not None]
                self._restart(worker, f"pool worker {worker.index} (pid {worker.proc.pid}) died with exit code "
                                      f"{code} while node(s) {running or 'none'} ran; restarted it")

    def _kill_late(self, shop_seconds: float) -> None:
        now = time.monotonic()
        for pend in list(self._pending.values()):
            if pend.started is not None and now - pend.started > shop_seconds:
                worker = self._pool[pend.worker]
                self._restart(worker, f"node {pend.msg.metadata.dst_node_id} ran longer than the round timeout "
                                      f"({shop_seconds:g} s); killed and restarted pool worker {worker.index}")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that arrived for the given message IDs (each delivered once)."""
        self._drain(0)
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def round_deadline(self, message_ids: Iterable[str], timeout: float) -> float:
        """Seconds a round of these (pending) messages may take: the busiest worker runs its shops one after
        another, each within ``timeout``, so the round gets ``timeout x`` that worker's message count."""
        per_worker = Counter(self._pending[mid].worker for mid in message_ids if mid in self._pending)
        return timeout * max(per_worker.values(), default=1)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then collect replies until all arrived or the round deadline passed.

        ``timeout`` (the strategy's round timeout) is each shop's own budget; the round's is
        `round_deadline`. Shops still queued or running at the deadline are left out.
        """
        ids = list(self.push_messages(list(messages)))
        deadline = None if timeout is None else time.monotonic() + self.round_deadline(ids, timeout)
        replies: list[Message] = []
        waiting = set(ids)
        while waiting:
            self._drain(POLL_SECONDS)
            got = [self._replies.pop(i) for i in list(waiting) if i in self._replies]
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            replies.extend(got)
            if timeout is not None:
                self._kill_late(timeout)
                if time.monotonic() > deadline and waiting:
                    self._abandon(waiting)
                    break
        return replies

    def _abandon(self, waiting: set[str]) -> None:
        """The round is over: restart workers that still hold its messages, so the next round starts clean."""
        late = {self._pending[m].worker for m in waiting if m in self._pending}
        for mid in waiting:
            self._pending.pop(mid, None)
        for index in sorted(late):
            self._restart(self._pool[index], f"round deadline passed with pool worker {index} still busy; "
                                             "its remaining shops are left out of the round")


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
