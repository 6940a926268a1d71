"""ClientApp side of the opt-in timing log (`shared.timing_log`): one line per message.

With ``FEDSHOP_TIMING_LOG`` set in a SuperNode's environment every message records when its
`flwr-clientapp` process started, when imports ended, and when the handler started and ended.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.timing_log import record, timing_enabled

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


def timing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: records process start, import end, handler start and end of this message."""
    if not timing_enabled():
        return call_next(msg, context)
    start = time.time()
    reply = call_next(msg, context)
    record({"where": "clientapp", "pid": os.getpid(), "node": str(context.node_config.get("shop-index", "")),
            "type": msg.metadata.message_type, "round": msg.metadata.group_id, "msg_id": msg.metadata.message_id,
            "msg_created": msg.metadata.created_at, "proc_start": process_start_time(),
            "imported": _IMPORTED_AT, "handler_start": start, "handler_end": time.time()})
    return reply
