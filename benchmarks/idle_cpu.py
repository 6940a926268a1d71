"""CPU an idle loopback deployment uses per minute: SuperLink (with its SuperExec), each SuperNode, each ClientApp.

A federation with no run still polls: each SuperNode asks the SuperLink for messages (Flower's 3 s loop), each
long-lived ClientApp asks its SuperNode for a task (`client.long_lived`: every 0.1 s, after a minute without
tasks every $FEDSHOP_CLIENTAPP_IDLE_POLL s), the coordinator's SuperExec asks the SuperLink for ServerApp
tasks. For each setup of `deployment_latency.py` (``--setups``, default flat-polls then after) this starts the
3-shop loopback federation, waits ``--settle`` s (past the ClientApp's minute), then reads each process's CPU
seconds (/proc, children included for the SuperLink) over ``--seconds`` s, scaled to 60 s. Setups run in
mirrored order (a, b, b, a) with ``--mirror``. Prints a table and writes benchmarks/results/idle_cpu.json.

    .venv/bin/python benchmarks/idle_cpu.py [--setups flat-polls,after] [--settle 65] [--seconds 60] [--mirror]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from shared.atomic import atomic_write_text
from simulations.deploy.loopback import loopback_federation, write_tiny_shops
from simulations.deploy.processes import read_record

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("deployment_latency", ROOT / "benchmarks" / "deployment_latency.py")
latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (waited-for children count in their parent)."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, IndexError, ValueError):
            continue
        stack += [int(c) for c in children]
    return total


def idle_cpu(setup: str, root: Path, shops: list[str], settle: float, seconds: float) -> dict[str, list[float]]:
    """CPU seconds per 60 s of each role of an idle federation started with ``setup``'s environment."""
    by_label = {label: rest for label, *rest in latency.SETUPS}
    _name, isolation, env = by_label[setup]
    fed_root = root / f"idle-{setup}-{time.monotonic_ns()}"
    for name in shops:
        (fed_root / name).mkdir(parents=True)
        (fed_root / name / "shop").symlink_to(root / name / "shop")
    with loopback_federation(fed_root, shops, env=dict(env), isolation=isolation) as fed:
        superlink = read_record(Path(fed.coordinator.home) / "superlink.json").pid
        roles = {"SuperLink (+ SuperExec)": [superlink], "SuperNode": [m.pid for m in fed.merchants.values()],
                 "ClientApp": [m.clientapp_pid for m in fed.merchants.values() if m.clientapp_pid]}
        time.sleep(settle)
        start = {pid: tree_cpu_seconds(pid) for pids in roles.values() for pid in pids}
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        used = {pid: tree_cpu_seconds(pid) - start[pid] for pid in start}
    return {role: [round(used[pid] * 60.0 / elapsed, 3) for pid in pids] for role, pids in roles.items()}


def main() -> None:
    """Measure each setup, print CPU s per 60 s per role (median over processes of a role), write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="flat-polls,after")
    parser.add_argument("--settle", type=float, default=65.0, help="seconds after start before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--mirror", action="store_true", help="run the setups, then again in reverse order")
    args = parser.parse_args()
    labels = [label for label in args.setups.split(",") if label]
    known = {label for label, *_ in latency.SETUPS}
    if not labels or any(label not in known for label in labels):
        parser.error(f"--setups {args.setups!r}: give some of {', '.join(sorted(known))}")
    order = labels + labels[::-1] if args.mirror else labels
    root = Path(tempfile.mkdtemp(prefix="fedshop-idle-"))
    shops = write_tiny_shops(root)
    results: dict[str, list[dict[str, list[float]]]] = {label: [] for label in labels}
    loads = []
    for label in order:
        load = os.getloadavg()
        results[label].append(idle_cpu(label, root, shops, args.settle, args.seconds))
        loads.append({"setup": label, "load_start": list(load), "load_end": list(os.getloadavg())})
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {results[label][-1]}, load {load[0]:.1f} -> "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    roles = list(results[labels[0]][0])
    medians = {label: {role: round(statistics.median(v for run in runs for v in run[role]), 3) for role in roles}
               for label, runs in results.items()}
    print(f"idle CPU s per 60 s (median over processes and runs; settle {args.settle:g} s, measured "
          f"{args.seconds:g} s)")
    print(f"{'process':<26} " + " ".join(f"{label:>12}" for label in labels))
    for role in roles:
        print(f"  {role:<24} " + " ".join(f"{medians[label][role]:12.3f}" for label in labels))
    out = ROOT / "benchmarks" / "results" / "idle_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"cpu_s_per_60s": results, "median": medians, "order": order, "loads": loads,
                                       "settle_s": args.settle, "measured_s": args.seconds, "cpus": os.cpu_count(),
                                       "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
