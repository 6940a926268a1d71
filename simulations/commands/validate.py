"""Command `fedshop validate`: check merchant shop directories before any training touches them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.features import SPLITS, FeatureConfig, assign_splits
from shared.schema import ShopData, ShopDataError, load_shop_dir
from simulations.options import scenario_or_exit

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def _error(exc: ShopDataError) -> dict:
    """The parts of a ShopDataError, for the JSON report."""
    return {"message": str(exc), "file": exc.file, "row": exc.row, "column": exc.column, "field": exc.field,
            "problem": exc.problem, "fix": exc.fix}


def shop_report(path: Path, features: FeatureConfig | None = None) -> dict:
    """Validate one shop directory into a JSON-able report: counts, splits and tasks, or the error's parts."""
    try:
        shop = load_shop_dir(path)
    except ShopDataError as exc:
        return {"path": str(path), "ok": False, "error": _error(exc)}
    return {"path": str(path), "ok": True, **_summary(shop, features or FeatureConfig())}


def _summary(shop: ShopData, features: FeatureConfig) -> dict:
    """Counts a merchant checks at a glance, rows per split, the tasks the data supports and warnings."""
    inter = shop.interactions
    n_items = len(shop.items) if shop.items is not None else int(inter["item_id"].nunique())
    n_users = len(shop.users) if shop.users is not None else int(inter["user_id"].nunique())
    splits, warnings = _splits(shop, features)
    return {"name": shop.name, "rows": len(inter), "users": n_users, "items": n_items,
            "tasks": shop.available_tasks(), "splits": splits, "warnings": warnings,
            "sales_derived": bool(shop.meta.get("sales_derived")),
            "ignored_columns": shop.meta.get("ignored_columns", {})}


def _splits(shop: ShopData, features: FeatureConfig) -> tuple[dict[str, int], list[str]]:
    """Interaction rows per split (the training run's own split rule), and a warning for every task a
    split cannot score, since that task is then missing from the split's report rows."""
    inter_split, sales_split = assign_splits(shop, features)
    counts, tasks = {}, {}
    for key, code in SPLITS.items():
        rows = shop.interactions[inter_split == code]
        sales = None if shop.sales is None or sales_split is None else shop.sales[sales_split == code]
        counts[SPLIT_NAMES[key]] = len(rows)
        tasks[SPLIT_NAMES[key]] = set(ShopData(shop.name, rows, sales=sales).available_tasks()) if len(rows) else set()
    warnings = []
    for task in shop.available_tasks():
        lacking = [name for name, have in tasks.items() if task not in have]
        if lacking:
            shown = ", ".join(f"{name} {n:,}" for name, n in counts.items())
            warnings.append(f"task {task} has nothing to score in the {' and '.join(lacking)} split "
                            f"(rows: {shown}), so it will be missing there in every report")
    return counts, warnings


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
            continue
        shown = ", ".join(f"{name} {n:,}" for name, n in rep["splits"].items())
        console.print(f"{escape(rep['name'])}: rows per split: {shown}", highlight=False)
        for warning in rep["warnings"]:
            console.print(f"[yellow]warning[/] {escape(rep['name'])}: {escape(warning)}", highlight=False)
        if rep["ignored_columns"]:
            console.print(f"[yellow]note[/] {escape(rep['path'])}: columns not used: "
                          f"{escape(str(rep['ignored_columns']))}", highlight=False)


def validate(
    shop_dirs: list[Path] = typer.Argument(..., help="Shop directories (interactions.csv|.parquet, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of reports instead of a table."),
    scenario: str | None = typer.Option(None, "--scenario",
                                        help="Count rows per split with this scenario's [features] split "
                                             "(default: the temporal 80/10/10 split)."),
) -> None:
    """Check shop directories: per shop rows/users/items/tasks, or the error with file, row, column and fix."""
    features = scenario_or_exit(scenario, load_shops=False).features if scenario else FeatureConfig()
    reports = [shop_report(path, features) for path in shop_dirs]
    _refuse_shared_names(reports)
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    else:
        _print_table(reports, Console(soft_wrap=True))
    if not all(rep["ok"] for rep in reports):
        raise typer.Exit(code=1)


def _refuse_shared_names(reports: list[dict]) -> None:
    """Two shops with one name would merge in one scenario: the later one becomes an error naming both."""
    first: dict[str, str] = {}
    for rep in reports:
        if not rep["ok"]:
            continue
        if rep["name"] in first:
            exc = ShopDataError(rep["path"], f"shop name {rep['name']!r} is also the name of {first[rep['name']]}; "
                                "in one scenario their metrics and state would merge",
                                'give each shop its own name = "..." in shop.toml', column="name")
            rep.clear()
            rep.update({"path": exc.file, "ok": False, "error": _error(exc)})
            continue
        first[rep["name"]] = rep["path"]


def register(app: typer.Typer) -> None:
    """Add `validate` to the root app (`init-scenario`, built on it, registers itself)."""
    app.command("validate")(validate)
