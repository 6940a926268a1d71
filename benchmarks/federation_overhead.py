"""What federating costs: the same training, centralised in one process vs federated (Ray or pool engine).

Both arms do the same work on the same cores: the scenario's training shops for `rounds x local_epochs`
epochs with an evaluation after every round. Centralised: one process trains the pooled examples
with as many torch threads as the machine has cores (`--central-threads`). Federated:
`run_federated` with `--engine ray` (one single-threaded Ray actor per core) or `--engine pool`
(one forked worker per core), each shop trained and evaluated in its own round.

Each arm runs in its own child process, in mirrored order (central, federated, federated, central)
so a load that rises or falls during the benchmark hits both arms alike. CPU is the whole process
tree's: the child reports, at every round end, the CPU of itself and every live descendant from
/proc (Ray's raylet, GCS and workers included); the whole-run CPU is what the parent collects from
the child and every descendant (the parent is a child subreaper, so orphaned Ray processes are
reaped and counted too), or, if larger, the peak of its own /proc samples of its descendants every
0.5 s (once a Ray run's rusage came out below its own round-end /proc figure: a process escaped).
Reported: steady-state (per round, median of rounds 2..n) and whole-run CPU and wall, and the
federated / centralised ratios (target: at most 1.1).

    .venv/bin/python benchmarks/federation_overhead.py [--engine ray|pool] [--rounds 3] [--repeats 1]
                                                        [--scenario default] [--set k=v ...]

Prints a table and writes benchmarks/results/federation_overhead_<engine>.json.

`--model-cache-ab` adds a third arm, the same engine with the per-process model cache off
(`FEDSHOP_MODEL_CACHE=0`, arm `<engine>-nocache`), in the orders A B C A, A C B A, so both federated
arms get ratios against the same centralised runs, measured in one run.

Both arms evaluate the same (`--central-eval same`, the default): the federated run evaluates what the run config
says (eval-split val+test: every shop's val every round, test for the tasks whose validation score is a new best,
every task in the last round), and the centralised arm evaluates every shop's view on val every round and on test
for exactly the (round, shop, task) passes the federated run made (read from its metrics.csv; the federated arm
therefore runs first: B A A B). `--central-eval rule` has the centralised arm pick its test passes by the same rule
on its own validation scores (`simulations.baselines.evaluate_val_then_test`, as `fedshop compare`'s oracle): the
pooled model's validation improves less often, so it makes fewer passes. `--central-eval val` is the old
comparison: the centralised arm evaluates val only. Every run records its test passes (shop x task) per round.
`--val-only-ab` runs both arms both ways, in the order A B C D D C B A (<engine>, central, central-valonly,
<engine>-valonly; the val-only arms with eval-split = final-split = val): the same-work ratio with and without the
test passes, and what the test passes cost in each arm.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
CENTRAL = "central"
NOCACHE = "-nocache"  # arm suffix: the federated engine with FEDSHOP_MODEL_CACHE=0
VALONLY = "-valonly"  # arm suffix: the arm evaluates val only (eval-split = final-split = val when federated)
RULE = "-rule"  # central arm suffix: test passes by the test-on-improvement rule on its own validation scores
CENTRAL_EVAL = {"same": CENTRAL, "rule": CENTRAL + RULE, "val": CENTRAL + VALONLY}  # --central-eval -> arm


# ---------------------------------------------------------------- pure helpers (tests/test_overhead_summary.py)

def mirrored_order(a: str, b: str, repeats: int = 1) -> list[str]:
    """The arms' run order: A B B A, ``repeats`` times, so a drifting load hits both arms alike."""
    return [a, b, b, a] * repeats


def cache_ab_order(engine: str, repeats: int = 1, suffix: str = NOCACHE, central: str = CENTRAL,
                   central_first: bool = True) -> list[str]:
    """Central, federated and federated + ``suffix`` arms: A B C A then A C B A, ``repeats`` times.

    With ``central_first`` False: B A C A then A C A B, so a federated run comes first (its test passes are
    the centralised arm's) and each federated run still neighbours a centralised one.
    """
    off = engine + suffix
    if central_first:
        return [central, engine, off, central, central, off, engine, central] * repeats
    return [engine, central, off, central, central, off, central, engine] * repeats


def val_only_ab_order(engine: str, repeats: int = 1) -> list[str]:
    """Both arms with val+test and val only: A B C D D C B A (federated first: its test passes are central's)."""
    block = [engine, CENTRAL, CENTRAL + VALONLY, engine + VALONLY]
    return (block + block[::-1]) * repeats


def test_plan(metrics_csv: Path) -> dict[str, dict[str, list[str]]]:
    """Round -> shop -> tasks with test metrics in a federated run's metrics.csv (the coordinator's rows left out)."""
    import csv

    plan: dict[str, dict[str, set[str]]] = {}
    with Path(metrics_csv).open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "test" and row["shop"] != "coordinator":
                plan.setdefault(str(int(row["round"])), {}).setdefault(row["shop"], set()).add(row["task"])
    return {r: {shop: sorted(tasks) for shop, tasks in shops.items()} for r, shops in plan.items()}


def plan_passes(plan: dict[str, dict[str, list[str]]], rounds: int) -> list[int]:
    """Test passes (shop x task) per round 1..``rounds`` of a test plan."""
    return [sum(len(tasks) for tasks in plan.get(str(r), {}).values()) for r in range(1, rounds + 1)]


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or ``den`` is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def round_deltas(start: tuple[float, float], marks: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Per round (wall s, CPU s) from cumulative (wall, cpu) marks at each round end, starting at ``start``."""
    out, prev = [], start
    for mark in marks:
        out.append({"wall_s": mark[0] - prev[0], "cpu_s": mark[1] - prev[1]})
        prev = mark
    return out


def steady_state(rounds: list[dict[str, float]]) -> dict[str, float | None]:
    """Median per-round wall and CPU over rounds 2..n (round 1 holds start-up); None with fewer than 2 rounds."""
    later = rounds[1:]
    if not later:
        return {"wall_s": None, "cpu_s": None}
    return {"wall_s": statistics.median(r["wall_s"] for r in later),
            "cpu_s": statistics.median(r["cpu_s"] for r in later)}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def summarise(arms: list[dict[str, Any]], fed_arm: str, central_arm: str = CENTRAL) -> dict[str, Any]:
    """Mean steady/whole CPU and wall per arm kind and the federated / centralised ratios.

    ``arms`` are the runs in order, each with ``arm``, ``steady`` {wall_s, cpu_s} and ``whole``
    {wall_s, cpu_s}. Also gives the ratios of each mirrored pair (runs 1-2 and 4-3 of A B B A) to
    show how much the load moved them. ``central_arm`` names the centralised arm to compare with.
    """
    by_kind: dict[str, dict[str, float | None]] = {}
    for kind in (central_arm, fed_arm):
        runs = [a for a in arms if a["arm"] == kind]
        by_kind[kind] = {f"{part}_{what}": _mean([r[part][what] for r in runs])
                         for part in ("steady", "whole") for what in ("cpu_s", "wall_s")}
        by_kind[kind]["runs"] = len(runs)
    c, f = by_kind[central_arm], by_kind[fed_arm]
    ratios = {key: ratio(f[key], c[key]) for key in ("steady_cpu_s", "steady_wall_s", "whole_cpu_s", "whole_wall_s")}
    pairs = []
    for i in range(0, len(arms) - 1, 2):
        one, two = arms[i], arms[i + 1]
        fed, cen = (two, one) if one["arm"] == central_arm else (one, two)
        if fed["arm"] == fed_arm and cen["arm"] == central_arm:
            pairs.append({"steady_cpu": ratio(fed["steady"]["cpu_s"], cen["steady"]["cpu_s"]),
                          "whole_cpu": ratio(fed["whole"]["cpu_s"], cen["whole"]["cpu_s"]),
                          "whole_wall": ratio(fed["whole"]["wall_s"], cen["whole"]["wall_s"])})
    return {"central_arm": central_arm, "fed_arm": fed_arm, "arms": by_kind, "ratios": ratios, "pairs": pairs,
            "target_met": {k: (v is not None and v <= 1.1) for k, v in ratios.items() if "cpu" in k}}


# ---------------------------------------------------------------- /proc process-tree CPU

def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, utime + stime + cutime + cstime in seconds) for every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        ppid = int(fields[1])
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        out[int(entry)] = (ppid, ticks / CLK_TCK)
    return out


def tree_cpu(root: int | None = None) -> tuple[float, int]:
    """(CPU seconds, process count) of ``root`` and its live descendants, their reaped children included."""
    root = os.getpid() if root is None else root
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, count, todo = 0.0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            count += 1
        todo.extend(children.get(pid, []))
    return total, count


# ---------------------------------------------------------------- one arm, in a child process

def run_arm(arm: str, scenario_name: str, overrides: list[str], rounds: int, central_threads: int,
            evaluation: str = "", plan: dict[str, dict[str, list[str]]] | None = None) -> dict[str, Any]:
    """Run one arm in this process and return its cumulative (wall, tree CPU) marks at every round end.

    ``evaluation``: "val" evaluates val only (federated: eval-split = final-split = val); "" evaluates as the run
    config says (val+test), the centralised arm val plus ``plan``'s test passes (round -> shop -> tasks, a federated
    run's `test_plan`; without one, or with "rule", its own test-on-improvement rule). Also returns the test
    passes (shop x task) of each round, and a federated run's test plan.
    """
    t0 = time.perf_counter()
    start = (0.0, tree_cpu()[0])
    marks: list[tuple[float, float]] = []
    test_passes: list[int] = []
    made: dict[str, dict[str, list[str]]] = {}
    peak = [1]

    def mark(*_args: Any) -> None:
        cpu, count = tree_cpu()
        peak[0] = max(peak[0], count)
        marks.append((time.perf_counter() - t0, cpu))

    sys.path.insert(0, str(ROOT))
    from shared.scenario import load_scenario
    from simulations.options import parse_overrides

    scenario = load_scenario(scenario_name, parse_overrides(overrides))
    if arm == CENTRAL:
        from dataclasses import replace

        import torch

        from shared.features import pool_shops
        from shared.model import build_model
        from shared.train import evaluate_shop, train_shop
        from simulations.baselines import evaluate_val_then_test

        torch.set_num_threads(central_threads)
        shops = scenario.training_shops()
        pooled, views = pool_shops(shops, scenario.features)
        for view, shop in zip(views, shops, strict=True):
            view.name = shop.name
        model = build_model(pooled, scenario.model, scenario.features, seed=scenario.seed)
        epochs = int(scenario.federation["local_epochs"])
        every = bool(scenario.federation.get("test_every_round", False))
        records: dict[str, Any] = {}
        for r in range(1, rounds + 1):
            for e in range(epochs):
                train_shop(model, pooled, replace(scenario.train, epochs=1, seed=scenario.seed * 1000 + r * epochs + e))
            for view in views:
                if evaluation == "val":
                    evaluate_shop(model, view, "val")
                elif plan is not None and evaluation != "rule":  # the federated run's passes, no more, no fewer
                    evaluate_shop(model, view, "val")
                    wanted = plan.get(str(r), {}).get(view.name, [])
                    tested = evaluate_shop(model, view, "test", tasks=[t for t in view.tasks if t in wanted])
                    made.setdefault(str(r), {})[view.name] = sorted(tested)
                else:
                    tested = evaluate_val_then_test(model, view, records, r, last=r == rounds, every=every)[1]
                    made.setdefault(str(r), {})[view.name] = sorted(tested)
            mark()
        test_passes = plan_passes(made, rounds)
    else:
        from simulations.federated import run_federated

        with tempfile.TemporaryDirectory(prefix="fedshop-overhead-") as tmp:
            extra = {"eval-split": evaluation, "final-split": evaluation} if evaluation == "val" else None
            run_federated(scenario, Path(tmp) / "run", method="fedshop", rounds=rounds, engine=arm, progress=mark,
                          extra_config=extra)
            made = test_plan(Path(tmp) / "run" / "metrics.csv")
            test_passes = plan_passes(made, rounds)
    end_cpu, _ = tree_cpu()
    return {"arm": arm, "start": start, "marks": marks, "end": (time.perf_counter() - t0, end_cpu),
            "peak_processes": peak[0], "threads": central_threads if arm == CENTRAL else 1,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "evaluation": evaluation,
            "given_plan": plan is not None, "test_passes": test_passes, "test_plan": made}


# ---------------------------------------------------------------- the parent: mirrored arms, whole-tree CPU

def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _descendants_cpu() -> float:
    """CPU of this process's live descendants plus the children it reaped (its tree minus itself)."""
    own = os.times()
    return tree_cpu()[0] - (own.user + own.system)


def _reap_orphans(timeout: float = 30.0) -> list[int]:
    """Reap descendants re-parented to this subreaper; after ``timeout`` s terminate the rest by pid."""
    deadline, lingering = time.monotonic() + timeout, []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return lingering
        if pid:
            continue
        if time.monotonic() > deadline:
            lingering = [p for p, (ppid, _) in _proc_stats().items() if ppid == os.getpid()]
            for p in lingering:
                os.kill(p, signal.SIGTERM)
            deadline = time.monotonic() + 3600
        time.sleep(0.2)


def measure_arm(arm: str, args: argparse.Namespace, plan: Path | None = None) -> dict[str, Any]:
    """Run ``arm`` in a child process; its round marks plus whole-run wall and whole-tree CPU.

    ``plan``: a JSON test plan (`test_plan`) the centralised arm replays.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    engine = arm.removesuffix(NOCACHE).removesuffix(VALONLY).removesuffix(RULE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if arm.endswith(NOCACHE):
        env["FEDSHOP_MODEL_CACHE"] = "0"
    cmd = [sys.executable, __file__, "--child", engine, "--child-out", str(out), "--rounds", str(args.rounds),
           "--scenario", args.scenario, "--central-threads", str(args.central_threads),
           *[f"--set={o}" for o in args.overrides]]
    if arm.endswith(VALONLY):
        cmd += ["--child-eval", "val"]
    elif arm.endswith(RULE):
        cmd += ["--child-eval", "rule"]
    elif arm == CENTRAL and plan is not None:
        cmd += ["--child-test-plan", str(plan)]
    load = os.getloadavg()[0]
    cpu0, t0, sampled0 = _children_cpu(), time.perf_counter(), _descendants_cpu()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak_sampled = 0.0
        while proc.poll() is None:  # /proc view of every descendant, in case one escapes the subreaper
            peak_sampled = max(peak_sampled, _descendants_cpu() - sampled0)
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        lingering = _reap_orphans()
        err.seek(0)
        stderr = err.read()
    rusage_cpu = _children_cpu() - cpu0
    cpu = max(rusage_cpu, peak_sampled)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    child = json.loads(out.read_text())
    out.unlink()
    rounds = round_deltas(tuple(child["start"]), [tuple(m) for m in child["marks"]])
    return {"arm": arm, "rounds": rounds, "steady": steady_state(rounds),
            "whole": {"wall_s": wall, "cpu_s": cpu, "rusage_cpu_s": rusage_cpu, "peak_sampled_cpu_s": peak_sampled},
            # The child's own /proc view: wall to its end, tree CPU up to its last round end (Ray's processes are
            # gone by the child's exit, so its end figure misses them; "whole" counts them via the subreaper).
            "in_child": {"wall_s": child["end"][0],
                         "tree_cpu_to_last_round_s": (child["marks"] or [child["end"]])[-1][1] - child["start"][1]},
            "test_passes": child["test_passes"], "given_plan": child["given_plan"], "test_plan": child["test_plan"],
            "peak_processes": child["peak_processes"], "omp_wait_policy": child["omp_wait_policy"],
            "load_before": load, "load_after": os.getloadavg()[0], "lingering_killed": lingering}


def print_results(res: dict[str, Any]) -> None:
    """A Rich table of every run and the ratios."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"federation overhead, engine {res['engine']}: {res['scenario']}, {res['rounds']} rounds "
                        f"(load {res['load_start']:.1f} -> {res['load_end']:.1f} on {res['cpus']} CPUs)")
    for col in ("run", "arm", "steady CPU s/round", "steady wall s/round", "whole CPU s", "whole wall s",
                "test passes", "procs", "load"):
        table.add_column(col, justify="left" if col in ("run", "arm") else "right")
    for i, a in enumerate(res["runs"], 1):
        table.add_row(str(i), a["arm"], f"{a['steady']['cpu_s']:.1f}", f"{a['steady']['wall_s']:.1f}",
                      f"{a['whole']['cpu_s']:.1f}", f"{a['whole']['wall_s']:.1f}",
                      "+".join(str(n) for n in a.get("test_passes", [])), str(a["peak_processes"]),
                      f"{a['load_before']:.1f}")
    Console().print(table)
    summary = res["summary"]
    ratios = Table(title=f"{summary['fed_arm']} / {summary['central_arm']} (target <= 1.1)")
    for col in ("ratio", "mean of runs", *[f"pair {i}" for i in range(1, len(summary["pairs"]) + 1)]):
        ratios.add_column(col, justify="left" if col == "ratio" else "right")
    for key, pair_key in (("steady_cpu_s", "steady_cpu"), ("whole_cpu_s", "whole_cpu"),
                          ("steady_wall_s", None), ("whole_wall_s", "whole_wall")):
        cells = [_fmt(summary["ratios"][key])] + [_fmt(p[pair_key]) if pair_key else "" for p in summary["pairs"]]
        ratios.add_row(key.removesuffix("_s").replace("_", " "), *cells)
    Console().print(ratios)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Parse arguments; as parent run the mirrored arms, print and write results; as child run one arm."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ray", "pool"), default="ray", help="federated engine to compare")
    parser.add_argument("--scenario", default="default", help="scenario name or path to a .toml")
    parser.add_argument("--rounds", type=int, default=3, help="federation rounds (centralised: rounds x local epochs)")
    parser.add_argument("--repeats", type=int, default=1, help="how many A B B A blocks")
    parser.add_argument("--central-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the centralised arm (default: the cores the federation uses)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="scenario override key=value")
    parser.add_argument("--model-cache-ab", action="store_true",
                        help="also run the engine with the model cache off (FEDSHOP_MODEL_CACHE=0)")
    parser.add_argument("--val-only-ab", action="store_true",
                        help="run both arms with val+test and with val only (eval-split = final-split = val)")
    parser.add_argument("--central-eval", choices=tuple(CENTRAL_EVAL), default="same",
                        help="centralised arm's test passes: same = the federated run's (default), rule = its own "
                             "test-on-improvement rule, val = none (val only, the old comparison)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default results/federation_overhead_<engine>.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-eval", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-test-plan", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.child:
        import simulations  # noqa: F401 - sets OMP_WAIT_POLICY before torch loads, as the CLI does

        plan = json.loads(args.child_test_plan.read_text()) if args.child_test_plan else None
        res = run_arm(args.child, args.scenario, args.overrides, args.rounds, args.central_threads,
                      args.child_eval, plan)
        args.child_out.write_text(json.dumps(res))
        return None
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    load_start = os.getloadavg()
    if args.model_cache_ab and args.val_only_ab:
        raise SystemExit("--model-cache-ab and --val-only-ab: pick one third arm")
    if args.val_only_ab and args.central_eval != "same":
        raise SystemExit("--val-only-ab runs the centralised arm with the federated run's test passes and val only; "
                         "drop --central-eval")
    central = CENTRAL_EVAL[args.central_eval]
    replay = central == CENTRAL  # the federated arm runs first: its test passes are the centralised arm's
    if args.val_only_ab:
        order = val_only_ab_order(args.engine, args.repeats)
    elif args.model_cache_ab:
        order = cache_ab_order(args.engine, args.repeats, NOCACHE, central, central_first=not replay)
    else:
        order = mirrored_order(args.engine, central, args.repeats) if replay else mirrored_order(
            central, args.engine, args.repeats)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedshop-overhead-plan-") as tmp:
        plan_file = Path(tmp) / "test_plan.json"
        for arm in order:
            runs.append(measure_arm(arm, args, plan_file if plan_file.exists() else None))
            if arm.removesuffix(NOCACHE) == args.engine and not plan_file.exists():
                plan_file.write_text(json.dumps(runs[-1]["test_plan"]))
    plans = [r["test_plan"] for r in runs if r["arm"].removesuffix(NOCACHE) == args.engine]
    res = {"engine": args.engine, "scenario": args.scenario, "rounds": args.rounds, "cpus": os.cpu_count(),
           "central_threads": args.central_threads, "overrides": args.overrides,
           "load_start": load_start[0], "load_start_5m": load_start[1], "load_end": os.getloadavg()[0],
           "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"), "runs": runs,
           "central_eval": args.central_eval,
           # Federated runs are deterministic: every one made the same test passes, which the central arm replayed.
           "federated_plans_equal": all(p == plans[0] for p in plans),
           "summary": summarise(runs, args.engine, central)}
    if args.val_only_ab:
        res["summary_valonly"] = summarise(runs, args.engine + VALONLY, CENTRAL + VALONLY)
        res["test_passes_cost"] = {  # what the test passes add, per arm: val+test / val only
            arm: {k: ratio(res["summary"]["arms"][arm][k], res["summary_valonly"]["arms"][arm + VALONLY][k])
                  for k in ("steady_cpu_s", "whole_cpu_s")} for arm in (CENTRAL, args.engine)}
    if args.model_cache_ab:
        off = args.engine + NOCACHE
        res["summary_nocache"] = summarise(runs, off, central)
        on_arm, off_arm = res["summary"]["arms"][args.engine], res["summary_nocache"]["arms"][off]
        res["cache_on_vs_off"] = {k: ratio(on_arm[k], off_arm[k]) for k in ("steady_cpu_s", "whole_cpu_s",
                                                                            "steady_wall_s", "whole_wall_s")}
    print_results(res)
    if args.val_only_ab:
        print(f"{args.engine}{VALONLY} / {CENTRAL}{VALONLY}: "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in res["summary_valonly"]["ratios"].items()))
        for arm, cost in res["test_passes_cost"].items():
            print(f"{arm} val+test / val only: " + ", ".join(f"{k} {_fmt(v)}" for k, v in cost.items()))
    if args.model_cache_ab:
        print(f"{off} / {central}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in res["summary_nocache"]["ratios"].items()))
        print("cache on / off: " + ", ".join(f"{k} {_fmt(v)}" for k, v in res["cache_on_vs_off"].items()))
    sys.path.insert(0, str(ROOT))
    from shared.atomic import atomic_write_text

    out = args.out or RESULTS / f"federation_overhead_{args.engine}.json"
    atomic_write_text(out, json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
