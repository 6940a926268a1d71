"""Local training throughput: examples per second for each task mix on the default scenario's largest shop.

Runs the production trainer (`shared.train.train_shop`) for a fixed number of optimiser steps per task
mix (ctr; ctr+cvr; ctr+cvr+ranking; all four) and torch thread count, after a short warm-up. The
machine is shared, so the 1/5/15-minute load averages are recorded before and after every measurement,
and CPU time (`time.process_time`) is reported beside wall time (examples per CPU-second is the less
load-sensitive figure). With ``--dense`` every measurement is paired with one of the dense path
(`TrainConfig.sparse_embeddings = False`: dense gradients and dense Adam over the whole embedding tables)
taken right before it, and the table gives the sparse/dense ratio from the same run.
Prints a Rich table and writes benchmarks/results/local_throughput.json atomically.

With ``--baseline-ref REF`` the comparison is against another commit's trainer instead: REF is exported
(`git archive`) to a temporary directory and every measurement runs in a child process
(benchmarks/throughput_child.py) with PYTHONPATH at that export (baseline arm) or at this tree (current
arm), ``--repeats`` times in mirrored order (B C C B ...), so the current/baseline ratio of examples per
CPU-second comes from one run; ``--auc-seeds`` then trains both arms for test CTR AUC. ``--profile``
prints the current trainer's top cumulative functions (cProfile).

    .venv/bin/python benchmarks/local_throughput.py [--steps 300] [--warmup 10] [--threads 1 2] [--dense]
    .venv/bin/python benchmarks/local_throughput.py --baseline-ref 9b60ed7 --repeats 4 --auc-seeds 3
    .venv/bin/python benchmarks/local_throughput.py --profile --mixes ctr
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

# This tree's `shared`, not the one an editable install maps (a git worktree shares the main checkout's venv).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.atomic import atomic_write_text  # noqa: E402
from shared.features import ShopTensors  # noqa: E402
from shared.model import build_model  # noqa: E402
from shared.scenario import Scenario, load_scenario  # noqa: E402
from shared.train import evaluate_shop, train_shop  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the child module, also when loaded by file path
from throughput_child import largest_shop, rows_per_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "local_throughput.json"
BASELINE_RESULT = ROOT / "benchmarks" / "results" / "local_throughput_vs_baseline.json"
CHILD = Path(__file__).resolve().parent / "throughput_child.py"
ARMS = ("baseline", "current")
MIXES: dict[str, list[str]] = {
    "ctr": ["ctr"],
    "ctr+cvr": ["ctr", "cvr"],
    "ctr+cvr+ranking": ["ctr", "cvr", "ranking"],
    "all four": ["ctr", "cvr", "ranking", "sales"],
}


def measure(scenario: Scenario, tensors: ShopTensors, tasks: list[str], threads: int, steps: int,
            warmup: int, sparse: bool = True) -> dict[str, Any]:
    """Time ``steps`` optimiser steps of one task mix at one thread count (after ``warmup`` steps).

    ``sparse`` picks the trainer's path: row-sparse lazy Adam on the hashed tables, or dense Adam.
    """
    missing = sorted(set(tasks) - set(tensors.tasks))
    if missing:
        raise ValueError(f"the shop {tensors.name!r} lacks task(s) {missing}; pick a scenario whose largest "
                         "shop has every task")
    torch.set_num_threads(threads)
    shop = replace(tensors, tasks=list(tasks))
    model = build_model(shop, scenario.model, scenario.features, seed=scenario.seed)
    # Many epochs so that max_steps, not the epoch length, ends each call.
    cfg = replace(scenario.train, epochs=10_000, seed=scenario.seed, sparse_embeddings=sparse)
    train_shop(model, shop, replace(cfg, max_steps=warmup))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    train_shop(model, shop, replace(cfg, max_steps=steps))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    examples = steps * rows_per_step(shop, tasks, cfg.batch_size)
    return {
        "tasks": list(tasks), "path": "sparse" if sparse else "dense", "threads": threads, "steps": steps,
        "examples": examples,
        "wall_s": wall, "cpu_s": cpu, "examples_per_s": examples / wall, "steps_per_s": steps / wall,
        "examples_per_cpu_s": examples / cpu, "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }


def ctr_auc(scenario_name: str, seed: int, sparse: bool, epochs: int) -> float:
    """Test CTR AUC of the largest shop trained alone for ``epochs`` rounds of one local epoch, at its best
    validation epoch (the reports' rule), on the world and model drawn from ``seed``."""
    torch.set_num_threads(1)
    scenario = load_scenario(scenario_name, {"seed": seed})
    _, tensors = largest_shop(scenario)
    model = build_model(tensors, scenario.model, scenario.features, seed=seed)
    best_val, test_at_best = -1.0, float("nan")
    for epoch in range(epochs):
        train_shop(model, tensors, replace(scenario.train, epochs=1, seed=seed * 1000 + epoch,
                                           sparse_embeddings=sparse))
        val = evaluate_shop(model, tensors, "val").get("ctr", {}).get("auc", float("nan"))
        if val > best_val:
            best_val, test_at_best = val, evaluate_shop(model, tensors, "test")["ctr"]["auc"]
    return test_at_best


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def speedups(results: list[dict[str, Any]]) -> dict[str, float]:
    """Sparse over dense examples per CPU-second for every (mix, threads) measured both ways: "mix|threads"."""
    by = {(r["mix"], r["threads"], r["path"]): r["examples_per_cpu_s"] for r in results}
    return {f"{m}|{t}": v / by[(m, t, "dense")] for (m, t, path), v in by.items()
            if path == "sparse" and (m, t, "dense") in by}


def mirrored_order(repeats: int) -> list[str]:
    """Arm order for ``repeats`` pairs: baseline, current, then current, baseline, ... (B C C B B C ...).

    Mirroring cancels a linear drift in machine load between the arms over every two pairs.
    """
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {repeats}")
    return [arm for r in range(repeats) for arm in (ARMS if r % 2 == 0 else ARMS[::-1])]


def arm_ratios(results: list[dict[str, Any]], key: str = "examples_per_cpu_s") -> dict[str, dict[str, Any]]:
    """Per "mix|threads": mean ``key`` of each arm, current/baseline ratio of the means and the per-repeat ratios.

    ``results`` entries carry ``mix``, ``threads``, ``arm`` (baseline | current), ``repeat`` and ``key``.
    """
    groups: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        groups.setdefault(f"{r['mix']}|{r['threads']}", {}).setdefault(r["arm"], {})[r["repeat"]] = r[key]
    out = {}
    for label, arms in groups.items():
        if not all(a in arms for a in ARMS):
            continue
        base, cur = arms["baseline"], arms["current"]
        mean_b, mean_c = sum(base.values()) / len(base), sum(cur.values()) / len(cur)
        paired = [cur[k] / base[k] for k in sorted(base) if k in cur]
        out[label] = {"baseline_mean": mean_b, "current_mean": mean_c, "ratio": mean_c / mean_b,
                      "ratio_min": min(paired), "ratio_max": max(paired), "pairs": paired}
    return out


def child_json(stdout: str) -> dict[str, Any]:
    """The JSON object a child printed last on stdout (earlier lines may be library chatter)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"throughput_child printed no JSON result; its stdout ended with: {stdout[-500:]!r}")


@contextmanager
def exported_tree(ref: str) -> Iterator[tuple[Path, str]]:
    """A temporary export of ``ref`` (git archive) and its full commit hash; removed on exit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline-ref {ref!r} is not a commit in {ROOT}: {exc.stderr.strip()}") from None
    tmp = Path(tempfile.mkdtemp(prefix="fedshop-baseline-"))
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        yield tmp, commit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_child(tree: Path, args: list[str]) -> dict[str, Any]:
    """Run benchmarks/throughput_child.py with ``tree`` first on PYTHONPATH (its `shared`), return its JSON."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, str(CHILD), *args], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"throughput_child failed in {tree} (exit {proc.returncode}) for {args}:\n"
                           f"{proc.stderr[-2000:]}")
    return child_json(proc.stdout)


def compare_to_baseline(args: argparse.Namespace, console: Console) -> None:
    """Current vs ``args.baseline_ref`` trainer, each measurement in a child process, mirrored order."""
    out = args.out if args.out != RESULT else BASELINE_RESULT
    with exported_tree(args.baseline_ref) as (base_tree, commit):
        trees = {"baseline": base_tree, "current": ROOT}
        report: dict[str, Any] = {
            "benchmark": "local_throughput_vs_baseline", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "scenario": args.scenario, "baseline_ref": args.baseline_ref, "baseline_commit": commit,
            "current_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip(),
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "order": mirrored_order(args.repeats),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "loadavg_at_start": list(os.getloadavg())},
            "note": "examples per CPU-second = steps x rows per step / process CPU seconds of the timed steps, "
                    "each arm in its own process; ratio = current mean / baseline mean",
            "results": [],
        }
        for threads in args.threads:
            for label in args.mixes:
                for rep, arm in enumerate(report["order"]):
                    console.print(f"[dim]{label}, {threads} thread(s), {arm}, repeat {rep // 2}: "
                                  f"{args.steps} steps ...[/dim]")
                    res = run_child(trees[arm], ["throughput", "--scenario", args.scenario, "--tasks", *MIXES[label],
                                                 "--threads", str(threads), "--steps", str(args.steps),
                                                 "--warmup", str(args.warmup)])
                    report["results"].append({"mix": label, "arm": arm, "repeat": rep // 2, **res})
                    atomic_write_text(out, json.dumps(report, indent=2))
        report["ratios_cpu"] = arm_ratios(report["results"])
        report["ratios_wall"] = arm_ratios(report["results"], "examples_per_s")
        if args.auc_seeds:
            aucs: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
            for seed in range(args.auc_seeds):
                for arm in (ARMS if seed % 2 == 0 else ARMS[::-1]):
                    console.print(f"[dim]CTR AUC, seed {seed}, {arm}, {args.auc_epochs} epochs ...[/dim]")
                    res = run_child(trees[arm], ["auc", "--scenario", args.scenario, "--seed", str(seed),
                                                 "--epochs", str(args.auc_epochs)])
                    aucs[arm][seed] = res["test_auc"]
            report["ctr_auc"] = {"epochs": args.auc_epochs, "seeds": list(range(args.auc_seeds)),
                                 **{arm: [v[s] for s in sorted(v)] for arm, v in aucs.items()},
                                 **{f"{arm}_mean_sd": _mean_sd(list(v.values())) for arm, v in aucs.items()},
                                 "diff_per_seed": [aucs["current"][s] - aucs["baseline"][s]
                                                   for s in sorted(aucs["current"])]}
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
        atomic_write_text(out, json.dumps(report, indent=2))

    table = Table(title=f"Local training vs {args.baseline_ref} ({commit[:9]}), examples per CPU-second, "
                        f"{args.repeats} repeat(s) per arm")
    for col in ("tasks", "threads", "baseline ex/CPU-s", "current ex/CPU-s", "x baseline (CPU)", "per-repeat x",
                "x baseline (wall)", "load (1 min)"):
        table.add_column(col, justify="left" if col == "tasks" else "right")
    for key, r in report["ratios_cpu"].items():
        mix, threads = key.split("|")
        loads = [x["loadavg_before"][0] for x in report["results"] if x["mix"] == mix and str(x["threads"]) == threads]
        table.add_row(mix, threads, f"{r['baseline_mean']:,.0f}", f"{r['current_mean']:,.0f}", f"{r['ratio']:.2f}",
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", f"{report['ratios_wall'][key]['ratio']:.2f}",
                      f"{min(loads):.1f}-{max(loads):.1f}")
    console.print(table)
    if "ctr_auc" in report:
        a = report["ctr_auc"]
        for arm in ARMS:
            mean, sd = a[f"{arm}_mean_sd"]
            console.print(f"test CTR AUC, {arm}, {a['epochs']} epochs, seeds {a['seeds']}: {mean:.4f} +- {sd:.4f} "
                          f"{[round(x, 4) for x in a[arm]]}")
    console.print(f"wrote {out}")


def profile_current(scenario: Scenario, tensors: ShopTensors, tasks: list[str], steps: int, warmup: int,
                    top: int = 25) -> str:
    """cProfile of ``steps`` steps of the current trainer (one thread): the ``top`` functions by cumulative time."""
    torch.set_num_threads(1)
    shop = replace(tensors, tasks=list(tasks))
    model = build_model(shop, scenario.model, scenario.features, seed=scenario.seed)
    cfg = replace(scenario.train, epochs=10_000, seed=scenario.seed)
    train_shop(model, shop, replace(cfg, max_steps=warmup))
    prof = cProfile.Profile()
    prof.enable()
    train_shop(model, shop, replace(cfg, max_steps=steps))
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def main() -> None:
    """Run every task mix at every thread count, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default", help="scenario name or path (default: default)")
    parser.add_argument("--steps", type=int, default=300, help="timed optimiser steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--dense", action="store_true",
                        help="also time the dense path before each measurement and report the sparse/dense ratio")
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES), metavar="MIX",
                        help=f"task mixes to time (default: all of {list(MIXES)})")
    parser.add_argument("--auc-seeds", type=int, default=0,
                        help="also train the largest shop alone on this many seeds, sparse and dense, and "
                             "report test CTR AUC mean +- sd (0 = skip)")
    parser.add_argument("--auc-epochs", type=int, default=6, help="local epochs per AUC run")
    parser.add_argument("--baseline-ref", metavar="REF",
                        help="compare with this commit's trainer (each arm in a child process) instead of --dense")
    parser.add_argument("--repeats", type=int, default=2,
                        help="with --baseline-ref: measurements per arm, in mirrored order (default 2: B C C B)")
    parser.add_argument("--profile", action="store_true",
                        help="print the current trainer's top cumulative functions (cProfile) for each mix, then exit")
    parser.add_argument("--out", type=Path, default=RESULT, help="JSON result path")
    args = parser.parse_args()

    console = Console()
    if args.baseline_ref:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1; got {args.repeats}")
        compare_to_baseline(args, console)
        return
    if args.profile:
        scenario = load_scenario(args.scenario)
        _, tensors = largest_shop(scenario)
        for label in args.mixes:
            console.print(f"[bold]{label}[/bold]: {args.steps} steps, 1 thread")
            print(profile_current(scenario, tensors, MIXES[label], args.steps, args.warmup))
        return
    scenario = load_scenario(args.scenario)
    start_load = os.getloadavg()
    name, tensors = largest_shop(scenario)
    report: dict[str, Any] = {
        "benchmark": "local_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenario": scenario.name, "shop": name,
        "train_impressions": int(tensors.rows["train"]["user"].shape[0]),
        "n_users": tensors.n_users, "n_items": tensors.n_items,
        "model": asdict(scenario.model), "batch_size": scenario.train.batch_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_at_start": list(start_load)},
        "note": "examples = optimiser steps x rows read per step (one batch per task source); the machine is "
                "shared, so compare examples_per_cpu_s across runs and read wall-clock figures with the load",
        "results": [],
    }
    paths = [False, True] if args.dense else [True]
    for threads in args.threads:
        for label in args.mixes:
            for sparse in paths:  # dense right before sparse: the pair sees nearly the same load
                path = "sparse" if sparse else "dense"
                console.print(f"[dim]{label}, {threads} thread(s), {path}: {args.steps} steps ...[/dim]")
                result = measure(scenario, tensors, MIXES[label], threads, args.steps, args.warmup, sparse)
                report["results"].append({"mix": label, **result})
                report["machine"]["loadavg_at_end"] = list(os.getloadavg())
                # Rewritten after every measurement: an interrupted run on a busy machine keeps its numbers.
                atomic_write_text(args.out, json.dumps(report, indent=2))
    report["speedup_cpu"] = speedups(report["results"])
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if args.auc_seeds:
        aucs: dict[str, list[float]] = {"dense": [], "sparse": []}
        for seed in range(args.auc_seeds):
            for path in ("dense", "sparse"):
                console.print(f"[dim]CTR AUC, seed {seed}, {path}, {args.auc_epochs} epochs ...[/dim]")
                aucs[path].append(ctr_auc(args.scenario, seed, path == "sparse", args.auc_epochs))
        report["ctr_auc"] = {"epochs": args.auc_epochs, "seeds": list(range(args.auc_seeds)), **aucs,
                             **{f"{p}_mean_sd": _mean_sd(v) for p, v in aucs.items()}}
        atomic_write_text(args.out, json.dumps(report, indent=2))

    table = Table(title=f"Local training throughput: {scenario.name} / {name} "
                        f"({report['train_impressions']} training impressions)")
    for col in ("tasks", "threads", "path", "rows/step", "steps/s", "examples/s", "examples/CPU-s",
                "x dense (CPU)", "load (1 min)"):
        table.add_column(col, justify="left" if col in ("tasks", "path") else "right")
    for r in report["results"]:
        ratio = report["speedup_cpu"].get(f"{r['mix']}|{r['threads']}") if r["path"] == "sparse" else None
        table.add_row(r["mix"], str(r["threads"]), r["path"], str(r["examples"] // r["steps"]),
                      f"{r['steps_per_s']:.1f}", f"{r['examples_per_s']:,.0f}",
                      f"{r['examples_per_cpu_s']:,.0f}", f"{ratio:.2f}" if ratio else "",
                      f"{r['loadavg_before'][0]:.1f}")
    console.print(table)
    if "ctr_auc" in report:
        a = report["ctr_auc"]
        console.print(f"test CTR AUC of {name} alone, {a['epochs']} epochs, seeds {a['seeds']}: dense (old path) "
                      f"{a['dense_mean_sd'][0]:.4f} +- {a['dense_mean_sd'][1]:.4f}, sparse "
                      f"{a['sparse_mean_sd'][0]:.4f} +- {a['sparse_mean_sd'][1]:.4f}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
