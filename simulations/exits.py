"""How a `fedshop` command ends when its run cannot finish: one message and an exit code, never a traceback.

Every command that runs a federation or trains (simulate, compare, train-local, train-central, transfer,
privacy, coordinator run) wraps its run in `failures_as_messages`:

| what ended the run | prints | exit code |
|---|---|---|
| a bad scenario or shop directory (`ScenarioError`, `ShopDataError`) | `error: <file, key, fix>` | 2 |
| every round, or too many in a row, skipped (`RunFailed`) | `run failed: <why, which shops>` | 1 |
| a planned early end, e.g. the privacy budget (`RunStopped`) | `run stopped: <why>` | 3 |
| any other `ValueError`, `RuntimeError` or `OSError` (e.g. a diverged model, a full disk) | `error: <message>` | 1 |

`fedshop -v` adds the traceback under the message. Other exception types are programming errors and keep
Python's traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from shared.scenario import ScenarioError
from shared.schema import ShopDataError
from simulations.console import is_verbose
from simulations.federated import RunFailed, RunStopped

EXIT_FAILED = 1  # the run started and could not finish
EXIT_BAD_INPUT = 2  # refused before anything ran: a bad scenario, setting or shop directory
EXIT_STOPPED = 3  # ended early by design (its last checkpoint is the final model)


def _say(console: Console, label: str, colour: str, exc: BaseException, partial: Path | None = None,
         hint: bool = False) -> None:
    """Print ``label: message`` (its Rich markup escaped), where partial results are unless the message says
    so already, and with -v the traceback (else, with ``hint``, how to see it)."""
    message = str(exc)
    text = f"[{colour}]{label}:[/{colour}] {escape(message)}"
    if partial is not None and str(partial) not in message:
        text += f"\nresults written before the failure are in {escape(str(partial))}"
    if is_verbose():
        console.print(text, highlight=False)
        console.print_exception(show_locals=False)
        return
    if hint:
        text += "\n[dim]`fedshop -v` shows where it failed[/dim]"
    console.print(text, highlight=False)


@contextmanager
def failures_as_messages(console: Console | None = None, *, partial: Path | None = None) -> Iterator[None]:
    """Run the block; a run that cannot finish becomes a message and `typer.Exit` with the table's code.

    ``partial``, if given, is the run directory holding what was written before the failure.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    try:
        yield
    except (ScenarioError, ShopDataError) as exc:
        _say(console, "error", "red", exc)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except RunStopped as exc:
        _say(console, "run stopped", "yellow", exc)
        raise typer.Exit(EXIT_STOPPED) from exc
    except RunFailed as exc:
        _say(console, "run failed", "red", exc, partial)
        raise typer.Exit(EXIT_FAILED) from exc
    except (ValueError, RuntimeError, OSError) as exc:
        _say(console, "error", "red", exc, partial, hint=True)
        raise typer.Exit(EXIT_FAILED) from exc
