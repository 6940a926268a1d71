"""A Grid that pulls replies every 0.1 s instead of flwr 1.42's hard-coded 3 s in deployment.

`HttpGrid.send_and_receive` (the deployment engine's Grid) sleeps 3 s between pulls, so every
message round trip ends up to 3 s after the last reply reached the SuperLink. This wrapper keeps
Flower's push/pull calls and only changes the pause; `FEDSHOP_GRID_POLL_INTERVAL` (seconds,
0.01-60; "3" restores Flower's behaviour) sets it in the ServerApp's environment.

It also packs every message's content into one ConfigRecord on the way out and unpacks the replies
(`shared.wire_pack`; the ClientApp's `client.pack_mod` does the same on its side): flwr moves each
record, Array and chunk as its own object, one HTTPS request each per hop; packed, a message is 3
objects. `FEDSHOP_PACK_ARRAYS=0` sends them as Flower does.

Replies: `HttpGrid.pull_messages` pulls a reply's objects with `pull_objects`, whose back-off starts at 1 s
(a default argument, no flag or env var); a reply is visible before its SuperNode finished pushing its
objects, so the ServerApp usually waits that 1 s per round trip. `shared.pull_backoff` binds 0.02 s
(doubling to 0.25 s) into the function `http_grid` calls, as on the SuperNode; it checks flwr's interface
first and refuses a changed flwr (`FEDSHOP_GRID_PULL_BACKOFF=1` keeps Flower's).

After a reply arrives the next pull comes `FEDSHOP_GRID_AFTER_REPLY_POLL` seconds later (default 0.02,
doubling back to the poll interval while nothing arrives; `shared.pull_backoff.PollSchedule`): a round's
replies arrive close together, so the last one is seen ~0.02 s after it reached the SuperLink rather than
up to 0.1 s. Setting it to the poll interval gives the old fixed polling.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from server.delegating_grid import DelegatingGrid
from shared import pull_backoff
from shared.env_seconds import seconds_from_env
from shared.pull_backoff import PollSchedule
from shared.timing_log import record
from shared.wire_pack import PackError, pack, unpack

POLL_ENV = "FEDSHOP_GRID_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = 0.1  # what Flower's own InMemoryGrid (simulation) uses
PACK_ENV = "FEDSHOP_PACK_ARRAYS"
AFTER_REPLY_ENV = "FEDSHOP_GRID_AFTER_REPLY_POLL"
DEFAULT_AFTER_REPLY = 0.02


def packing_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether to pack messages' Arrays ($FEDSHOP_PACK_ARRAYS: "1" default, "0" = Flower's one object each)."""
    raw = (os.environ if environ is None else environ).get(PACK_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{PACK_ENV}={raw!r}: must be 1 (pack, the default) or 0. Fix: unset it or set 0 or 1")
    return raw == "1"


def poll_interval(environ: dict[str, str] | None = None) -> float:
    """The reply poll interval from $FEDSHOP_GRID_POLL_INTERVAL, validated (default 0.1 s)."""
    return seconds_from_env(POLL_ENV, DEFAULT_POLL_INTERVAL, 0.01, 60.0,
                            f"unset it (default {DEFAULT_POLL_INTERVAL}) or set e.g. {POLL_ENV}=0.5", environ)


def after_reply_poll(environ: dict[str, str] | None = None) -> float:
    """Seconds to the next pull after a reply arrived, from $FEDSHOP_GRID_AFTER_REPLY_POLL (default 0.02), validated."""
    return seconds_from_env(AFTER_REPLY_ENV, DEFAULT_AFTER_REPLY, 0.005, 60.0,
                            f"unset it (default {DEFAULT_AFTER_REPLY}) or set it to {POLL_ENV}'s value for fixed "
                            "polling", environ)


def _timing(event: dict) -> None:
    record({"where": "serverapp", **event})


class PollingGrid(DelegatingGrid):
    """Delegates everything to ``inner``; `send_and_receive` pulls every ``interval`` s, sooner after a reply.

    After a reply the wait doubles from ``after_reply`` back to ``interval`` while nothing arrives.
    """

    def __init__(self, inner: Grid, interval: float, packed: bool = False, after_reply: float | None = None) -> None:
        super().__init__(inner)
        self.interval = interval
        self.after_reply = interval if after_reply is None else min(after_reply, interval)
        self.packed = packed

    def _push(self, messages: Iterable[Message]) -> set[str]:
        """Push, packing each message's content for the transport; the callers' messages are left as they were."""
        if not self.packed:
            return set(self.push_messages(messages))
        messages = list(messages)
        originals = [msg.content if msg.has_content() else None for msg in messages]
        for msg, content in zip(messages, originals, strict=True):
            if content is not None:
                msg.content = pack(content)
        try:
            return set(self.push_messages(messages))
        finally:
            for msg, content in zip(messages, originals, strict=True):
                if content is not None:
                    msg.content = content

    @staticmethod
    def _unpacked(msg: Message) -> Message:
        if msg.has_content():
            try:
                msg.content = unpack(msg.content)
            except PackError as err:  # left packed: the strategy finds no encoder arrays and leaves the shop out
                print(f"fedshop: reply from node {msg.metadata.src_node_id}: {err}", file=sys.stderr)
        return msg

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed."""
        messages = list(messages)
        if not messages:  # e.g. a fused round's evaluate phase (server.strategies): no SuperLink call at all
            return []
        pushed = time.time()
        pending = self._push(messages)
        _timing({"event": "push", "n": len(pending), "ids": sorted(pending), "start": pushed, "end": time.time()})
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        schedule = PollSchedule(self.after_reply, self.interval)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            got = list(self.pull_messages(pending))
            if self.packed:
                got = [self._unpacked(msg) for msg in got]
            for msg in got:
                _timing({"event": "reply", "type": msg.metadata.message_type, "round": msg.metadata.group_id,
                         "reply_to": msg.metadata.reply_to_message_id, "at": time.time(), "error": msg.has_error()})
            replies.extend(got)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
            if not pending:
                break
            if got:
                schedule.arrived()
            time.sleep(schedule.wait())
        _timing({"event": "received", "at": time.time()})  # the strategy's own work starts here
        return replies


def faster_polling(grid: Grid, environ: dict[str, str] | None = None) -> Grid:
    """Wrap the deployment engine's HttpGrid; other Grids (simulation polls every 0.1 s already) stay."""
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")  # loaded by the deployment runtime only
    if http_grid is None or not isinstance(grid, http_grid.HttpGrid):
        return grid
    pull_backoff.apply_from_env(pull_backoff.GRID, environ)
    return PollingGrid(grid, poll_interval(environ), packing_enabled(environ), after_reply_poll(environ))
