"""The object-pull back-offs and the SuperNode's reply wait of a deployment: one place for values and adapter.

flwr 1.42 pulls a message's objects with `flwr.supercore.inflatable.inflatable_utils.pull_objects` (or
`pull_and_inflate_object_from_tree`, which calls it), retrying a missing object after ``initial_backoff``
seconds, doubling up to ``backoff_cap`` (Flower's `PULL_INITIAL_BACKOFF` = 1 s, `PULL_BACKOFF_CAP` = 10 s,
`PULL_MAX_TRIES_PER_OBJECT` = 500). They are default arguments, bound when flwr is imported: no flag, env
var or config key reaches them, and setting the constants afterwards changes nothing. Three processes of a
round pull objects that were announced a moment before they were pushed, so each usually sleeps its first
back-off once per message:

| env var | process | flwr function bound | fedshop default |
|---|---|---|---|
| FEDSHOP_PULL_BACKOFF | SuperNode | `start_client_internal.pull_objects` | 0.02 s -> 0.25 s |
| FEDSHOP_GRID_PULL_BACKOFF | ServerApp | `http_grid.pull_objects` | 0.02 s -> 0.25 s |
| FEDSHOP_CLIENTAPP_PULL_BACKOFF | ClientApp | `run_clientapp.pull_and_inflate_object_from_tree` | 0.01 -> 0.05 s |

The value is ``INITIAL`` or ``INITIAL,CAP`` in seconds; ``1`` (or ``1,10``) keeps Flower's own back-off and
leaves flwr untouched. The adapter binds the values into the name the caller's module looks up
(`functools.partial` of Flower's own function); Flower's tries per object are unchanged, so the time after
which a missing object is given up on shrinks with the cap (`give_up_seconds`).

FEDSHOP_REPLY_POLL (SuperNode): `start_client_internal._push_messages` waits for the ClientApp's reply, and
then for each of the reply's objects, in hard-coded ``time.sleep(0.5)`` steps. The adapter gives that module
a `time` whose ``sleep(0.5)`` sleeps FEDSHOP_REPLY_POLL seconds instead (default 0.01; ``0.5`` = Flower's,
untouched); every other sleep (the 3 s idle sleep of its loop) passes through unchanged.

FEDSHOP_ACTIVE_POLL (SuperNode, applied by `simulations.deploy.supernode_launcher`): how soon the SuperNode
asks the SuperLink again while a run is active. The same ``FIRST,CAP`` form and a `PollSchedule`: 0.02 s after
a message, doubling to 0.2 s while nothing arrives (default ``0.02,0.2``; one value = a fixed poll, the
behaviour before 2026-12-06). The ServerApp's grid (`server.polling_grid`) and the long-lived ClientApp
(`client.long_lived`) use `PollSchedule` for their polls too.

`check_flower_interface` raises when flwr no longer has these functions, parameters or sleeps
(tests/test_pull_backoff.py runs it), so an upgrade fails loudly at start instead of silently slowing down.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from shared.env_seconds import seconds_from_env

FLOWER_INITIAL, FLOWER_CAP, FLOWER_TRIES = 1.0, 10.0, 500  # flwr.supercore.constant in flwr 1.42
FLOWER_REPLY_POLL = 0.5  # the sleeps of start_client_internal._push_messages in flwr 1.42
LOWEST, HIGHEST = 0.001, 60.0


@dataclass(frozen=True)
class Backoff:
    """An exponential object-pull back-off: first wait ``initial`` s, doubling up to ``cap`` s."""

    initial: float
    cap: float

    @property
    def is_flowers(self) -> bool:
        """Whether this is Flower's own back-off (then flwr is left untouched)."""
        return (self.initial, self.cap) == (FLOWER_INITIAL, FLOWER_CAP)


@dataclass(frozen=True)
class Target:
    """One process's pull: the env var, fedshop's default, and the flwr module attribute it is bound into."""

    env: str
    default: Backoff
    module: str
    attr: str


SUPERNODE = Target("FEDSHOP_PULL_BACKOFF", Backoff(0.02, 0.25), "flwr.supernode.start_client_internal",
                   "pull_objects")
GRID = Target("FEDSHOP_GRID_PULL_BACKOFF", Backoff(0.02, 0.25), "flwr.superlink.grid.http_grid", "pull_objects")
CLIENTAPP = Target("FEDSHOP_CLIENTAPP_PULL_BACKOFF", Backoff(0.01, 0.05), "flwr.supernode.runtime.run_clientapp",
                   "pull_and_inflate_object_from_tree")
TARGETS = (SUPERNODE, GRID, CLIENTAPP)
REPLY_POLL_ENV, DEFAULT_REPLY_POLL = "FEDSHOP_REPLY_POLL", 0.01
REPLY_MODULE = "flwr.supernode.start_client_internal"
# Environment that restores every one of Flower's own waits (benchmarks' "before").
FLOWERS_OWN = {**{t.env: "1" for t in TARGETS}, REPLY_POLL_ENV: str(FLOWER_REPLY_POLL)}


class FlowerInterfaceError(RuntimeError):
    """The installed flwr no longer has what this adapter binds into."""


def _seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _pair(env: str, raw: str, fix: str, bounds: tuple[float, float], cap_of_one: Callable[[float], float]) -> Backoff:
    """``FIRST`` or ``FIRST,CAP`` seconds from ``raw`` (``env``'s value) within ``bounds``, FIRST <= CAP; one value
    gets the cap ``cap_of_one(value)``. Errors name ``env`` and end with ``fix``."""
    try:
        parts = [_seconds(p) for p in raw.split(",")]
    except ValueError:
        raise ValueError(f"{env}={raw!r}: not a number of seconds. {fix}") from None
    if len(parts) == 1:
        parts.append(cap_of_one(parts[0]))
    if len(parts) != 2 or not bounds[0] <= parts[0] <= parts[1] <= bounds[1]:
        raise ValueError(f"{env}={raw!r}: out of range. {fix}")
    return Backoff(parts[0], parts[1])


def backoff_from_env(target: Target, environ: Mapping[str, str] | None = None) -> Backoff:
    """``target``'s back-off from its env var (``INITIAL`` or ``INITIAL,CAP``; ``1`` = Flower's), validated."""
    raw = (os.environ if environ is None else environ).get(target.env, "").strip()
    if not raw:
        return target.default
    fix = (f"Fix: unset it (fedshop's {target.default.initial:g},{target.default.cap:g}), give INITIAL or "
           f"INITIAL,CAP in seconds ({LOWEST:g}-{HIGHEST:g}, INITIAL <= CAP, e.g. 0.05,0.5), or 1 for Flower's")
    # one value of 1 is Flower's own back-off (1 s doubling to 10 s)
    return _pair(target.env, raw, fix, (LOWEST, HIGHEST),
                 lambda one: FLOWER_CAP if one == FLOWER_INITIAL else max(target.default.cap, one))


ACTIVE_POLL_ENV = "FEDSHOP_ACTIVE_POLL"
DEFAULT_ACTIVE_POLL = Backoff(0.02, 0.2)
ACTIVE_POLL_RANGE = (0.005, 3.0)  # 3 s: the SuperNode loop's own sleep after an empty pull


def active_poll_from_env(environ: Mapping[str, str] | None = None) -> Backoff:
    """$FEDSHOP_ACTIVE_POLL (``FIRST,CAP`` s, or one value for a fixed poll; default 0.02,0.2), validated."""
    raw = (os.environ if environ is None else environ).get(ACTIVE_POLL_ENV, "").strip()
    if not raw:
        return DEFAULT_ACTIVE_POLL
    low, high = ACTIVE_POLL_RANGE
    fix = (f"Fix: unset it (fedshop's {DEFAULT_ACTIVE_POLL.initial:g},{DEFAULT_ACTIVE_POLL.cap:g}: poll "
           f"{DEFAULT_ACTIVE_POLL.initial:g} s after a message, doubling to {DEFAULT_ACTIVE_POLL.cap:g} s), or give "
           f"FIRST,CAP in seconds ({low:g}-{high:g}, FIRST <= CAP) or one value for a fixed poll (e.g. 0.2)")
    return _pair(ACTIVE_POLL_ENV, raw, fix, (low, high), lambda one: one)


class PollSchedule:
    """Waits between polls: ``first`` s after something arrived, doubling to ``cap`` s while nothing does."""

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"poll schedule {first:g},{cap:g}: need 0 < first <= cap")
        self.first, self.cap = first, cap
        self._next = cap  # nothing has arrived yet: start relaxed

    @classmethod
    def of(cls, backoff: Backoff) -> PollSchedule:
        """The schedule of a `Backoff` (initial = first wait, cap = cap)."""
        return cls(backoff.initial, backoff.cap)

    def arrived(self) -> None:
        """Something arrived: the next wait is ``first`` again."""
        self._next = self.first

    def wait(self) -> float:
        """The wait before the next poll (doubles the one after it, up to ``cap``)."""
        current = self._next
        self._next = min(current * 2, self.cap)
        return current


def reply_poll_from_env(environ: Mapping[str, str] | None = None) -> float:
    """$FEDSHOP_REPLY_POLL in seconds (default 0.01; 0.5 = Flower's), validated."""
    return seconds_from_env(REPLY_POLL_ENV, DEFAULT_REPLY_POLL, LOWEST, FLOWER_REPLY_POLL,
                            f"unset it (default {DEFAULT_REPLY_POLL:g}) or set {FLOWER_REPLY_POLL:g} for Flower's",
                            environ)


def give_up_seconds(backoff: Backoff, tries: int = FLOWER_TRIES) -> float:
    """Seconds slept before a never-pushed object is given up on (Flower's tries; jitter averages out)."""
    total, delay = 0.0, backoff.initial
    for _ in range(tries - 1):  # the last failed try raises instead of sleeping
        total += delay
        delay = min(delay * 2, backoff.cap)
    return total


def _original(module: ModuleType, attr: str) -> Any:
    current = getattr(module, attr, None)
    return getattr(current, "func", current)  # already bound: Flower's function underneath


def check_flower_interface() -> None:
    """Raise FlowerInterfaceError naming each flwr function, parameter or sleep this adapter relies on that changed."""
    from flwr.supercore import constant

    problems: list[str] = []
    for name, expected in (("PULL_INITIAL_BACKOFF", FLOWER_INITIAL), ("PULL_BACKOFF_CAP", FLOWER_CAP),
                           ("PULL_MAX_TRIES_PER_OBJECT", FLOWER_TRIES)):
        if getattr(constant, name, None) != expected:
            problems.append(f"flwr.supercore.constant.{name}: {getattr(constant, name, 'missing')}, not {expected:g}")
    for target in TARGETS:
        try:
            module = importlib.import_module(target.module)
        except ImportError as err:
            problems.append(f"{target.module}: cannot import ({err})")
            continue
        func = _original(module, target.attr)
        if func is None:
            problems.append(f"{target.module}.{target.attr}: missing")
        elif not {"initial_backoff", "backoff_cap"} <= set(inspect.signature(func).parameters):
            problems.append(f"{target.module}.{target.attr}{inspect.signature(func)}: no initial_backoff/backoff_cap")
    module = importlib.import_module(REPLY_MODULE)
    push = getattr(module, "_push_messages", None)
    if push is None or inspect.getsource(push).count(f"time.sleep({FLOWER_REPLY_POLL})") != 2:
        problems.append(f"{REPLY_MODULE}._push_messages: no longer waits in time.sleep({FLOWER_REPLY_POLL}) steps")
    if not isinstance(getattr(module, "time", None), ModuleType | _ReplyPollTime):
        problems.append(f"{REPLY_MODULE}.time: not the time module")
    if problems:
        raise FlowerInterfaceError("the installed flwr does not offer what shared/pull_backoff.py binds into:\n  "
                                   + "\n  ".join(problems) + "\nFix: install flwr==1.42.0, or set "
                                   + ", ".join(f"{k}={v}" for k, v in FLOWERS_OWN.items()) + " (Flower's waits)")


@functools.cache
def _check_flower_interface_once() -> None:
    """`check_flower_interface`, run once per process: a pass is kept, a failure raises again on the next call."""
    check_flower_interface()


def bind_backoff(target: Target, backoff: Backoff) -> None:
    """Make ``target``'s module call Flower's pull with ``backoff`` (idempotent; Flower's own = unbound)."""
    module = importlib.import_module(target.module)
    func = _original(module, target.attr)
    if backoff.is_flowers:  # undo an earlier binding, if any; nothing else of flwr is relied on
        if func is not None:
            setattr(module, target.attr, func)
        return
    if func is None or not {"initial_backoff", "backoff_cap"} <= set(inspect.signature(func).parameters):
        check_flower_interface()  # raises, naming what changed
    setattr(module, target.attr, functools.partial(func, initial_backoff=backoff.initial, backoff_cap=backoff.cap))


def apply_from_env(target: Target, environ: Mapping[str, str] | None = None) -> Backoff:
    """Read ``target``'s env var and bind it (ValueError naming the variable; FlowerInterfaceError: flwr changed)."""
    backoff = backoff_from_env(target, environ)
    if not backoff.is_flowers:
        _check_flower_interface_once()  # every target in one pass; a target changed since is caught by bind_backoff
    bind_backoff(target, backoff)
    return backoff


class _ReplyPollTime:
    """The `time` module, except that ``sleep(0.5)`` (the reply wait) sleeps ``poll`` seconds."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def sleep(self, seconds: float) -> None:
        """Flower's 0.5 s reply-wait step becomes ``poll``; any other sleep is unchanged."""
        time.sleep(self.poll if seconds == FLOWER_REPLY_POLL else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def apply_reply_poll(environ: Mapping[str, str] | None = None) -> float:
    """Make this process's SuperNode check for the ClientApp's reply every $FEDSHOP_REPLY_POLL s (see module doc)."""
    poll = reply_poll_from_env(environ)
    module = importlib.import_module(REPLY_MODULE)
    if poll == FLOWER_REPLY_POLL:
        module.time = time
        return poll
    _check_flower_interface_once()
    module.time = _ReplyPollTime(poll)
    return poll
