"""Opt-in timing log shared by the ClientApp and the ServerApp: one JSON line per event.

Set ``FEDSHOP_TIMING_LOG=/path/file.jsonl`` in a SuperNode's or the SuperLink's environment to see
where a deployment round's time goes (`benchmarks/deployment_latency.py` reads it). Unset: nothing.
"""

from __future__ import annotations

import json
import os

TIMING_ENV = "FEDSHOP_TIMING_LOG"


def timing_enabled() -> bool:
    """Whether $FEDSHOP_TIMING_LOG names a file."""
    return bool(os.environ.get(TIMING_ENV))


def record(event: dict) -> None:
    """Append ``event`` as one JSON line to $FEDSHOP_TIMING_LOG (no-op when unset)."""
    path = os.environ.get(TIMING_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:  # one short append per line: safe across processes
            out.write(json.dumps(event) + "\n")
