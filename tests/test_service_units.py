"""The systemd units in docs/deployment.md: their command lines parse with the real CLI and systemd accepts them.

A merchant's IT person copies these units verbatim, so a renamed option or a unit systemd rejects would break the
first hour of a deployment; this checks both without needing a running systemd (only `systemd-analyze verify`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main

from simulations.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
FENCE = re.compile(r"```ini\n(.*?)```", re.S)


def _units() -> dict[str, str]:
    """Every ```ini block of the deployment doc holding a [Service] section, keyed by its `# /etc/...` path."""
    units: dict[str, str] = {}
    for block in FENCE.findall(DOC.read_text(encoding="utf-8")):
        if "[Service]" not in block:
            continue
        first, _, body = block.partition("\n")
        name = Path(first.lstrip("# ").split()[0]).name
        units[name] = body
    return units


def _commands(unit: str) -> list[list[str]]:
    """The ExecStart/ExecStop argument lists of a unit, continuation lines joined."""
    joined = unit.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.startswith(("ExecStart=", "ExecStop="))]
    return [shlex.split(line.split("=", 1)[1]) for line in lines]


def _parse(args: list[str]) -> list[str]:
    """Parse `fedshop ARGS` down to the leaf command without running it; return the command path.

    The units pass no group-level options, so a group's first argument names its subcommand.
    """
    command: click.Command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="fedshop")
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        name, rest = rest[0], rest[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"unknown command {name!r} in {args}"
        path.append(name)
        command = sub
        ctx = click.Context(command, info_name=name, parent=ctx)
    command.make_context(path[-1], rest, parent=ctx.parent, resilient_parsing=False)
    return path


def test_the_doc_has_the_coordinator_and_the_merchant_unit() -> None:
    assert set(_units()) == {"fedshop-coordinator.service", "fedshop-merchant.service"}


@pytest.mark.parametrize("name", sorted(_units()))
def test_every_command_line_of_a_unit_parses_with_the_real_cli(name: str) -> None:
    commands = _commands(_units()[name])
    assert len(commands) == 2, f"{name}: expected ExecStart and ExecStop"
    start, stop = commands
    assert Path(start[0]).name == "fedshop" and Path(stop[0]).name == "fedshop"
    assert "--foreground" in start, f"{name}: under systemd `start` must stay in the foreground"
    assert _parse(start[1:])[-1] == "start"
    assert _parse(stop[1:])[-1] == "stop"


def test_a_wrong_option_would_be_caught() -> None:
    """The parse above really checks options: an unknown one is refused."""
    with pytest.raises(click.UsageError):
        _parse(["merchant", "start", "--no-such-option", "x"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", sorted(_units()))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit with the example venv path pointed at this checkout's `fedshop`."""
    fedshop = Path(sys.executable).with_name("fedshop")
    assert fedshop.exists(), f"{fedshop} missing: install the project into its venv (make install)"
    unit = _units()[name]
    for example in {c[0] for c in _commands(unit)}:
        unit = unit.replace(example, str(fedshop))
    path = tmp_path / name
    path.write_text(unit, encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if name in line or str(path) in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
