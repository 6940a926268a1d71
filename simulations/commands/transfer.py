"""Command `fedshop transfer`: adapt the federation's encoder to late-joining shops against data size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.transfer import TransferConfig
from simulations.exits import failures_as_messages
from simulations.options import parse_overrides, scenario_or_exit
from simulations.rundir import new_run_dir, write_run_info
from simulations.transfer import TransferError, run_transfer

console = Console()


def _targets_table(summary: dict) -> Table:
    table = Table(title="CTR AUC of late joiners: best transfer mode vs scratch")
    for header in ("target", "shop", "scratch", "best mode", "best", "gain"):
        table.add_column(header, justify="left" if header in ("target", "shop", "best mode") else "right")
    for key, target in summary["targets"].items():
        for shop, v in target["shops"].items():
            table.add_row(key, shop, f"{v['scratch']:.4f}", v["best_mode"], f"{v['best']:.4f}", f"{v['gain']:+.4f}")
        table.add_row(key, "mean", "", "", "", f"{target['mean_gain']:+.4f}")
    return table


def transfer(
    scenario: str = typer.Argument("default", help="scenario name or path to a .toml"),
    encoder: Path | None = typer.Option(None, help="encoder checkpoint (file or run directory) instead of "
                                        "running the fedshop federation"),
    meta_encoder: Path | None = typer.Option(None, help="encoder of a Reptile-objective federation instead of "
                                             "running one"),
    rounds: int | None = typer.Option(None, min=1, help="federation rounds (default: the scenario's)"),
    seeds: list[int] = typer.Option([], "--seeds", min=0, help="transfer seeds (subsets and inits); repeat the option"),
    workers: int | None = typer.Option(None, min=1, help="parallel adaptation processes (default: CPU count)"),
    max_periods: int = typer.Option(TransferConfig.max_periods, min=1, help="early stopping: periods at most"),
    patience: int = typer.Option(TransferConfig.patience, min=1, help="early stopping: periods without improvement"),
    run_dir: Path | None = typer.Option(None, help="write here instead of runs/<scenario>-transfer-<time>"),
    runs: Path = typer.Option(Path("runs"), help="parent folder of new run directories"),
    set_: list[str] = typer.Option([], "--set", help="override a scenario key, e.g. "
                                   "--set 'transfer.late_joiners=[\"ml-zip6-7\"]'"),
) -> None:
    """Adapt late joiners in every mode (scratch/frozen/finetune/meta) at every data fraction; report data saved."""
    sc = scenario_or_exit(scenario, parse_overrides(set_))
    out = run_dir or new_run_dir(runs, f"{sc.name}-transfer")
    out.mkdir(parents=True, exist_ok=True)
    tcfg = TransferConfig(max_periods=max_periods, patience=patience)
    write_run_info(out, {"command": "transfer", "encoder": encoder, "meta_encoder": meta_encoder, "rounds": rounds,
                         "seeds": seeds, "transfer_config": tcfg.__dict__, "scenario": sc.raw})
    started = time.perf_counter()
    try:
        with failures_as_messages(partial=out):  # a federation that fails, a diverged model: message, exit 1
            run_transfer(sc, out, encoder=encoder, meta_encoder=meta_encoder, rounds=rounds, seeds=seeds or None,
                         workers=workers, transfer_cfg=tcfg,
                         progress=lambda msg: console.print(f"[dim]{time.perf_counter() - started:6.0f}s[/dim] {msg}"))
    except TransferError as exc:  # refused before anything ran: a bad encoder file or setting
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    console.print(_targets_table(summary))
    console.print(f"{time.perf_counter() - started:.0f} s; run directory: [bold]{out}[/bold] "
                  "(transfer.csv, transfer.png, summary.md)")


def register(app: typer.Typer) -> None:
    """Add `transfer` to the root app."""
    app.command("transfer")(transfer)
