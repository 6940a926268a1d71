"""A Grid that pulls replies every 0.1 s instead of flwr 1.42's hard-coded 3 s in deployment.

`HttpGrid.send_and_receive` (the deployment engine's Grid) sleeps 3 s between pulls, so every
message round trip ends up to 3 s after the last reply reached the SuperLink. This wrapper keeps
Flower's push/pull calls and only changes the pause; `FEDSHOP_GRID_POLL_INTERVAL` (seconds,
0.01-60; "3" restores Flower's behaviour) sets it in the ServerApp's environment.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from server.delegating_grid import DelegatingGrid
from shared.timing_log import record

POLL_ENV = "FEDSHOP_GRID_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = 0.1  # what Flower's own InMemoryGrid (simulation) uses


def poll_interval(environ: dict[str, str] | None = None) -> float:
    """The reply poll interval from $FEDSHOP_GRID_POLL_INTERVAL, validated (default 0.1 s)."""
    raw = (os.environ if environ is None else environ).get(POLL_ENV)
    if raw is None or raw == "":
        return DEFAULT_POLL_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.01 <= value <= 60.0:
        raise ValueError(f"{POLL_ENV}={raw!r}: must be a number of seconds between 0.01 and 60. "
                         f"Fix: unset it (default {DEFAULT_POLL_INTERVAL}) or set e.g. {POLL_ENV}=0.5")
    return value


def _timing(event: dict) -> None:
    record({"where": "serverapp", **event})


class PollingGrid(DelegatingGrid):
    """Delegates everything to ``inner``; `send_and_receive` pulls every ``interval`` seconds."""

    def __init__(self, inner: Grid, interval: float) -> None:
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed."""
        pushed = time.time()
        pending = set(self.push_messages(messages))
        _timing({"event": "push", "n": len(pending), "start": pushed, "end": time.time()})
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            got = list(self.pull_messages(pending))
            for msg in got:
                _timing({"event": "reply", "type": msg.metadata.message_type, "round": msg.metadata.group_id,
                         "at": time.time(), "error": msg.has_error()})
            replies.extend(got)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
            if not pending:
                break
            time.sleep(self.interval)
        return replies


def faster_polling(grid: Grid, environ: dict[str, str] | None = None) -> Grid:
    """Wrap the deployment engine's HttpGrid; other Grids (simulation polls every 0.1 s already) stay."""
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")  # loaded by the deployment runtime only
    if http_grid is None or not isinstance(grid, http_grid.HttpGrid):
        return grid
    return PollingGrid(grid, poll_interval(environ))
