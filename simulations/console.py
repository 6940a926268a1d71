"""What a `fedshop` command shows: library logs only with `-v`, live progress, and a closing verdict.

Progress is a Rich bar with an ETA in a terminal; through a pipe or into a file (CI, `make demo | tee`)
it is one plain line per step, so a log shows the run advancing instead of staying silent for minutes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column

FLOWER_LOGGER = "flwr"  # Flower logs through this logger (flwr.supercore.logger), with its own console handler
_state = {"verbose": False}


class _QuietFlower(logging.Filter):
    """Keeps Flower's warnings and errors; drops its INFO/DEBUG chatter and its deprecation notices.

    The notices (e.g. that `run_simulation` is deprecated) address fedshop's developers, not its users.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "DEPRECATED FEATURE" not in str(record.msg)


_QUIET = _QuietFlower()


def configure_logging(verbose: bool) -> None:
    """Quiet Flower's logs unless ``verbose``; never let a root handler print Flower's lines twice.

    Flower's logger has its own console handler; a library that calls `logging.basicConfig` on import
    (Opacus does) adds a root handler, and propagation would then print every Flower line a second time.
    Quiet: this process keeps Flower's warnings and errors (its deprecation notices aside). The processes
    a simulation starts are quieted by `quiet_simulation_workers`; a SuperLink or SuperNode started by
    `fedshop coordinator`/`merchant` keeps Flower's INFO log: its log file is what an operator reads.
    """
    _state["verbose"] = verbose
    flwr_logger = logging.getLogger(FLOWER_LOGGER)
    flwr_logger.propagate = False
    flwr_logger.removeFilter(_QUIET)
    from flwr.supercore.logger import update_console_handler  # noqa: PLC0415 - reads FLWR_LOG_LEVEL at import

    if "FLWR_LOG_LEVEL" in os.environ:  # the user chose Flower's level: leave it
        return
    update_console_handler(level=logging.INFO if verbose else logging.WARNING)
    if not verbose:
        flwr_logger.addFilter(_QUIET)


@contextmanager
def quiet_simulation_workers() -> Iterator[None]:
    """While a simulation runs, its Ray actors read FLWR_LOG_LEVEL=ERROR (unless -v or the user set a level).

    That drops their teardown warnings ("Manually terminating ClientAppActor") but keeps a shop's errors.
    The variable is restored afterwards, so processes started later in this process are not affected.
    """
    if _state.get("verbose") or "FLWR_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["FLWR_LOG_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        os.environ.pop("FLWR_LOG_LEVEL", None)


def is_verbose() -> bool:
    """True when the command runs with `fedshop -v`."""
    return bool(_state["verbose"])


def duration(seconds: float) -> str:
    """'1:05' for 65 s, '1:02:03' past an hour."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Line:
    """Per-label state of the plain-line progress."""

    start: float
    done: int = 0
    total: int = 0
    status: str = ""
    first_done: int | None = None  # the first step seen and when: the rate between steps leaves out start-up
    first_time: float = 0.0

    def eta(self, now: float) -> float | None:
        """Seconds left at the pace so far (from the second step on, the pace since the first)."""
        if not 0 < self.done < self.total:
            return None
        if self.first_done is not None and self.done > self.first_done:
            pace = (now - self.first_time) / (self.done - self.first_done)
        else:
            pace = (now - self.start) / self.done
        return pace * (self.total - self.done)


@dataclass
class StepProgress:
    """Progress of labelled tasks (a run's rounds, a shop's epochs): a Rich bar or one line per step.

    ``every`` throttles the plain lines: a label prints when it finishes and otherwise at most once every
    ``every`` seconds (0 = every step: a line per federated round).
    """

    console: Console
    unit: str = "step"
    every: float = 0.0
    transient: bool = False
    _bar: Progress | None = None
    _tasks: dict[str, TaskID] = field(default_factory=dict)
    _lines: dict[str, _Line] = field(default_factory=dict)
    _last_print: float = float("-inf")

    @property
    def live(self) -> bool:
        """True when a Rich bar is drawn (a terminal), False for plain lines."""
        return self._bar is not None

    def start(self, label: str, total: int, status: str = "", unit: str | None = None) -> None:
        """Show ``label`` at 0/``total`` before its first step ends (e.g. while Ray starts)."""
        self._lines.setdefault(label, _Line(start=time.monotonic(), total=total, status=status))
        if self._bar is not None:
            if label not in self._tasks:
                self._tasks[label] = self._bar.add_task(label, total=total, status=status, unit=unit or self.unit,
                                                        eta="")
            return
        self._print(f"{label}: {status}" if status else f"{label}: started")

    def update(self, label: str, done: int, total: int, status: str = "", unit: str | None = None) -> None:
        """``label`` has finished ``done`` of ``total`` steps (``unit``s); ``status`` is a short note (metrics)."""
        unit = unit or self.unit
        now = time.monotonic()
        line = self._lines.get(label)
        if line is None or done < line.done:  # a new label, or the same label started again (next seed)
            line = self._lines[label] = _Line(start=now)
        line.done, line.total, line.status = done, total, status
        if line.first_done is None and done > 0:
            line.first_done, line.first_time = done, now
        left = line.eta(now)
        if self._bar is not None:  # our ETA, not Rich's: Rich's needs several steps within 30 s
            fields = {"status": status, "unit": unit, "eta": f"ETA {duration(left)}" if left is not None else ""}
            if label not in self._tasks:
                self._tasks[label] = self._bar.add_task(label, total=total, **fields)
            self._bar.update(self._tasks[label], completed=done, total=total, **fields)
            return
        if done < total and now - self._last_print < self.every:
            return
        eta = f", ETA {duration(left)}" if left is not None else ""
        note = f"  {status}" if status else ""
        self._print(f"{label}: {unit}s done {done}/{total} (elapsed {duration(now - line.start)}{eta}){note}")

    def note(self, text: str) -> None:
        """A line that stays (e.g. 'local (seed 0) finished in 12 s'), above the bar in a terminal."""
        self.console.print(text, highlight=False, soft_wrap=True)

    def _print(self, text: str) -> None:
        self._last_print = time.monotonic()
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    def __enter__(self) -> StepProgress:
        if self.console.is_terminal:
            # The status (live metrics) gets what is left of the line and is cut first, never the counts.
            fixed = [Column(no_wrap=True) for _ in range(5)]
            status = Column(no_wrap=True, overflow="ellipsis", max_width=max(12, self.console.width - 90))
            self._bar = Progress(TextColumn("[bold]{task.description}", table_column=fixed[0]),
                                 BarColumn(bar_width=20, table_column=fixed[1]),
                                 TextColumn("{task.fields[unit]}s done {task.completed}/{task.total}",
                                            table_column=fixed[2]),
                                 TimeElapsedColumn(table_column=fixed[3]),
                                 TextColumn("{task.fields[eta]}", table_column=fixed[4]),
                                 TextColumn("{task.fields[status]}", table_column=status),
                                 console=self.console, transient=self.transient)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@contextmanager
def step_progress(console: Console, *, unit: str = "step", every: float = 0.0, transient: bool = False
                  ) -> Iterator[StepProgress]:
    """`StepProgress` as a context manager."""
    with StepProgress(console, unit=unit, every=every, transient=transient) as bar:
        yield bar


def print_verdict(console: Console, lines: Sequence[str]) -> None:
    """The run's closing lines (`summary.verdict_lines`), set off by a rule."""
    console.rule("verdict", style="dim")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
