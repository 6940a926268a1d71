"""Where a federated run's extra CPU goes: worker start-up imports, world building, Ray's background.

Measures, each in fresh child processes (CPU from `getrusage(RUSAGE_CHILDREN)`, the whole tree):
- `python -c pass` (interpreter start) and `import client.client_app` (what every Ray actor or pool
  worker imports before it serves a shop: torch, flwr, fedshop), median of `--repeats`;
- building the scenario's world in a fresh process (what each actor paid before the world was shared);
- Ray: started as `run_federated` starts it (`simulations.ray_start.start_ray`), then `--idle` seconds
  with no work (raylet, GCS and helpers' background CPU, from /proc over this process's tree), then
  `ray.shutdown`.
It then sets these against the whole-run CPU difference of the last `federation_overhead.py --engine
ray` run (benchmarks/results/federation_overhead_ray.json) when that file exists.

    .venv/bin/python benchmarks/overhead_breakdown.py [--scenario default] [--repeats 3] [--idle 20]

Prints a table and writes benchmarks/results/overhead_breakdown.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_spec = importlib.util.spec_from_file_location("federation_overhead",
                                               Path(__file__).with_name("federation_overhead.py"))
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)


def child_cpu(code: str, env: dict[str, str] | None = None) -> float:
    """CPU seconds (user + system, whole process tree) of ``python -c code`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                             **(env or {})})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_cpu(code: str, repeats: int, env: dict[str, str] | None = None) -> float:
    """Median of ``repeats`` `child_cpu` measurements of ``code``."""
    return statistics.median(child_cpu(code, env) for _ in range(repeats))


def ray_background(idle_s: float) -> dict[str, float]:
    """CPU of starting Ray the way `run_federated` does, of ``idle_s`` idle seconds, and of shutting it down."""
    sys.path.insert(0, str(ROOT))
    from simulations.ray_auth import require_ray_token

    require_ray_token()  # before Ray is imported: it reads its auth mode at import
    import ray

    from simulations.federated import backend_config
    from simulations.ray_start import start_ray

    own0, tree0 = time.process_time(), overhead.tree_cpu()[0]
    start_ray({**backend_config()["init_args"], "logging_level": "ERROR"})  # as run_federated starts it
    tree1, count = overhead.tree_cpu()
    time.sleep(idle_s)
    tree2, _ = overhead.tree_cpu()

    @ray.remote(num_cpus=1)
    class Shop:
        def ready(self) -> bool:
            import client.client_app  # noqa: F401 - what a simulated shop's actor imports first

            return True

    actors = [Shop.remote() for _ in range(int(backend_config()["init_args"]["num_cpus"]))]
    ray.get([a.ready.remote() for a in actors])
    tree3, _ = overhead.tree_cpu()
    ray.shutdown()
    time.sleep(2)
    return {"start_cpu_s": tree1 - tree0, "idle_cpu_s": tree2 - tree1, "idle_s": idle_s,
            "idle_cpu_per_s": (tree2 - tree1) / idle_s, "processes": count,
            "actors": len(actors), "actors_start_and_import_cpu_s": tree3 - tree2,
            "driver_cpu_s": time.process_time() - own0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure each part, set it against the overhead benchmark's result, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds Ray runs idle")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as run_federated sets it
    load0 = os.getloadavg()[0]
    bare = median_cpu("pass", args.repeats)
    imports = median_cpu("import simulations, client.client_app", args.repeats)
    driver_ray = median_cpu("import simulations, client.client_app, flwr.simulation", args.repeats)
    world = median_cpu(f"import simulations, client.client_app; from shared.scenario import load_scenario; "
                       f"load_scenario({args.scenario!r}).shops()", args.repeats, {"FEDSHOP_WORLD_CACHE": "0"})
    ray_bg = ray_background(args.idle)
    actors = os.cpu_count() or 1
    res: dict[str, Any] = {"scenario": args.scenario, "cpus": os.cpu_count(), "load_start": load0,
                           "interpreter_cpu_s": bare, "worker_imports_cpu_s": imports,
                           "world_build_cpu_s": world - imports,
                           "driver_ray_flwr_sim_import_cpu_s": driver_ray - imports,
                           "ray": ray_bg, "actors": actors}
    res["expected_extra_cpu_s"] = {
        "actor_imports": actors * (imports - bare),
        "actors_start_and_imports_in_ray": ray_bg["actors_start_and_import_cpu_s"],
        "driver_imports_ray_and_flwr_simulation": driver_ray - imports,
        "ray_start": ray_bg["start_cpu_s"],
        "world_per_actor_without_sharing": actors * (world - imports)}
    ray_json = RESULTS / "federation_overhead_ray.json"
    if ray_json.exists():
        arms = json.loads(ray_json.read_text())["summary"]["arms"]
        fed, cen = arms["ray"], arms["central"]
        res["measured_ray_run"] = {"extra_whole_cpu_s": fed["whole_cpu_s"] - cen["whole_cpu_s"],
                                   "ray_whole_wall_s": fed["whole_wall_s"],
                                   "ray_background_over_run_s": ray_bg["idle_cpu_per_s"] * fed["whole_wall_s"]}
    res["load_end"] = os.getloadavg()[0]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"where the extra CPU goes (load {load0:.1f} -> {res['load_end']:.1f}, {actors} actors)")
    table.add_column("part")
    table.add_column("CPU s", justify="right")
    rows = [("python start (`pass`)", bare), ("worker imports (simulations, client_app), per process", imports),
            ("building the world in one process (now shared)", world - imports),
            ("driver: importing flwr.simulation (and Ray) on top", driver_ray - imports),
            ("ray.init (raylet, GCS, helpers)", ray_bg["start_cpu_s"]),
            (f"{ray_bg['actors']} Ray actors started, each importing client_app",
             ray_bg["actors_start_and_import_cpu_s"]),
            (f"Ray idle background per second ({ray_bg['processes']} processes)", ray_bg["idle_cpu_per_s"])]
    if "measured_ray_run" in res:
        m = res["measured_ray_run"]
        rows += [("Ray background over the measured ray run's wall", m["ray_background_over_run_s"]),
                 ("measured: ray whole-run CPU - central whole-run CPU", m["extra_whole_cpu_s"])]
    for name, value in rows:
        table.add_row(name, f"{value:.2f}")
    Console().print(table)
    sys.path.insert(0, str(ROOT))
    from shared.atomic import atomic_write_text

    out = RESULTS / "overhead_breakdown.json"
    atomic_write_text(out, json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
