"""`fedshop train-local` and `fedshop train-central`: the two non-federated reference runs, with report and verdict."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from simulations.baselines import run_central, run_local_only
from simulations.best_rounds import final_table, print_final_table
from simulations.compare import small_shops_of
from simulations.console import is_verbose, print_verdict, step_progress
from simulations.exits import failures_as_messages
from simulations.options import parse_overrides, scenario_or_exit
from simulations.run_report import run_verdict, write_run_report
from simulations.rundir import new_run_dir, write_metrics, write_run_info

console = Console()
PLAIN_EVERY = 10.0  # seconds between plain progress lines (not a terminal); a shop's last epoch always prints


def _run(kind: str, scenario_name: str, epochs: int | None, run_dir: Path | None, runs: Path, seed: int | None,
         overrides: list[str]) -> Path:
    extra = parse_overrides(overrides)
    if seed is not None:
        extra["seed"] = seed
    scenario = scenario_or_exit(scenario_name, extra)
    out = run_dir or new_run_dir(runs, f"{scenario.name}-{kind}")
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, {"command": f"train-{kind}", "epochs": epochs or 0, "scenario": scenario.raw})
    runner = run_local_only if kind == "local" else run_central
    with step_progress(console, unit="epoch", every=PLAIN_EVERY, transient=True) as bar:

        def progress(label: str, done: int, total: int) -> None:
            bar.update(label if kind == "local" else "all shops pooled", done, total)

        with failures_as_messages(console, partial=out):  # e.g. a diverged model: message, exit 1
            rows = runner(scenario, epochs=epochs, progress=progress)
    write_metrics(out, rows)
    if is_verbose():
        print_final_table(console, final_table(rows),
                          title=f"train-{kind}: test metrics at each shop's best validation epoch")
    write_run_report(out, small_shops=small_shops_of(scenario))
    print_verdict(console, run_verdict(out))
    return out


def _command(kind: str, doc: str):  # noqa: ANN202 - a Typer command function
    """One command function per runner; both take the same options."""

    def command(
        scenario: str = typer.Argument("default", help="scenario name or path to a .toml"),
        epochs: int | None = typer.Option(None, min=1, help="epochs (default: the federation's rounds x local epochs)"),
        run_dir: Path | None = typer.Option(None, help=f"write here instead of runs/<scenario>-{kind}-<time>"),
        runs: Path = typer.Option(Path("runs"), help="parent folder of new run directories"),
        seed: int | None = typer.Option(None, help="override the scenario's seed"),
        set_: list[str] = typer.Option([], "--set", help="override a scenario key, e.g. --set train.lr=0.001"),
    ) -> None:
        _run(kind, scenario, epochs, run_dir, runs, seed, set_)

    command.__doc__ = doc
    return command


def register(app: typer.Typer) -> None:
    """Add `train-local` and `train-central`."""
    app.command("train-local")(_command("local", "Train every shop alone on its own data (the local-only baseline)."))
    app.command("train-central")(_command(
        "central", "Train one model on all shops' pooled data (the centralized oracle that privacy forbids)."))
