"""Round time in deployment (TLS SuperLink + one SuperNode per merchant on loopback) vs simulation.

Same three tiny synthetic shops, same scenario (`simulations.deploy.loopback.tiny_scenario`), same
rounds, in one run so the comparisons are ratios taken under the same machine load. Rows (``--setups``):
  * simulation: `simulations.federated.run_federated` (Ray; one long-lived actor per shop), always;
  * flower-waits (before): fedshop's defaults except the waits `shared.pull_backoff` sets,
    which get Flower's values: object-pull back-offs 1 s doubling to 10 s in SuperNode, ServerApp and
    long-lived ClientApp, and the SuperNode's 0.5 s reply wait (`pull_backoff.FLOWERS_OWN`);
  * after (default): `merchant start`'s and `coordinator start`'s defaults (0.02 -> 0.25 s,
    ClientApp 0.01 -> 0.05 s, reply wait 0.01 s; SuperNode active poll 0.02 s after a message doubling to
    0.2 s, ServerApp re-pull 0.02 s after a reply);
  * after-unfused: as after, but `federation.fuse_evaluate = false` (two messages per shop per round; only
    differs from after when shops serve their own encoder (``--personal-mix``, 20000 by default as in the
    default scenarios));
  * flat-polls: the defaults but the fixed polls before 2026-12-06: SuperNode active poll every 0.2 s,
    ServerApp reply poll every 0.1 s, the long-lived ClientApp's idle poll never relaxed;
  * sqlite-state: the defaults but the SuperLink's state in SQLite (`coordinator start --state-db`, the
    default before 2026-12-06 evening; "after" keeps it in memory);
  * poll-0.05: the defaults but the SuperNode's active poll starting at 0.05 s (FEDSHOP_ACTIVE_POLL=0.05,0.2);
  * older comparisons, on request: subprocess (a fresh `flwr-clientapp` per message and all of Flower's
    waits), long-lived (long-lived ClientApp, Flower's SuperNode polling), polling (2026-12-05 morning:
    one object per Array, Flower's back-offs).
One cycle runs simulation, the rows, then the rows in reverse and the simulation again (mirrored order,
so a load trend hits before and after alike); ``--cycles N`` repeats it.
Round time = gap between consecutive round checkpoints (`<run-dir>/checkpoints/round-NNNN.pt` mtimes),
so start-up is excluded. Each deployment run also writes a timing log (`shared.timing_log`) from which
each message's stages are taken: pull (the ServerApp starts pushing -> the long-lived ClientApp has the
message's inputs; i.e. ServerApp push, SuperNode pull, ClientApp pull), run (the ClientApp's handler),
push (handler end -> the reply unpacked at the ServerApp; ClientApp push, SuperNode reply wait and push,
ServerApp pull) and aggregate (the ServerApp's own work between one set of replies and its next push).
``--process-costs`` also measures the fixed cost of one fresh `flwr-clientapp` process step by step.
Each deployment run also reports the SuperLink process's CPU seconds per round (/proc, sampled from the
first round checkpoint to the last) and its requests per round (the timing log's `RequestLog` lines, rounds
2.., `superlink_requests.py`); both with the request log on, as every run here has it.
Each deployment row also gets `deployment_timeline.py`'s per-message attribution (ServerApp push, SuperLink,
SuperNode pull, ClientApp, reply path), printed as one table with a column per row.
Prints tables and writes benchmarks/results/deployment_latency.json.

    .venv/bin/python benchmarks/deployment_latency.py [--rounds 4] [--cycles 1] [--setups sqlite-state,poll-0.05,after]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from shared.atomic import atomic_write_text
from shared.pull_backoff import FLOWERS_OWN
from shared.scenario import load_scenario
from simulations.deploy.coordinator import deployment_run_config, submit_run
from simulations.deploy.loopback import fresh_federation_root, loopback_federation, tiny_scenario, write_tiny_shops
from simulations.deploy.processes import read_record

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "flwr.supernode.runtime.run_clientapp"  # what every flwr-clientapp process imports first
# One object per Array, Flower's 1 s back-off in the ServerApp's and the long-lived ClientApp's object pulls
UNPACKED = {"FEDSHOP_PACK_ARRAYS": "0", "FEDSHOP_GRID_PULL_BACKOFF": "1", "FEDSHOP_CLIENTAPP_PULL_BACKOFF": "1",
            "FEDSHOP_REPLY_POLL": "0.5"}
# The SuperNode's object-pull back-off (1 s) and idle poll (3 s) as Flower has them
FLOWER_SUPERNODE = {"FEDSHOP_PULL_BACKOFF": "1", "FEDSHOP_ACTIVE_POLL_WINDOW": "0", **UNPACKED}
SIMULATION = "simulation (Ray, run_federated)"
BEFORE = "deployment, process per message"
LONG_LIVED = "deployment, long-lived ClientApp, Flower's SuperNode polling"
POLLING = "deployment, long-lived + fedshop's SuperNode polling, one object per Array"
FLOWER_WAITS = "deployment, fedshop defaults but Flower's back-offs and reply wait (before)"
AFTER = "deployment, all fedshop defaults: in-memory SuperLink state, 0.02-0.25 s back-offs (after)"
AFTER_UNFUSED = "deployment, as after but fuse-evaluate = false: a separate evaluate message (after-unfused)"
FLAT_POLLS = "deployment, fedshop defaults but fixed polls: SuperNode 0.2 s, ServerApp 0.1 s (flat-polls)"
FLAT = {"FEDSHOP_ACTIVE_POLL": "0.2", "FEDSHOP_GRID_AFTER_REPLY_POLL": "0.1", "FEDSHOP_CLIENTAPP_IDLE_POLL": "0.1"}
SQLITE = "deployment, fedshop defaults but the SuperLink's state in SQLite (--state-db)"
POLL_005 = "deployment, fedshop defaults but SuperNode active poll 0.05 s doubling to 0.2 s"
SUPERLINK_KEYS = ("SuperLink CPU s per round", "SuperLink requests per round", "SuperNode pull-messages per round")
STATE_DB_SETUPS = {"sqlite-state"}  # rows whose coordinator starts with state_db=True
SETUPS = (("subprocess", BEFORE, "subprocess", FLOWER_SUPERNODE),
          ("long-lived", LONG_LIVED, "process", FLOWER_SUPERNODE),
          ("polling", POLLING, "process", UNPACKED),
          ("flower-waits", FLOWER_WAITS, "process", dict(FLOWERS_OWN)),
          ("flat-polls", FLAT_POLLS, "process", FLAT),
          ("sqlite-state", SQLITE, "process", {}),
          ("poll-0.05", POLL_005, "process", {"FEDSHOP_ACTIVE_POLL": "0.05,0.2"}),
          ("after", AFTER, "process", {}),  # {} = the defaults of `fedshop coordinator/merchant start`
          ("after-unfused", AFTER_UNFUSED, "process", {}))  # after, with `fuse-evaluate = false`
# Run-config keys a row adds to the run (the others: the scenario's settings).
RUN_CONFIG: dict[str, dict[str, object]] = {"after-unfused": {"fuse-evaluate": False}}
STAGES = ("pull", "run", "push", "aggregate")
_spec = importlib.util.spec_from_file_location("deployment_timeline", ROOT / "benchmarks" / "deployment_timeline.py")
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)
_spec = importlib.util.spec_from_file_location("superlink_requests", ROOT / "benchmarks" / "superlink_requests.py")
superlink_requests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(superlink_requests)


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


def simulation_rounds(scenario_path: Path, root: Path, rounds: int, label: str = "sim",
                      extra: dict[str, object] | None = None) -> list[float]:
    """Round times of the in-process simulation engine over the same shops."""
    from simulations.federated import run_federated

    run_dir = root / label
    # Ray, as every figure of this benchmark so far (the default engine, auto, would run the pool)
    run_federated(load_scenario(scenario_path), run_dir, rounds=rounds, engine="ray",
                  extra_config={"keep-checkpoints": rounds, **(extra or {})})
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


def message_stages(timing_log: Path) -> dict[str, list[float]]:
    """Seconds of each stage (pull, run, push, aggregate) of every message of a deployment run's timing log.

    A message is matched to its reply by message ID and to the long-lived ClientApp's "inputs pulled" line
    by process and time; aggregate is the ServerApp's time from "all replies received" to its next push.
    """
    events = [json.loads(line) for line in timing_log.read_text().splitlines() if line.strip()]
    server = [e for e in events if e["where"] == "serverapp"]
    pushes = sorted(e["start"] for e in server if e["event"] == "push")
    reply_at = {e["reply_to"]: e["at"] for e in server if e["event"] == "reply" and "reply_to" in e}
    received = sorted(e["at"] for e in server if e["event"] == "received")
    inputs = [e for e in events if e["where"] == "long_lived" and e["event"] == "inputs pulled"]
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for e in (e for e in events if e["where"] == "clientapp"):
        pushed = max((p for p in pushes if p <= e["msg_created"] + 0.5), default=None)
        pulled = max((i["at"] for i in inputs if i["pid"] == e["pid"] and i["at"] <= e["handler_start"]),
                     default=None)
        if pushed is not None and pulled is not None and pulled >= pushed:
            stages["pull"].append(pulled - pushed)
        stages["run"].append(e["handler_end"] - e["handler_start"])
        if e.get("msg_id") in reply_at:
            stages["push"].append(reply_at[e["msg_id"]] - e["handler_end"])
    for done in received:
        following = [p for p in pushes if p >= done]
        if following:
            stages["aggregate"].append(following[0] - done)
    return {name: [round(v, 4) for v in values] for name, values in stages.items()}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SuperLinkCpu:
    """Samples the SuperLink's CPU seconds whenever another round checkpoint appears (a thread, every 0.1 s)."""

    def __init__(self, pid: int, run_dir: Path) -> None:
        self.pid, self.run_dir = pid, run_dir
        self.at_checkpoint: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            done = len(list((self.run_dir / "checkpoints").glob("round-*.pt")))
            if done and done not in self.at_checkpoint:
                try:
                    self.at_checkpoint[done] = cpu_seconds(self.pid)
                except OSError:
                    return

    def per_round(self) -> float | None:
        """CPU s per round from the first checkpoint to the last (rounds 2..), None with fewer than two."""
        self._stop.set()
        self._thread.join()
        if len(self.at_checkpoint) < 2:
            return None
        first, last = min(self.at_checkpoint), max(self.at_checkpoint)
        return round((self.at_checkpoint[last] - self.at_checkpoint[first]) / (last - first), 3)


def deployment_rounds(scenario_path: Path, root: Path, shops: list[str], rounds: int, label: str,
                      isolation: str, env: dict[str, str], extra: dict[str, object] | None = None, *,
                      state_db: bool = False,
                      ) -> tuple[list[float], dict[str, float], dict[str, list[float]]]:
    """Round times and per-message phases of a loopback deployment (TLS, SuperNode auth), same shops.

    With a long-lived ClientApp the phases also hold its CPU seconds per message (start-up excluded);
    they also hold the SuperLink's CPU seconds and requests per round. ``state_db``: SQLite SuperLink state.
    The run's timing log is ``root/fed-<label>/timing.jsonl`` (`deployment_timeline.py` reads it).
    """
    fed_root, run_dir = fresh_federation_root(root, f"fed-{label}", shops)
    timing = fed_root / "timing.jsonl"
    scenario_ref = str(Path(scenario_path).resolve())  # the path each merchant pins (--allow-scenario-path resolves)
    config = deployment_run_config(load_scenario(scenario_path), scenario_ref, run_dir, rounds=rounds,
                                   extra={"keep-checkpoints": rounds, **(extra or {})})
    with loopback_federation(fed_root, shops, env={**env, "FEDSHOP_TIMING_LOG": str(timing)},
                             isolation=isolation, state_db=state_db, scenario=scenario_path) as fed:
        pids = [m.clientapp_pid for m in fed.merchants.values() if m.clientapp_pid]
        cpu_at_start = {pid: cpu_seconds(pid) for pid in pids}
        superlink = SuperLinkCpu(read_record(Path(fed.coordinator.home) / "superlink.json").pid, run_dir)
        outcome = submit_run(fed.coordinator.home, config, out=io.StringIO(), timeout=3600)
        superlink_cpu = superlink.per_round()
        cpu_used = sum(cpu_seconds(pid) - cpu_at_start[pid] for pid in pids)
    if not outcome.ok:
        raise RuntimeError(f"benchmark run {label} failed: {outcome}")
    phases = message_phases(timing)
    if pids:
        served = sum(json.loads(line)["pid"] in pids for line in timing.read_text().splitlines()
                     if line.strip() and json.loads(line)["where"] == "clientapp")
        phases["long-lived ClientApp CPU s per message"] = round(cpu_used / max(served, 1), 3)
    if superlink_cpu is not None:
        phases["SuperLink CPU s per round"] = superlink_cpu
    _span, counted, requests, _seconds = superlink_requests.requests_by_path(timeline.read_events(timing))
    phases["SuperLink requests per round"] = round(sum(requests.values()) / counted, 1)
    phases["SuperNode pull-messages per round"] = round(requests.get("/v1/fleet/pull-messages", 0) / counted, 1)
    return round_gaps(run_dir), phases, message_stages(timing)


def main() -> None:
    """Run the measurements in mirrored order, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=1,
                        help="times to run simulation, the rows, the rows reversed and the simulation again")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each --process-costs step")
    parser.add_argument("--process-costs", action="store_true",
                        help="also measure the fixed cost of a fresh flwr-clientapp process, step by step")
    parser.add_argument("--personal-mix", type=float, default=20000.0,
                        help="federation.personal_mix of the tiny scenario (20000, the default scenarios' value: shops "
                             "evaluate their own encoder and fuse-evaluate applies; 0 = off, as runs before "
                             "2026-12-06 evening measured)")
    parser.add_argument("--setups", default="sqlite-state,after",
                        help="deployment rows, comma-separated, in the order of the first half of a cycle "
                             f"(some of {', '.join(s[0] for s in SETUPS)}; must include after)")
    args = parser.parse_args()
    by_label = {label: rest for label, *rest in SETUPS}
    labels = [label for label in args.setups.split(",") if label]
    if not labels or "after" not in labels or any(label not in by_label for label in labels):
        parser.error(f"--setups {args.setups!r}: give some of {', '.join(by_label)}, including after")
    if args.cycles < 1 or args.rounds < 3:
        parser.error("--cycles must be at least 1 and --rounds at least 3 (round times are taken from round 2)")
    before_label = next((label for label in ("after-unfused", "sqlite-state", "flat-polls", "flower-waits", "polling",
                                             "long-lived",
                                             "subprocess")
                         if label in labels), None)
    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="fedshop-latency-"))
    shops = write_tiny_shops(root)
    scenario = root / "latency.toml"
    scenario.write_text(tiny_scenario([root / n / "shop" for n in shops], name="latency-tiny",
                                      rounds=args.rounds, round_timeout=300.0)
                        + (f"personal_mix = {args.personal_mix}\n" if args.personal_mix else ""))  # [federation] last
    costs = (message_costs(root / shops[0] / "shop", root / "cost-state", scenario, args.repeats)
             if args.process_costs else {})
    names = {label: by_label[label][0] for label in labels}
    rounds: dict[str, list[float]] = {SIMULATION: [], **{names[label]: [] for label in labels}}
    run_medians: dict[str, list[float]] = {name: [] for name in rounds}
    stages: dict[str, dict[str, list[float]]] = {names[label]: {st: [] for st in STAGES} for label in labels}
    phases: dict[str, list[dict[str, float]]] = {names[label]: [] for label in labels}
    timelines: dict[str, list[dict]] = {names[label]: [] for label in labels}
    aggregates: dict[str, list[float]] = {names[label]: [] for label in labels}
    order: list[str] = []
    for cycle in range(args.cycles):
        half = ["simulation", *labels]
        for step, label in enumerate(half + half[::-1]):
            tag = f"{label}-c{cycle}-{step}"
            order.append(label)
            if label == "simulation":
                times = simulation_rounds(scenario, root, args.rounds, tag)
                name = SIMULATION
            else:
                name, isolation, env = by_label[label]
                times, run_phases, run_stages = deployment_rounds(scenario, root, shops, args.rounds, tag,
                                                                  isolation, env, RUN_CONFIG.get(label),
                                                                  state_db=label in STATE_DB_SETUPS)
                phases[name].append(run_phases)
                events = timeline.read_events(root / f"fed-{tag}" / "timing.jsonl")
                timelines[name] += timeline.message_timelines(events)
                aggregates[name] += timeline.aggregate_gaps(events)
                for st in STAGES:
                    stages[name][st] += run_stages[st]
            rounds[name] += times
            run_medians[name].append(_median(times))
            extra = "" if label == "simulation" else (
                f", SuperLink {run_phases.get('SuperLink CPU s per round')} CPU s and "
                f"{run_phases['SuperLink requests per round']} requests a round")
            print(f"[{time.strftime('%H:%M:%S')}] {tag}: rounds {times}{extra}, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    load_end = os.getloadavg()
    medians = {name: _median(times) for name, times in rounds.items()}
    sim, after = medians[SIMULATION], medians[AFTER]
    before = medians[by_label[before_label][0]] if before_label else None
    stage_medians = {name: {st: _median(v) for st, v in per.items()} for name, per in stages.items()}
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {os.cpu_count()} CPUs; "
          f"order {' '.join(order)}")
    if costs:
        print(f"{'fixed cost per message: fresh process that':<52} {'wall s':>7} {'cpu s':>7}")
        for name, cost in costs.items():
            print(f"  {name:<50} {cost['wall_s']:7.2f} {cost['cpu_s']:7.2f}")
    header = f"{'3 shops, round time s (from round 2)':<84} {'median':>7} {'x sim':>6}  " + \
        "  ".join(f"{st:>9}" for st in STAGES) + "  per-run medians"
    print(header)
    print(f"{'':<84} {'':>7} {'':>6}  " + "  ".join(f"{'msg med':>9}" for _ in STAGES))
    for name in rounds:
        cells = "  ".join(f"{stage_medians[name][st]:9.3f}" for st in STAGES) if name in stage_medians \
            else "  ".join(f"{'':>9}" for _ in STAGES)
        print(f"  {name:<82} {medians[name]:7.2f} {medians[name] / sim:6.2f}  {cells}  {run_medians[name]}")
    ratios = {name: round(medians[name] / sim, 3) for name in rounds if name != SIMULATION}
    attribution = {label: timeline.summarize(timelines[names[label]], aggregates[names[label]], skip_round_one=True)
                   for label in labels}
    print(f"{'per message, median s (round 1 left out)':<42} " + " ".join(f"{label:>12}" for label in labels))
    for stage in (*timeline.STAGES, "total", timeline.AGGREGATE):
        cells = " ".join(f"{attribution[label]['table'][stage]['all'] or 0.0:12.3f}" for label in labels)
        print(f"  {stage:<40} {cells}")
    superlink = {label: {key: _median([run[key] for run in phases[names[label]] if run.get(key) is not None] or [0.0])
                         for key in SUPERLINK_KEYS} for label in labels}
    print(f"{'SuperLink per round, median of runs':<42} " + " ".join(f"{label:>12}" for label in labels))
    for key in SUPERLINK_KEYS:
        print(f"  {key:<40} " + " ".join(f"{superlink[label][key]:12.2f}" for label in labels))
    if before is not None and before_label != "after":
        print(f"  after / before ({before_label}) {after / before:.2f}; after / simulation {after / sim:.2f} "
              f"(target <= 2)")
    result = {"round_times_s": rounds, "median_round_s": medians, "per_run_median_s": run_medians,
              "ratio_to_simulation": ratios, "ratio_after_simulation": round(after / sim, 3),
              "ratio_after_before": round(after / before, 3) if before else None, "before_setup": before_label,
              "stage_medians_s": stage_medians, "stages_s": stages, "message_phases_s": phases,
              "attribution": attribution, "superlink_per_round": superlink,
              "fixed_cost_per_message": costs, "order": order, "cycles": args.cycles,
              "settings": {by_label[label][0]: {"isolation": by_label[label][1],
                                                "env": by_label[label][2] or "fedshop defaults"} for label in labels},
              "rounds": args.rounds, "shops": shops, "personal_mix": args.personal_mix,
              "run_config": {by_label[label][0]: RUN_CONFIG.get(label, {}) for label in labels},
              "loadavg_start": list(load_start),
              "loadavg_end": list(load_end), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "deployment_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
