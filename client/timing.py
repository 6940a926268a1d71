"""Opt-in timing log of ClientApp messages, to see where a deployment round's time goes.

Set ``FEDSHOP_TIMING_LOG=/path/file.jsonl`` in a SuperNode's environment and every message appends one
JSON line: when its `flwr-clientapp` process started, when the handler started and ended. Unset: nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

TIMING_ENV = "FEDSHOP_TIMING_LOG"
_IMPORTED_AT = time.time()  # client.client_app imports this after torch and Flower


def process_start_time() -> float | None:
    """Wall-clock start of this process from /proc (None where there is no /proc)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def record(event: dict) -> None:
    """Append ``event`` as one JSON line to $FEDSHOP_TIMING_LOG (no-op when unset)."""
    path = os.environ.get(TIMING_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:  # one short append per line: safe across processes
            out.write(json.dumps(event) + "\n")


def timing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: records process start, import end, handler start and end of this message."""
    if not os.environ.get(TIMING_ENV):
        return call_next(msg, context)
    start = time.time()
    reply = call_next(msg, context)
    record({"where": "clientapp", "pid": os.getpid(), "node": str(context.node_config.get("shop-index", "")),
            "type": msg.metadata.message_type, "round": msg.metadata.group_id,
            "msg_created": msg.metadata.created_at, "proc_start": process_start_time(),
            "imported": _IMPORTED_AT, "handler_start": start, "handler_end": time.time()})
    return reply
