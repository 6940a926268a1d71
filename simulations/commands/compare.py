"""`fedshop compare`: every method on the same splits, seeds and compute budget, with reports, plots and a verdict."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from simulations.best_rounds import print_final_table
from simulations.compare import FEDERATED, METHODS, Comparison, parse_methods, parse_seeds, run_comparison
from simulations.console import duration, is_verbose, print_verdict, step_progress
from simulations.exits import failures_as_messages
from simulations.options import parse_overrides, scenario_or_exit
from simulations.run_report import run_verdict, target_detail, target_status
from simulations.rundir import new_run_dir

console = Console()
PLAIN_EVERY = 10.0  # seconds between plain progress lines (not a terminal); a finished label always prints


def progress_label(label: str) -> tuple[str, str]:
    """(what to show, unit) for a runner's progress label: a federated method, 'pooled' or a shop's name."""
    if label in FEDERATED:
        return label, "round"
    if label == "pooled":
        return "central (pooled data)", "epoch"
    return f"local-only {label}", "epoch"


def print_headline(comparison: Comparison) -> None:
    """Rich table: per task, each method's mean, the gap fedshop closes and the shops it leaves worse off."""
    summary = comparison.summary
    tasks = summary.get("tasks", {})
    methods = [m for m in METHODS if any(m in t["mean"] for t in tasks.values())]
    table = Table(title="compare: test metric, mean over shops" + (" and seeds" if len(summary["seeds"]) > 1 else ""))
    for col in ["task", *methods, "gap closed", "worse (max)", "small gain"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, t in tasks.items():
        gap = (f"{t['gap_closed']:.1%}" if t["gap_closed"] is not None
               else "n/a" if t["gap_status"] == "missing-method" else t["gap_status"])  # the verdict says why
        worse = t.get("worse_shops", [])
        gain = (t.get("small_shop_gain") or {}).get(summary["method"])
        means = [f"{t['mean'][m]:.4f}" if m in t["mean"] else "-" for m in methods]
        table.add_row(f"{task} {t['metric']}", *means, gap,
                      f"{len(worse)} ({worse[0]['margin']:+.4f})" if worse else "0",
                      f"{gain:+.4f}" if gain is not None else "-")
    console.print(table)
    for task, t in tasks.items():
        if t.get("worse_shops"):
            shops = ", ".join(f"{w['shop']} {w['margin']:+.4f}" for w in t["worse_shops"])
            console.print(f"{task}: {summary['method']} below local-only at {shops}")
    for name, target in (summary.get("targets") or {}).items():
        value = ("-" if target["value"] is None else f"{target['value']:.4f}") + target_detail(target)
        status = target_status(name, target, summary)
        mark = (f"[dim]{status}[/dim]" if status.startswith("n/a") else "[green]met[/green]" if status == "met"
                else "[red]not met[/red]")
        if target.get("within_noise") and status.startswith("not met"):
            mark += " [yellow](by less than 2 standard errors: more seeds can tell)[/yellow]"
        console.print(f"target {name} {target['target']}: {value} {mark}")


def register(app: typer.Typer) -> None:
    """Add `compare` and `pool`."""

    @app.command("compare")
    def compare(
        scenario: str = typer.Argument("default", help="scenario name or path to a .toml"),
        rounds: int | None = typer.Option(None, min=1, help="federation rounds; local and central train rounds x "
                                          "local_epochs epochs (default: the scenario's)"),
        seeds: str | None = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2 (default: the scenario's)"),
        methods: str = typer.Option(",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)),
        runs: Path = typer.Option(Path("runs"), help="parent folder of the new run directory"),
        run_dir: Path | None = typer.Option(None, help="write here instead of <runs>/<scenario>-compare-<time>"),
        set_: list[str] = typer.Option([], "--set", help="override a scenario key, e.g. --set train.lr=0.001"),
    ) -> None:
        """Compare local-only, the centralized oracle, FedAvg of everything shareable and fedshop."""
        try:
            chosen = parse_methods(methods)
            seed_list = parse_seeds(seeds) if seeds is not None else None
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        overrides = parse_overrides(set_)
        if rounds is not None:
            overrides["federation.rounds"] = rounds
        base = scenario_or_exit(scenario, overrides, federation=True)  # min_shops, join_round: before any run
        scenarios = [base] if seed_list is None else [
            scenario_or_exit(scenario, {**overrides, "seed": s}, federation=True) for s in seed_list]
        out = run_dir or new_run_dir(runs, f"{base.name}-compare")
        runs_total, started = len(chosen) * len(scenarios), time.monotonic()
        finished: list[str] = []
        with step_progress(console, every=PLAIN_EVERY, transient=True) as bar:

            def progress(label: str, done: int, total: int) -> None:
                name, unit = progress_label(label)
                bar.update(name, done, total, unit=unit)

            def done(method: str, seed: int, seconds: float) -> None:
                finished.append(method)
                bar.note(f"{method} (seed {seed}) finished in {duration(seconds)}; {len(finished)}/{runs_total} "
                         f"method runs done, elapsed {duration(time.monotonic() - started)}")

            with failures_as_messages(console, partial=out):  # e.g. RunFailed: message, exit 1, no traceback
                result = run_comparison(scenarios, out, methods=chosen, progress=progress, on_method_done=done,
                                        config={"overrides": {k: str(v) for k, v in overrides.items()}},
                                        checked=True)  # scenario_or_exit checked every scenario above
        if is_verbose():
            mean_final = result.final.groupby(["method", "shop", "task", "metric"], as_index=False)["value"].mean()
            print_final_table(console, mean_final, title="test metrics at each shop's best validation round")
        print_headline(result)
        print_verdict(console, run_verdict(out, summary=result.summary))

    @app.command("pool")
    def pool(
        run_dirs: list[Path] = typer.Argument(..., help="two or more `fedshop compare` run directories"),
        runs: Path = typer.Option(Path("runs"), help="parent folder of the new run directory"),
        run_dir: Path | None = typer.Option(None, help="write here instead of <runs>/<scenario>-pool-<time>"),
    ) -> None:
        """Pool the seeds of several compare runs of one scenario into one report (summary, targets, plots)."""
        from simulations.pool import PoolError, load_pool, write_pool

        try:
            plan = load_pool(run_dirs)
        except PoolError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        with failures_as_messages(console):
            result = write_pool(plan, run_dir or new_run_dir(runs, f"{plan.name}-pool"))
        console.print(f"pooled seeds {', '.join(str(s) for s in plan.seeds)} from {len(plan.run_dirs)} runs")
        print_headline(result)
        print_verdict(console, run_verdict(result.run_dir, summary=result.summary))
