"""Round latency in deployment (TLS SuperLink + one SuperNode per merchant on loopback).

Measures (1) the fixed cost per message: a fresh Python that imports Flower's ClientApp runtime and
the app (Flower starts one such process per message), for the tiny test app and for fedshop's
ClientApp (torch); (2) round time of the tiny app with Flower's default SuperExec poll interval and
with FLWR_SUPEREXEC_TASK_POLL_INTERVAL lowered. Prints a table and writes benchmarks/results/*.json.

    .venv/bin/python benchmarks/deployment_latency.py [--rounds 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.atomic import atomic_write_text
from simulations.deploy.coordinator import submit_run
from simulations.deploy.loopback import loopback_federation

ROOT = Path(__file__).resolve().parents[1]
TINYAPP = ROOT / "tests" / "fixtures" / "tinyapp"
RUNTIME = "flwr.supernode.runtime.run_clientapp"


def import_cost(module: str, repeats: int, path: Path | None = None) -> float | None:
    """Median seconds for a fresh interpreter to import Flower's ClientApp runtime plus ``module``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(path or ""), str(ROOT)])))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", f"import {RUNTIME}, {module}"], env=env, capture_output=True)
        if proc.returncode != 0:
            return None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RoundClock(io.StringIO):
    """Collects the arrival time of each `[ROUND k/N]` line of the streamed run log."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []

    def write(self, text: str) -> int:
        if "[ROUND " in text or "Strategy execution finished" in text:
            self.marks.append(time.monotonic())
        return super().write(text)


def deployment_round_times(rounds: int, env: dict[str, str] | None) -> list[float]:
    """Seconds per round of the tiny app over 3 loopback merchants."""
    root = Path(tempfile.mkdtemp(prefix="fedshop-latency-"))
    shops = ["shop-a", "shop-b", "shop-c"]
    for name in shops:
        (root / name / "shop").mkdir(parents=True)
        (root / name / "shop" / "interactions.csv").write_text(
            "user_id,item_id,timestamp,event\nu1,i1,1700000000,click\nu2,i1,1700000060,impression\n")
    with loopback_federation(root, shops, env=env) as fed:
        clock = _RoundClock()
        outcome = submit_run(fed.coordinator.home, {"min-nodes": 3, "num-server-rounds": rounds,
                                                     "run-dir": str(root)}, app=TINYAPP, out=clock)
        if not outcome.ok:
            raise RuntimeError(f"benchmark run failed: {outcome}")
    return [round(b - a, 2) for a, b in zip(clock.marks, clock.marks[1:], strict=False)]


def main() -> None:
    """Run the measurements, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    costs = {
        "flwr runtime only": import_cost("flwr.clientapp", args.repeats),
        "runtime + tinyapp": import_cost("tinyapp.client_app", args.repeats, TINYAPP),
        "runtime + torch": import_cost("torch", args.repeats),
        "runtime + fedshop client_app": import_cost("client.client_app", args.repeats),
    }
    variants = {"default (poll 1.0 s)": None, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1": {
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}}
    rounds = {name: deployment_round_times(args.rounds, env) for name, env in variants.items()}
    print(f"load average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'fixed cost per message (fresh process)':<45} {'seconds':>8}")
    for name, value in costs.items():
        print(f"  {name:<43} {'n/a' if value is None else f'{value:8.2f}'}")
    print(f"{'tiny app, 3 merchants, round time':<45} {'median':>8}  all")
    for name, times in rounds.items():
        print(f"  {name:<43} {statistics.median(times):8.2f}  {times}")
    result = {"import_cost_s": costs, "round_times_s": rounds, "rounds": args.rounds,
              "loadavg": os.getloadavg()[0], "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "deployment_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
