"""Command `fedshop init-scenario`: a scenario over the user's own shop directories, ready to simulate.

It validates every directory first (the checks of `fedshop validate`) and writes nothing when one is
refused. The scenario takes its feature, model, training and federation settings from a built-in
scenario (`default` unless `--from` says otherwise) and lists the directories, as absolute paths,
under `[data] source = "shop-dirs"` (read by `shared.scenario`).
"""

from __future__ import annotations

from pathlib import Path

import tomli_w
import typer

from shared.atomic import atomic_write_text
from shared.scenario import Scenario, ScenarioError, load_scenario
from simulations.commands.validate import _print_table, _refuse_shared_names, shop_report

# Tables of the base scenario that describe its own data, not settings: replaced or dropped.
_DATA_ONLY = ("data", "description")


def scenario_for_shops(shop_dirs: list[Path], *, name: str, base: Scenario, base_name: str = "default") -> dict:
    """The scenario dict: the ``base`` scenario's settings over ``shop_dirs`` (absolute), no late joiners."""
    raw = {k: v for k, v in base.raw.items() if k not in _DATA_ONLY}
    raw["name"] = name
    raw["description"] = f"{len(shop_dirs)} shop directories; settings from the built-in '{base_name}' scenario"
    raw["data"] = {"source": "shop-dirs", "paths": [str(Path(p).resolve()) for p in shop_dirs]}
    # No shop is held out: all of them train from round 1 (list names here for `fedshop transfer`).
    raw["transfer"] = {**raw.get("transfer", {}), "late_joiners": []}
    return raw


def init_scenario(
    shop_dirs: list[Path] = typer.Argument(..., help="Your shop directories (see `fedshop validate`)."),
    out: Path = typer.Option(Path("scenario.toml"), "--out", help="Scenario file to write."),
    name: str = typer.Option(None, "--name", help="Scenario name (runs/<name>-...); default: the file's stem."),
    base: str = typer.Option("default", "--from", help="Built-in scenario (or TOML) whose settings to copy."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
) -> None:
    """Validate shop directories and write a scenario over them for `fedshop simulate` / `compare`."""
    if out.exists() and not force:
        typer.secho(f"Error: {out} exists; nothing written. Fix: choose another --out or pass --force",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    try:
        base_scenario = load_scenario(base)
    except ScenarioError as err:
        typer.secho(f"Error: --from {base}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    reports = [shop_report(path, base_scenario.features) for path in shop_dirs]
    _refuse_shared_names(reports)
    _print_table(reports, _console())
    if not all(rep["ok"] for rep in reports):
        typer.secho(f"Nothing written: fix the shop director{'ies' if len(shop_dirs) > 1 else 'y'} above and run "
                    "init-scenario again", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    raw = scenario_for_shops(shop_dirs, name=name or out.stem, base=base_scenario, base_name=base)
    header = ("# Written by `fedshop init-scenario`: your shop directories with the settings of the built-in "
              f"'{base}' scenario.\n# Run it: fedshop simulate {out}  |  fedshop compare {out}   "
              "(any key: --set federation.rounds=3)\n")
    atomic_write_text(out, header + tomli_w.dumps(raw))
    try:
        scenario = load_scenario(out)  # what simulate will read; the shops were validated above
    except ScenarioError as err:
        typer.secho(f"Error: {out} was written but does not load: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"wrote {out}: scenario '{scenario.name}' over {len(shop_dirs)} shop(s)")
    typer.echo(f"next: fedshop simulate {out}   (or: fedshop compare {out})")


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `init-scenario` to the root app."""
    app.command("init-scenario")(init_scenario)
