"""Round time in deployment (TLS SuperLink + one SuperNode per merchant on loopback) vs simulation.

Same three tiny synthetic shops, same scenario (`simulations.deploy.loopback.tiny_scenario`), same
rounds, in one run so the comparison is a ratio taken under the same machine load:
  * simulation: `simulations.federated.run_federated` (Ray; one long-lived actor per shop);
  * deployment, a process per message (before): `merchant start --isolation subprocess`, Flower's
    way: a fresh `flwr-clientapp` per message; the SuperNode's 1 s object-pull back-off and 3 s idle
    poll as in Flower (`FEDSHOP_PULL_BACKOFF=1`, `FEDSHOP_ACTIVE_POLL_WINDOW=0`);
  * deployment, long-lived ClientApp, Flower's SuperNode polling: `--isolation process` (the default),
    one `client.long_lived` process per merchant serves every message;
  * deployment, long-lived ClientApp + fedshop's SuperNode polling, one object per Array: as
    2026-12-05 morning (Flower moves every Array as its own object, one HTTPS request each per hop;
    the ServerApp and the long-lived ClientApp pull objects with Flower's 1 s back-off);
  * deployment, all of fedshop's settings (after): `merchant start`'s and `coordinator start`'s
    defaults: also the message's Arrays packed into one blob (`shared.wire_pack`) and 0.1 s object-pull
    back-offs in the ServerApp and the long-lived ClientApp.
All use fedshop's polling settings (ServerApp 0.1 s, task poll 0.2 s) and the tensor cache. The
simulation runs before and after the deployment rows (so it sees the load at both ends); its row is
the median over both.
Round time = gap between consecutive round checkpoints (`<run-dir>/checkpoints/round-NNNN.pt` mtimes),
so start-up is excluded. Each deployment run also writes a timing log (`FEDSHOP_TIMING_LOG`) from
which the per-message phases are taken (push -> clientapp process start -> handler start -> end ->
reply at the ServerApp). The fixed cost of one fresh `flwr-clientapp` process (flwr 1.42 starts one
per message) is measured step by step, in wall and CPU seconds; for the long-lived process the CPU it
spends per message (from /proc, start-up excluded) is measured too; the load average is recorded.
Prints a table and writes benchmarks/results/deployment_latency.json.

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
from shared.scenario import load_scenario
from simulations.deploy.coordinator import deployment_run_config, submit_run
from simulations.deploy.loopback import loopback_federation, tiny_scenario, write_tiny_shops

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "flwr.supernode.runtime.run_clientapp"  # what every flwr-clientapp process imports first
# One object per Array, Flower's 1 s back-off in the ServerApp's and the long-lived ClientApp's object pulls
UNPACKED = {"FEDSHOP_PACK_ARRAYS": "0", "FEDSHOP_GRID_PULL_BACKOFF": "1", "FEDSHOP_CLIENTAPP_PULL_BACKOFF": "1"}
# The SuperNode's object-pull back-off (1 s) and idle poll (3 s) as Flower has them
FLOWER_SUPERNODE = {"FEDSHOP_PULL_BACKOFF": "1", "FEDSHOP_ACTIVE_POLL_WINDOW": "0", **UNPACKED}
SIMULATION = "simulation (Ray, run_federated)"
BEFORE = "deployment, process per message"
LONG_LIVED = "deployment, long-lived ClientApp, Flower's SuperNode polling"
POLLING = "deployment, long-lived + fedshop's SuperNode polling, one object per Array (before)"
AFTER = "deployment, all fedshop settings: + packed Arrays, 0.1 s object back-offs (after)"
SETUPS = (("subprocess", BEFORE, "subprocess", FLOWER_SUPERNODE),
          ("long-lived", LONG_LIVED, "process", FLOWER_SUPERNODE),
          ("polling", POLLING, "process", UNPACKED),
          ("after", AFTER, "process", {}))  # {} = the defaults of `fedshop coordinator/merchant start`


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


def message_costs(shop_dir: Path, state_dir: Path, scenario: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Cumulative cost of what one fresh ClientApp process does before and inside its handler."""
    setup = ("import torch; torch.set_num_threads(1); "
             "from pathlib import Path; from shared.scenario import load_scenario; "
             f"sc = load_scenario({str(scenario)!r}); ")
    build = ("from shared.schema import load_shop_dir; from shared.features import build_shop_tensors; "
             f"t = build_shop_tensors(load_shop_dir({str(shop_dir)!r}), sc.features); ")
    cached = ("from client.local_state import cached_shop_tensors; "
              f"t = cached_shop_tensors(Path({str(shop_dir)!r}), Path({str(state_dir)!r}), sc.features); ")
    optim = "from shared.model import build_model; m = build_model(t, sc.model, sc.features); " \
            "o = torch.optim.Adam(m.parameters()); "
    metrics = "import sklearn.metrics; "  # shared.metrics imports it on first use
    steps = {
        "python only": "pass",
        "flwr ClientApp runtime": f"import {RUNTIME}",
        "+ torch": f"import {RUNTIME}, torch",
        "+ fedshop client_app (all module imports)": f"import {RUNTIME}, client.client_app",
        "+ parse and tensorise the shop (no cache)": f"import {RUNTIME}, client.client_app; {setup}{build}",
        "+ tensors from the on-disk cache instead": f"import {RUNTIME}, client.client_app; {setup}{cached}",
        "+ first torch.optim use (imports torch._dynamo)": f"import {RUNTIME}, client.client_app; {setup}{cached}"
                                                           f"{optim}",
        "+ first metrics (imports sklearn.metrics)": f"import {RUNTIME}, client.client_app; {setup}{cached}"
                                                     f"{optim}{metrics}",
    }
    subprocess.run([sys.executable, "-c", f"{setup}{cached}"], check=True, cwd=ROOT)  # fill the cache
    return {name: fresh_process_cost(code, repeats) for name, code in steps.items()}


def round_gaps(run_dir: Path) -> list[float]:
    """Seconds between consecutive round checkpoints (round 2 onwards)."""
    stamps = sorted(p.stat().st_mtime for p in (run_dir / "checkpoints").glob("round-*.pt"))
    return [round(b - a, 2) for a, b in zip(stamps, stamps[1:], strict=False)]


def simulation_rounds(scenario_path: Path, root: Path, rounds: int, label: str = "sim") -> list[float]:
    """Round times of the in-process simulation engine over the same shops."""
    from simulations.federated import run_federated

    run_dir = root / label
    run_federated(load_scenario(scenario_path), run_dir, rounds=rounds, extra_config={"keep-checkpoints": rounds})
    return round_gaps(run_dir)


def message_phases(timing_log: Path) -> dict[str, float]:
    """Median seconds of each phase of one message, from the timing log of a deployment run.

    The process-start phases only count processes that served a single message (a fresh process each).
    """
    events = [json.loads(line) for line in timing_log.read_text().splitlines() if line.strip()]
    pushes = sorted(e["start"] for e in events if e["where"] == "serverapp" and e["event"] == "push")
    replies = sorted(e["at"] for e in events if e["where"] == "serverapp" and e["event"] == "reply")
    phases: dict[str, list[float]] = {"push -> handler start": [], "push -> clientapp process start": [],
                                      "process start -> handler start": [],
                                      "handler (train)": [], "handler (evaluate)": [],
                                      "handler end -> reply at ServerApp": []}
    served = [e for e in events if e["where"] == "clientapp"]
    messages_per_pid = {pid: sum(e["pid"] == pid for e in served) for pid in {e["pid"] for e in served}}
    for e in served:
        pushed = max((p for p in pushes if p <= e["msg_created"] + 0.5), default=e["msg_created"])
        phases["push -> handler start"].append(e["handler_start"] - pushed)
        if e["proc_start"] and messages_per_pid[e["pid"]] == 1:
            phases["push -> clientapp process start"].append(e["proc_start"] - pushed)
            phases["process start -> handler start"].append(e["handler_start"] - e["proc_start"])
        phases["handler (train)" if e["type"] == "train" else "handler (evaluate)"].append(
            e["handler_end"] - e["handler_start"])
        later = [r for r in replies if r >= e["handler_end"]]
        if later:
            phases["handler end -> reply at ServerApp"].append(later[0] - e["handler_end"])
    return {name: round(statistics.median(v), 2) for name, v in phases.items() if v}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def deployment_rounds(scenario_path: Path, root: Path, shops: list[str], rounds: int, label: str,
                      isolation: str, env: dict[str, str]) -> tuple[list[float], dict[str, float]]:
    """Round times and per-message phases of a loopback deployment (TLS, SuperNode auth), same shops.

    With a long-lived ClientApp the phases also hold its CPU seconds per message (start-up excluded).
    """
    fed_root = root / f"fed-{label}"
    for name in shops:
        (fed_root / name).mkdir(parents=True)
        (fed_root / name / "shop").symlink_to(root / name / "shop")
    run_dir = fed_root / "run"
    run_dir.mkdir()
    timing = fed_root / "timing.jsonl"
    config = deployment_run_config(load_scenario(scenario_path), str(scenario_path), run_dir, rounds=rounds,
                                   extra={"keep-checkpoints": rounds})
    with loopback_federation(fed_root, shops, env={**env, "FEDSHOP_TIMING_LOG": str(timing)},
                             isolation=isolation) as fed:
        pids = [m.clientapp_pid for m in fed.merchants.values() if m.clientapp_pid]
        cpu_at_start = {pid: cpu_seconds(pid) for pid in pids}
        outcome = submit_run(fed.coordinator.home, config, out=io.StringIO(), timeout=3600)
        cpu_used = sum(cpu_seconds(pid) - cpu_at_start[pid] for pid in pids)
    if not outcome.ok:
        raise RuntimeError(f"benchmark run {label} failed: {outcome}")
    phases = message_phases(timing)
    if pids:
        served = sum(json.loads(line)["pid"] in pids for line in timing.read_text().splitlines()
                     if line.strip() and json.loads(line)["where"] == "clientapp")
        phases["long-lived ClientApp CPU s per message"] = round(cpu_used / max(served, 1), 3)
    return round_gaps(run_dir), phases


def main() -> None:
    """Run the measurements, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", default=",".join(label for label, *_ in SETUPS),
                        help="deployment rows to run, comma-separated (subprocess,long-lived,polling,after); "
                             "the process-per-message row takes the longest")
    args = parser.parse_args()
    chosen = [s for s in SETUPS if s[0] in args.setups.split(",")]
    if not chosen or AFTER not in [name for _, name, *_ in chosen]:
        parser.error(f"--setups {args.setups!r}: give some of {', '.join(s[0] for s in SETUPS)}, including after")
    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="fedshop-latency-"))
    shops = write_tiny_shops(root)
    scenario = root / "latency.toml"
    scenario.write_text(tiny_scenario([root / n / "shop" for n in shops], name="latency-tiny",
                                      rounds=args.rounds, round_timeout=300.0))
    costs = message_costs(root / shops[0] / "shop", root / "cost-state", scenario, args.repeats)
    sim_first = simulation_rounds(scenario, root, args.rounds, "sim-first")
    phases = {}
    deployed = {}
    for label, name, isolation, env in chosen:
        deployed[name], phases[name] = deployment_rounds(scenario, root, shops, args.rounds, label, isolation, env)
    sim_last = simulation_rounds(scenario, root, args.rounds, "sim-last")
    rounds = {SIMULATION: sim_first + sim_last, **deployed}
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {os.cpu_count()} CPUs")
    print(f"{'fixed cost per message: fresh process that':<52} {'wall s':>7} {'cpu s':>7}")
    for name, cost in costs.items():
        print(f"  {name:<50} {cost['wall_s']:7.2f} {cost['cpu_s']:7.2f}")
    print(f"{'3 shops, round time (from round 2)':<52} {'median':>7}  all")
    medians = {name: statistics.median(times) if times else float("nan") for name, times in rounds.items()}
    for name, times in rounds.items():
        print(f"  {name:<50} {medians[name]:7.2f}  {times}")
    sim, after = medians[SIMULATION], medians[AFTER]
    print(f"  simulation before the deployment rows {sim_first}, after them {sim_last}")
    ratios = {name: round(medians[name] / sim, 3) for name in deployed}
    print("  round / simulation: " + "; ".join(f"{name.split(',')[1].strip()} {r:.2f}" for name, r in ratios.items()))
    if POLLING in medians:
        print(f"  after / before (one object per Array) {after / medians[POLLING]:.2f}")
    print("per-message phases, median s (3 SuperNodes in parallel on this machine)")
    for name, values in phases.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    result = {"fixed_cost_per_message": costs, "round_times_s": rounds, "median_round_s": medians,
              "ratio_to_simulation": ratios, "ratio_after_simulation": round(after / sim, 3),
              "ratio_after_before": round(after / medians[POLLING], 3) if POLLING in medians else None,
              "simulation_first_s": sim_first, "simulation_last_s": sim_last,
              "message_phases_s": phases,
              "settings": {name: {"isolation": isolation, "env": env or "fedshop defaults"}
                           for _, name, isolation, env in chosen},
              "rounds": args.rounds, "shops": shops, "loadavg_start": list(load_start),
              "loadavg_end": list(load_end), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "deployment_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
