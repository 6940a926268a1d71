"""Small CLI helpers shared by the commands: scenario overrides and friendly scenario errors."""

from __future__ import annotations

import tomllib
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from shared.scenario import Scenario, ScenarioError, load_scenario
from shared.schema import ShopDataError


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.001", "federation.rounds=3"]`` -> dotted keys with TOML-typed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r} (e.g. --set federation.rounds=3)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word is a string
    return out


def scenario_or_exit(name: str, overrides: dict[str, Any] | None = None, *, load_shops: bool = True,
                     federation: bool = False, rounds: int | None = None) -> Scenario:
    """Load a scenario (settings checked by the schema, shared/settings.py) and, unless ``load_shops`` is
    False, its shops; with ``federation`` also check that the federation can run (`Scenario.check_federation`,
    over ``rounds`` if given); or print the precise problem (file, key, value, fix) and exit 2."""
    try:
        scenario = load_scenario(name, overrides)
        if load_shops:
            scenario.shops()
        if federation:
            scenario.check_federation(rounds)
        return scenario
    except (ScenarioError, ShopDataError) as exc:
        # Escaped: messages name TOML tables like "[model]", which Rich would otherwise eat as markup.
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line per problem
        raise typer.Exit(2) from exc
