"""The `fedshop` command: one Typer app; each area registers its commands from its own module."""

from __future__ import annotations

import os

import typer

from simulations.commands import (
    compare,
    deploy,
    generate,
    init_scenario,
    privacy,
    simulate,
    train,
    transfer,
    validate,
)
from simulations.console import configure_logging

app = typer.Typer(
    name="fedshop",
    help="Federated multi-task recommendation for e-commerce shops (Flower + PyTorch).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _setup(
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="also show Flower's INFO logs and the per-shop tables (default: progress, "
                                      "warnings and a verdict)"),
) -> None:
    """Run before every command: quiet library logs unless -v; one torch thread per process unless
    FEDSHOP_TORCH_THREADS says otherwise.

    Measured on the 2-core machine with one other busy process: 60 training steps took 4.3 s on one
    thread and 51 s on two (the threads spin waiting for a core); simulated shops are one process each.
    """
    configure_logging(verbose)
    threads = int(os.environ.get("FEDSHOP_TORCH_THREADS", "1"))
    import torch  # noqa: PLC0415 - heavy; only commands that train need it, but all may

    torch.set_num_threads(threads)


for module in (generate, validate, init_scenario, train, simulate, compare, transfer, privacy, deploy):
    module.register(app)

if __name__ == "__main__":
    app()
