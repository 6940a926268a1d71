"""SuperLink requests per round and path, from a deployment run's timing log (`RequestLog` lines).

Rounds 2.. only (from the ServerApp's third push to its last "received"); mean seconds each request took
inside the SuperLink (queueing for its event loop and thread pool included).

    .venv/bin/python benchmarks/superlink_requests.py TIMING_LOG
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def requests_by_path(events: list[dict]) -> tuple[float, float, Counter[str], dict[str, float]]:
    """(seconds, rounds, requests by path, seconds inside the SuperLink by path) over rounds 2.. of a timing log."""
    server = [e for e in events if e.get("where") == "serverapp"]
    pushes = sorted(e["start"] for e in server if e.get("event") == "push")
    received = sorted(e["at"] for e in server if e.get("event") == "received")
    start, end, rounds = pushes[2], received[-1], (len(pushes) - 2) / 2
    count: Counter[str] = Counter()
    seconds: defaultdict[str, float] = defaultdict(float)
    for e in events:
        if e.get("where") == "superlink" and start <= e["at"] <= end:
            count[e["path"]] += 1
            seconds[e["path"]] += e["s"]
    return end - start, rounds, count, dict(seconds)


def main() -> None:
    """Print requests per round by path, with their mean duration."""
    events = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    span, rounds, count, seconds = requests_by_path(events)
    print(f"{span:.1f} s, {rounds:g} rounds; {sum(count.values()) / rounds:.1f} SuperLink requests a round")
    for path, n in count.most_common():
        print(f"{n / rounds:7.1f} a round  mean {1000 * seconds[path] / n:6.1f} ms  {path}")


if __name__ == "__main__":
    main()
