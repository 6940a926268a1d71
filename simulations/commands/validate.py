"""Command `fedshop validate`: check merchant shop directories before any training touches them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.schema import ShopData, ShopDataError, load_shop_dir


def shop_report(path: Path) -> dict:
    """Validate one shop directory into a JSON-able report: counts and tasks, or the error's parts."""
    try:
        shop = load_shop_dir(path)
    except ShopDataError as exc:
        error = {"message": str(exc), "file": exc.file, "row": exc.row, "column": exc.column,
                 "problem": exc.problem, "fix": exc.fix}
        return {"path": str(path), "ok": False, "error": error}
    return {"path": str(path), "ok": True, **_summary(shop)}


def _summary(shop: ShopData) -> dict:
    """Counts a merchant checks at a glance, plus the tasks the data supports."""
    inter = shop.interactions
    n_items = len(shop.items) if shop.items is not None else int(inter["item_id"].nunique())
    n_users = len(shop.users) if shop.users is not None else int(inter["user_id"].nunique())
    return {"name": shop.name, "rows": len(inter), "users": n_users, "items": n_items,
            "tasks": shop.available_tasks(), "sales_derived": bool(shop.meta.get("sales_derived")),
            "ignored_columns": shop.meta.get("ignored_columns", {})}


def _print_table(reports: list[dict], console: Console) -> None:
    """One row per shop; errors printed in full under the table."""
    table = Table(title="Shop directories")
    for header in ("shop", "status", "rows", "users", "items", "tasks"):
        table.add_column(header, justify="right" if header in ("rows", "users", "items") else "left")
    for rep in reports:
        if rep["ok"]:
            table.add_row(escape(rep["name"]), "[green]ok[/]", f"{rep['rows']:,}",
                          f"{rep['users']:,}", f"{rep['items']:,}", ", ".join(rep["tasks"]) or "-")
        else:
            table.add_row(escape(rep["path"]), "[red]error[/]", "-", "-", "-", "-")
    console.print(table)
    for rep in reports:
        if not rep["ok"]:
            console.print(f"[red]error[/] {escape(rep['error']['message'])}", highlight=False)
        elif rep["ignored_columns"]:
            console.print(f"[yellow]note[/] {escape(rep['path'])}: columns not used: "
                          f"{escape(str(rep['ignored_columns']))}", highlight=False)


def validate(
    shop_dirs: list[Path] = typer.Argument(..., help="Shop directories (interactions.csv|.parquet, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of reports instead of a table."),
) -> None:
    """Check shop directories: per shop rows/users/items/tasks, or the error with file, row, column and fix."""
    reports = [shop_report(path) for path in shop_dirs]
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    else:
        _print_table(reports, Console(soft_wrap=True))
    if not all(rep["ok"] for rep in reports):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add `validate` to the root app."""
    app.command("validate")(validate)
