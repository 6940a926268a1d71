"""Command `fedshop generate`: write a synthetic multi-shop world as merchant shop directories."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from shared.datasets.synthetic import World, WorldConfig, generate_world, write_world
from shared.schema import FORMATS


def _summary_table(world: World, out: Path, seconds: float) -> Table:
    """One row per shop: role, size, catalogue, realised rates, tasks and dominant category."""
    table = Table(title=f"Synthetic world -> {out} ({seconds:.2f} s)")
    for header in ("shop", "role", "rows", "users", "items", "pool", "CTR", "CVR", "tasks", "dominant category"):
        table.add_column(header, justify="right" if header in ("rows", "users", "items", "pool", "CTR", "CVR")
                         else "left")
    for shop in world.shops:
        t = world.truth["shops"][shop.name]
        role = "late" if t["late_joiner"] else ("small" if t["small"] else "train")
        if t["id_only"]:
            role += ", id-only"
        if t["disjoint"]:
            role += ", disjoint"
        table.add_row(shop.name, role, f"{t['n_rows']:,}", f"{t['n_users']:,}", f"{t['n_items']:,}",
                      f"{t['n_pool_items']:,}", f"{t['ctr']:.3f}", f"{t['cvr']:.3f}", " ".join(t["tasks"]),
                      t["dominant_category"])
    return table


def generate(
    shops: int = typer.Option(WorldConfig.n_shops, "--shops", min=1, help="Training shops."),
    seed: int = typer.Option(WorldConfig.seed, "--seed", help="Seed: the same seed writes the same world."),
    out: Path = typer.Option(..., "--out", help="Output folder: one shop directory per shop + world.json."),
    late_joiners: int = typer.Option(WorldConfig.n_late_joiners, "--late-joiners", min=0,
                                     help="Extra shops held out for transfer."),
    fmt: str = typer.Option("csv", "--format", help=f"Table format: {' | '.join(FORMATS)}."),
    heterogeneity: float = typer.Option(WorldConfig.heterogeneity, "--heterogeneity",
                                        help="Dirichlet concentration of category mixes (smaller = more different)."),
    overlap: float = typer.Option(WorldConfig.overlap, "--overlap",
                                  help="Share of each shop's products from the global pool."),
    eval_impressions: int = typer.Option(WorldConfig.eval_impressions, "--eval-impressions", min=0,
                                         help="Top each shop's validation + test days up to this many impressions "
                                              "(0 = off; the default scenario uses 10000)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT, replacing same-named shops."),
) -> None:
    """Generate a synthetic multi-shop world (shops over one common latent structure) as shop directories."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not a format; use one of {list(FORMATS)}", param_hint="--format")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; give a folder", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise typer.BadParameter(f"{out} is not empty; choose an empty folder or pass --force to write into it",
                                 param_hint="--out")
    n_small = min(WorldConfig.n_small_shops, shops // 2)  # at most half the shops are data-poor
    try:
        cfg = WorldConfig(n_shops=shops, seed=seed, n_late_joiners=late_joiners, heterogeneity=heterogeneity,
                          overlap=overlap, n_small_shops=n_small, eval_impressions=eval_impressions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    start = time.perf_counter()
    world = generate_world(cfg)
    seconds = time.perf_counter() - start
    write_world(world, out, fmt, overwrite=force)
    console = Console()
    if not console.is_terminal:  # piped output: keep one row per shop instead of wrapping at 80 columns
        console = Console(width=160)
    console.print(_summary_table(world, out, seconds))


def register(app: typer.Typer) -> None:
    """Add `generate` to the root app."""
    app.command("generate")(generate)
