"""Commands: placeholder until this area lands."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
