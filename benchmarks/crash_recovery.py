"""How long a SIGKILLed merchant is locked out of the SuperLink, by SuperNode heartbeat interval.

One TLS SuperLink with SuperNode auth and one merchant on loopback (the tiny shops of the e2e test).
For each interval: start the merchant, wait until it has sent a couple of heartbeats, kill -9 it,
then restart it at once with retries (`start_merchant(retry_for=...)`); the figure is the time from
the kill until the SuperLink accepts the restarted node again. Flower's default is 30 s; fedshop's
`merchant start --heartbeat-interval` goes down to Flower's minimum of 10 s. Prints a table and
writes benchmarks/results/crash_recovery.json.

    .venv/bin/python benchmarks/crash_recovery.py [--intervals 30,10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from shared.atomic import atomic_write_text
from simulations.deploy.loopback import loopback_federation, write_tiny_shops
from simulations.deploy.processes import stop_pid

ROOT = Path(__file__).resolve().parents[1]


def lockout_seconds(interval: float, repeats: int, settle: float) -> list[float]:
    """Seconds from kill -9 to re-admission, once per repeat, for one heartbeat interval."""
    out = []
    with tempfile.TemporaryDirectory(prefix="fedshop-crash-") as tmp:
        shops = write_tiny_shops(Path(tmp))[:1]
        with loopback_federation(Path(tmp), shops, heartbeat_interval=interval) as fed:
            name = shops[0]
            for _ in range(repeats):
                time.sleep(settle)  # let the node send a few heartbeats, as a running merchant has
                stop_pid(fed.merchants[name].pid, sig=signal.SIGKILL, timeout=5)
                killed = time.monotonic()
                fed.start(name, validate=False, retry_for=4 * interval)
                out.append(round(time.monotonic() - killed, 1))
    return out


def main() -> None:
    """Measure each interval, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="30,10", help="comma-separated heartbeat intervals (s)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settle", type=float, default=12.0, help="seconds the node runs before each kill")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    rows = []
    for interval in (float(x) for x in args.intervals.split(",")):
        seconds = lockout_seconds(interval, args.repeats, args.settle)
        rows.append({"heartbeat_interval_s": interval, "lockout_s": seconds,
                     "median_lockout_s": statistics.median(seconds), "bound_s": 2 * interval})
    result = {"rows": rows, "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
              "note": "lockout = kill -9 until the SuperLink accepts the restarted SuperNode; Flower holds a "
                      "silent node online for 2 heartbeat intervals, and restart retries add up to 5 s"}
    print(f"{'heartbeat interval':>19} | {'lockout after kill -9 (s)':>26} | {'bound 2 x interval':>18}")
    for row in rows:
        print(f"{row['heartbeat_interval_s']:>17g} s | {', '.join(f'{s:g}' for s in row['lockout_s']):>26} | "
              f"{row['bound_s']:>16g} s")
    print(f"load average {result['load_average'][0]} -> {result['load_average'][1]}")
    out = ROOT / "benchmarks" / "results" / "crash_recovery.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
