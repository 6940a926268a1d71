"""`fedshop simulate`: a federated run of a scenario on Flower's simulation engine, with live progress."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.scenario import scenario_from_dict
from simulations.federated import METHODS, SCENARIO_FILE, run_federated
from simulations.options import parse_overrides, scenario_or_exit
from simulations.rundir import new_run_dir

if TYPE_CHECKING:  # importing Flower costs a second at every `fedshop` start
    from server.strategies import RoundReport

console = Console()
HEADLINE = ("ctr.auc", "cvr.auc", "ranking.ndcg@10", "sales.wape")  # shown live, when the shops have them


def _headline(report: RoundReport) -> str:
    """Mean over shops of a few headline metrics, e.g. 'ctr.auc 0.712  ranking.ndcg@10 0.301'."""
    parts = []
    for key in HEADLINE:
        values = [m[key] for m in report.evaluate.values() if key in m and m[key] == m[key]]
        if values:
            parts.append(f"{key} {sum(values) / len(values):.3f}")
    return "  ".join(parts)


def register(app: typer.Typer) -> None:
    """Add `simulate`."""

    @app.command("simulate")
    def simulate(
        scenario: str = typer.Argument("default", help="scenario name or path to a .toml (ignored with --resume)"),
        rounds: int | None = typer.Option(None, help="server rounds (default: the scenario's federation.rounds)"),
        run_dir: Path | None = typer.Option(None, help="write here instead of runs/<scenario>-<method>-<time>"),
        runs: Path = typer.Option(Path("runs"), help="parent folder of new run directories"),
        resume: Path | None = typer.Option(None, help="continue this run directory from its last checkpoint"),
        seed: int | None = typer.Option(None, help="override the scenario's seed"),
        method: str = typer.Option("fedshop", help=f"one of {sorted(METHODS)}"),
        set_: list[str] = typer.Option([], "--set", help="override a scenario key, e.g. --set federation.rounds=3"),
    ) -> None:
        """Federate the scenario's shops: the encoder is shared, each shop's local part stays home."""
        if method not in METHODS:
            raise typer.BadParameter(f"--method must be one of {sorted(METHODS)}")
        if resume is not None:
            saved = resume / SCENARIO_FILE
            if not saved.exists():
                console.print(f"[red]error:[/red] {saved} not found: --resume needs a run directory written by "
                              "`fedshop simulate`")
                raise typer.Exit(2)
            scen = scenario_from_dict(tomllib.loads(saved.read_text(encoding="utf-8")), path=saved)
            out = resume
        else:
            extra = parse_overrides(set_)
            if seed is not None:
                extra["seed"] = seed
            scen = scenario_or_exit(scenario, extra)
            out = run_dir or new_run_dir(runs, f"{scen.name}-{method}")
        total = rounds or int(scen.federation["rounds"])
        n_shops = len(scen.training_shops())
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("round {task.completed}/{task.total}"), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"{scen.name} ({method}, {n_shops} shops)", total=total, status="starting Ray...")

            def progress(report: RoundReport, _total: int) -> None:
                left = f", left out {sorted(report.left_out)}" if report.left_out else ""
                status = f"shops done {len(report.train)}/{n_shops}{left}  {_headline(report)}"
                bar.update(task, completed=report.server_round, status=status)

            run_federated(scen, out, method=method, rounds=total, resume=resume is not None, progress=progress)
        console.print(f"run directory: [bold]{out}[/bold]")
