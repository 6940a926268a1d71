"""How a simulation scales in shops: seconds per round, peak memory and shops aggregated, N = 8 ... 1000.

Each N runs `run_federated` (the same ServerApp and ClientApp as `fedshop simulate`) on a synthetic
world with the small encoder below, in a fresh child process so the memory of one N never counts
towards the next. Worlds (``--world``):

* ``per-shop`` (default): about 1,000 impressions per shop on average (the 1,000-shop world of one
  million impressions, cut to N shops), so a round's work grows linearly in N and the per-shop round
  cost shows the engine's overhead: target ratio 1000 vs 32 at most 1.5.
* ``fixed-total``: about one million impressions whatever N (`simulations.pool_engine.scaled_world`).

Memory is sampled every 0.5 s over the child and all its descendants from /proc (psutil is not
installed): the sum of RSS (counts pages shared by the forked workers once per process) and the
sum of PSS (shared pages split between their users: the tree's real footprint).
Round 1 includes starting the engine and building every shop's tensors; "steady" is the mean of
the later rounds.

    .venv/bin/python benchmarks/scale.py [--shops 8,32,128,512,1000] [--engine pool] [--rounds 2]
        [--workers 2] [--world per-shop] [--out benchmarks/results/scale.json]

Prints a table and writes the JSON (one row per engine and N, with `uptime` before and after).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simulations.deploy.processes import descendants  # noqa: E402 - after the path insert
from simulations.pool_grid import default_workers  # noqa: E402
from simulations.privacy.eval_config import EVAL_OVERRIDES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scale.json"
SMALL_ENCODER = EVAL_OVERRIDES  # the small encoder of the privacy evaluations
PER_SHOP_IMPRESSIONS = 1_000


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    return [root, *descendants(root)]


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its live descendants (/proc/<pid>/stat)."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB from /proc/<pid>/smaps_rollup; (0, 0) once it has exited."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process tree until stopped; keeps the peaks."""

    def __init__(self, root: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop_event = threading.Event()

    def run(self) -> None:  # noqa: D102 - threading.Thread API
        while not self._stop_event.is_set():
            pids = tree_pids(self.root)
            sizes = [memory_kib(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop_event.set()
        self.join()


def world_overrides(n_shops: int, world: str) -> dict[str, Any]:
    """Scenario overrides of the benchmark world for ``n_shops`` shops."""
    from simulations.pool_engine import scaled_world

    total = PER_SHOP_IMPRESSIONS * n_shops if world == "per-shop" else 1_000_000
    return {**SMALL_ENCODER, **scaled_world(n_shops, total=max(total, n_shops * 200)),
            "data.synthetic.n_late_joiners": 0, "federation.min_shops": 2, "federation.warmup_rounds": 0}


def _one(n_shops: int, engine: str, rounds: int, workers: int, world: str, queue: Any) -> None:
    """Child process: one federation; puts its per-round figures on ``queue``."""
    from shared.scenario import load_scenario
    from simulations.console import configure_logging
    from simulations.federated import run_federated

    configure_logging(False)
    import torch

    torch.set_num_threads(1)
    scenario = load_scenario("default", world_overrides(n_shops, world))
    impressions = sum(len(s.interactions) for s in scenario.federation_shops())
    ends: list[float] = []
    cpu: list[float] = []
    rows: list[dict[str, Any]] = []

    def progress(report: Any, _total: int) -> None:
        ends.append(time.perf_counter())
        cpu.append(tree_cpu_seconds(os.getpid()))
        rows.append({"round": report.server_round, "trained": len(report.train),
                     "evaluated": len(report.evaluate), "left_out": len(report.left_out),
                     "left_out_by": left_out_by(report.left_out), "exempt_small": len(report.exempt),
                     "skipped": bool(report.skipped)})

    with tempfile.TemporaryDirectory(prefix="fedshop-scale-") as tmp:
        start, cpu_start = time.perf_counter(), tree_cpu_seconds(os.getpid())
        run_federated(scenario, Path(tmp) / "run", rounds=rounds, engine=engine, workers=workers,
                      progress=progress)
    for i, row in enumerate(rows):
        row["seconds"] = ends[i] - (ends[i - 1] if i else start)
        row["cpu_seconds"] = cpu[i] - (cpu[i - 1] if i else cpu_start)  # the tree's, while it was alive
    queue.put({"impressions": impressions, "rounds": rows})


def left_out_by(left_out: dict[str, str]) -> dict[str, int]:
    """Left-out shops counted by the screen or fault that left them out (from the reasons)."""
    kinds = {"direction": "round's median update", "leave-one-out": "other shops' mean", "turn": "sudden turn",
             "norm": "update norm"}
    out: dict[str, int] = {}
    for why in left_out.values():
        kind = next((k for k, text in kinds.items() if text in why), "other")
        out[kind] = out.get(kind, 0) + 1
    return out


def uptime() -> str:
    """`uptime` (load averages) as printed."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def measure(n_shops: int, engine: str, rounds: int, workers: int, world: str, limit: float) -> dict[str, Any]:
    """Run one N in a child process and sample its tree's memory; returns the JSON row."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    before = uptime()
    child = ctx.Process(target=_one, args=(n_shops, engine, rounds, workers, world, queue))
    start = time.perf_counter()
    child.start()
    sampler = TreeMemory(child.pid)
    sampler.start()
    result: dict[str, Any] = {}
    try:
        result = queue.get(timeout=limit)
    except Exception as exc:  # queue.Empty after the limit, or the child died
        result = {"error": f"{type(exc).__name__}: no result within {limit:.0f} s or the run failed"}
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()
    sampler.stop()
    row = {"engine": engine, "shops": n_shops, "workers": workers, "world": world, **result,
           "wall_seconds": time.perf_counter() - start, "exit_code": child.exitcode,
           "peak_rss_gib": sampler.peak_rss / 2**20, "peak_pss_gib": sampler.peak_pss / 2**20,
           "peak_processes": sampler.peak_procs, "uptime_before": before, "uptime_after": uptime()}
    later = [r["seconds"] for r in row.get("rounds", [])[1:]]
    row["round1_seconds"] = row["rounds"][0]["seconds"] if row.get("rounds") else None
    row["steady_round_seconds"] = sum(later) / len(later) if later else None
    row["per_shop_steady_ms"] = 1000 * row["steady_round_seconds"] / n_shops if later else None
    later_cpu = [r["cpu_seconds"] for r in row.get("rounds", [])[1:]]
    row["per_shop_steady_cpu_ms"] = 1000 * sum(later_cpu) / len(later_cpu) / n_shops if later_cpu else None
    row["all_aggregated_every_round"] = bool(row.get("rounds")) and all(
        r["trained"] == n_shops and not r["skipped"] for r in row["rounds"])
    return row


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, or "-" when it was not measured."""
    return format(value, spec) if value is not None else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per run."""
    print(f"{'engine':6} {'shops':>5} {'impr.':>8} {'round1 s':>9} {'steady s':>9} {'ms/shop':>8} "
          f"{'cpu ms/shop':>11} {'aggregated/round':>18} {'RSS GiB':>8} {'PSS GiB':>8}")
    for r in rows:
        agg = ",".join(str(x["trained"]) for x in r.get("rounds", [])) or r.get("error", "?")
        print(f"{r['engine']:6} {r['shops']:>5} {r.get('impressions', 0):>8} {fmt(r['round1_seconds'], '9.1f')} "
              f"{fmt(r['steady_round_seconds'], '9.1f')} {fmt(r['per_shop_steady_ms'], '8.1f')} "
              f"{fmt(r.get('per_shop_steady_cpu_ms'), '11.1f')} {agg:>18} "
              f"{r['peak_rss_gib']:8.2f} {r['peak_pss_gib']:8.2f}")


def main() -> None:
    """Parse flags, run each (engine, N), print and save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shops", default="8,32,128,512,1000", help="comma-separated shop counts")
    parser.add_argument("--engine", default="pool", help="comma-separated: pool, ray")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (>= 2 for a steady figure)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="pool workers")
    parser.add_argument("--world", choices=("per-shop", "fixed-total"), default="per-shop")
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds allowed per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for engine in args.engine.split(","):
        for n in (int(x) for x in args.shops.split(",")):
            rows.append(measure(n, engine, args.rounds, args.workers, args.world, args.limit))
            print_table(rows[-1:])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            from shared.atomic import atomic_write_text

            atomic_write_text(args.out, json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=2))
    print()
    print_table(rows)
    by = {(r["engine"], r["shops"]): r for r in rows}
    for engine in args.engine.split(","):
        small, big = by.get((engine, 32)), by.get((engine, 1000))
        if small and big and small["per_shop_steady_ms"] and big["per_shop_steady_ms"]:
            print(f"{engine}: per-shop steady round cost 1000 vs 32 = "
                  f"{big['per_shop_steady_ms'] / small['per_shop_steady_ms']:.2f} wall, "
                  f"{big['per_shop_steady_cpu_ms'] / small['per_shop_steady_cpu_ms']:.2f} CPU (target <= 1.5)")
    print(f"wrote {args.out}; {uptime()}")


if __name__ == "__main__":
    main()
