"""The `fedshop` command: one Typer app; each area registers its commands from its own module."""

from __future__ import annotations

import typer

from simulations.commands import compare, deploy, federate, generate, privacy, train, transfer, validate

app = typer.Typer(
    name="fedshop",
    help="Federated multi-task recommendation for e-commerce shops (Flower + PyTorch).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

for module in (generate, validate, train, federate, compare, transfer, privacy, deploy):
    module.register(app)

if __name__ == "__main__":
    app()
