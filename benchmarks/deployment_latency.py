"""Round time in deployment (TLS SuperLink + one SuperNode per merchant on loopback) vs simulation.

Same three tiny synthetic shops, same scenario, same rounds, for:
  * simulation: `simulations.federated.run_federated` (Ray; one long-lived actor per shop);
  * deployment, Flower's defaults;
  * deployment with FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 (how often a SuperExec looks for new tasks).
Round time = gap between consecutive round checkpoints (`<run-dir>/checkpoints/round-NNNN.pt` mtimes),
so start-up is excluded. Also measures the fixed cost per message in deployment: flwr 1.42 starts a
fresh `flwr-clientapp` process for every message (`run_clientapp` pulls one task and exits; warm
executor pools exist only for the Kubernetes executor and agent/model/connector tasks), which imports
Flower, torch and fedshop and rebuilds the shop's tensors. CPU seconds are reported beside wall
seconds because the machine may be loaded (load average recorded). Prints a table and writes
benchmarks/results/deployment_latency.json.

    .venv/bin/python benchmarks/deployment_latency.py [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.atomic import atomic_write_text
from shared.datasets.synthetic import WorldConfig, generate_world, write_world
from shared.scenario import load_scenario
from simulations.deploy.coordinator import deployment_run_config, submit_run
from simulations.deploy.loopback import loopback_federation

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "flwr.supernode.runtime.run_clientapp"  # what every flwr-clientapp process imports first
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SCENARIO = """
name = "latency-tiny"
seed = 0
[data]
source = "shop-dirs"
paths = {paths}
[transfer]
late_joiners = []  # so a merchant's ClientApp never loads the other shops' directories
[features]
hash_buckets = 512
product_buckets = 512
history_len = 5
[model]
embed_dim = 8
expert_dim = 16
tower_dim = 8
n_experts = 2
[train]
batch_size = 256
[federation]
min_shops = 2
round_timeout = 300.0
"""


def fresh_process_cost(code: str, repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of a fresh interpreter running ``code`` (as a new ClientApp process does)."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"wall_s": round(statistics.median(walls), 2), "cpu_s": round(statistics.median(cpus), 2)}


def make_shops(root: Path) -> tuple[list[str], Path]:
    """Three tiny synthetic shops as merchant folders ``root/<shop>/shop`` and a scenario naming them."""
    world = generate_world(WorldConfig(n_shops=3, n_late_joiners=0, max_impressions=2500, min_impressions=800,
                                       n_small_shops=1))
    write_world(world, root / "world")
    names = [s.name for s in world.shops]
    for name in names:
        (root / name).mkdir()
        (root / "world" / name).rename(root / name / "shop")
    scenario = root / "latency.toml"
    scenario.write_text(SCENARIO.format(paths=json.dumps([str(root / n / "shop") for n in names])))
    return names, scenario


def round_gaps(run_dir: Path) -> list[float]:
    """Seconds between consecutive round checkpoints (round 2 onwards)."""
    stamps = sorted(p.stat().st_mtime for p in (run_dir / "checkpoints").glob("round-*.pt"))
    return [round(b - a, 2) for a, b in zip(stamps, stamps[1:], strict=False)]


def simulation_rounds(scenario_path: Path, root: Path, rounds: int) -> list[float]:
    """Round times of the in-process simulation engine over the same shops."""
    from simulations.federated import run_federated

    run_dir = root / "sim"
    run_federated(load_scenario(scenario_path), run_dir, rounds=rounds, extra_config={"keep-checkpoints": rounds})
    return round_gaps(run_dir)


def deployment_rounds(scenario_path: Path, root: Path, shops: list[str], rounds: int, label: str,
                      env: dict[str, str] | None) -> list[float]:
    """Round times of a loopback deployment (TLS, SuperNode auth) over the same shops."""
    fed_root = root / f"fed-{label}"
    for name in shops:
        (fed_root / name).mkdir(parents=True)
        (fed_root / name / "shop").symlink_to(root / name / "shop")
    run_dir = fed_root / "run"
    run_dir.mkdir()
    config = deployment_run_config(load_scenario(scenario_path), str(scenario_path), run_dir, rounds=rounds,
                                   extra={"keep-checkpoints": rounds})
    with loopback_federation(fed_root, shops, env=env) as fed:
        outcome = submit_run(fed.coordinator.home, config, out=io.StringIO(), timeout=3600)
    if not outcome.ok:
        raise RuntimeError(f"benchmark run {label} failed: {outcome}")
    return round_gaps(run_dir)


def main() -> None:
    """Run the measurements, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="fedshop-latency-"))
    shops, scenario = make_shops(root)
    largest = str(root / shops[0] / "shop")
    build = ("from shared.schema import load_shop_dir; from shared.features import build_shop_tensors; "
             "from shared.scenario import load_scenario; "
             f"build_shop_tensors(load_shop_dir({largest!r}), load_scenario({str(scenario)!r}).features)")
    costs = {
        "python only": fresh_process_cost("pass", args.repeats),
        "flwr ClientApp runtime": fresh_process_cost(f"import {RUNTIME}", args.repeats),
        "+ torch": fresh_process_cost(f"import {RUNTIME}, torch", args.repeats),
        "+ sklearn.metrics (shared.metrics imports it)": fresh_process_cost(
            f"import {RUNTIME}, torch, sklearn.metrics", args.repeats),
        "+ fedshop client_app (all imports)": fresh_process_cost(f"import {RUNTIME}, client.client_app",
                                                                  args.repeats),
        "+ load and tensorise the shop (largest)": fresh_process_cost(
            f"import {RUNTIME}, client.client_app; {build}", args.repeats),
    }
    rounds = {"simulation (Ray, run_federated)": simulation_rounds(scenario, root, args.rounds)}
    rounds["deployment, default (SuperExec poll 1.0 s)"] = deployment_rounds(scenario, root, shops, args.rounds,
                                                                             "default", None)
    rounds[f"deployment, {POLL_ENV}=0.1"] = deployment_rounds(scenario, root, shops, args.rounds, "poll",
                                                             {POLL_ENV: "0.1"})
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {os.cpu_count()} CPUs")
    print(f"{'fixed cost per message: fresh process that':<50} {'wall s':>7} {'cpu s':>7}")
    for name, cost in costs.items():
        print(f"  {name:<48} {cost['wall_s']:7.2f} {cost['cpu_s']:7.2f}")
    print(f"{'3 shops, round time (from round 2)':<50} {'median':>7}  all")
    for name, times in rounds.items():
        print(f"  {name:<48} {statistics.median(times) if times else float('nan'):7.2f}  {times}")
    result = {"fixed_cost_per_message": costs, "round_times_s": rounds, "rounds": args.rounds, "shops": shops,
              "loadavg_start": list(load_start), "loadavg_end": list(load_end), "cpus": os.cpu_count(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "deployment_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
