"""`flower-supernode` with a heartbeat interval and signed-app checks: ``python -m ... SECONDS -- SUPERNODE-ARGS``.

flwr 1.42 sends the heartbeat interval in each SuperNode's activation and heartbeat requests, and the
SuperLink accepts any value in [10 s, 1800 s], holding a silent node "online" for two intervals.
`flower-supernode` itself always sends 30 s, so after a crash the SuperLink waits up to 60 s before it
lets the merchant back in and stops waiting for its reply. Flower has no flag for it; this launcher sets
the module constant the SuperNode reads before starting Flower's own entry point, so a merchant can
choose faster crash detection (one small request every few seconds) without patching Flower.

With ``--trusted-entities`` among the SuperNode's arguments, the launcher also hands each new run's
``app-signature`` (run config, written by the coordinator; see `simulations.deploy.app_signing`) to Flower
as the FAB's verification record, which flwr 1.42's SuperLink leaves empty for apps not from Flower Hub.
Flower's own check (`_verify_fab`) then verifies it against the trusted keys and answers an unsigned or
wrongly signed app with an error reply instead of running it; this launcher adds one log line saying why.

The SuperNode pulls a message's objects (arrays) from the SuperLink with an exponential back-off that
starts at 1 s (Flower's ``PULL_INITIAL_BACKOFF``, a default argument of ``pull_objects``, no flag or env
var): the ServerApp pushes the objects just after the message, so the first pull often finds one missing
and the node then sleeps 1-2 s. It then waits for the ClientApp's reply in 0.5 s steps. The launcher
applies `shared.pull_backoff` (``FEDSHOP_PULL_BACKOFF``, default 0.02 s doubling to 0.25 s;
``FEDSHOP_REPLY_POLL``, default 0.01 s); Flower's 500 tries per object still apply.

When no message is waiting the SuperNode sleeps 3 s before asking the SuperLink again (hard-coded in its
loop). While a run is active, i.e. within ``FEDSHOP_ACTIVE_POLL_WINDOW`` seconds (default 60) of its last
message, the launcher asks again before handing "nothing" back to that loop: 0.02 s after the node's last
message (its reply is sent by then), doubling to 0.2 s while nothing arrives (``FEDSHOP_ACTIVE_POLL``,
``FIRST,CAP``, parsed and scheduled by `shared.pull_backoff`; one value = a fixed poll). The next message of
a round is picked up within 0.02-0.2 s instead of up to 3 s; an idle merchant keeps Flower's 3 s polling
(load on the SuperLink only while runs are active).

Rejoining after a coordinator restart: Flower's SuperNode learns its node ID once, when it activates, and
sends it with every request; the SuperLink checks it against the one registered for the signing key and
answers a mismatch with 401, on which Flower's SuperNode stops itself (SIGINT, exit code 1). A coordinator
that keeps its state in memory registers every key again at start, under new node IDs, so each running
SuperNode would stop at its next request. The launcher notes a 401 on any Fleet call after activation and
then, from an exit handler that runs before Flower's clean-up and its 5 s force-exit timer, starts this same
process again (``os.execv``: same PID, so the PID record, `merchant stop` and the
long-lived ClientApp's parent-PID watch stay valid; same arguments and Runtime API port): Flower activates by
the key and gets the new node ID. Until ``FEDSHOP_REJOIN_FOR`` seconds (default 120; 0 = exit as Flower
does) have passed since the refusal, a refused activation (the coordinator not yet up, or not yet
re-registered the key) is retried the same way after 2-5 s. A key that stays refused (unregistered) exits
with a log line saying so. The SuperNode's in-memory messages are lost; the local part is on disk.

With ``FEDSHOP_TIMING_LOG`` set, the launcher also records when the SuperNode received each message, had its
objects, started sending the reply and had sent it (`shared.timing_log`; benchmarks/deployment_timeline.py).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

from shared import pull_backoff
from shared.env_seconds import seconds_from_env
from shared.pull_backoff import PollSchedule
from shared.timing_log import record, timing_enabled

DEFAULT_INTERVAL = 30.0  # flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL in flwr 1.42
# Every module of the SuperNode process that reads the interval at import time.
_READERS = ("flwr.supercore.heartbeat", "flwr.supernode.fleet_http_connection")
ACTIVE_POLL_ENV, ACTIVE_WINDOW_ENV = "FEDSHOP_ACTIVE_POLL", "FEDSHOP_ACTIVE_POLL_WINDOW"
FLOWER_IDLE_SLEEP = 3.0  # the SuperNode loop's sleep after an empty pull (start_client_internal, flwr 1.42)
REJOIN_ENV = "FEDSHOP_REJOIN_FOR"  # seconds a SuperNode refused under its node ID keeps trying to rejoin by key
_REJOIN_STATE_ENV = "_FEDSHOP_REJOIN"  # "DEADLINE,ATTEMPT" carried across re-execs of one rejoin (wall clock)
REJOIN_PAUSES = (2.0, 3.0, 5.0)  # between activation attempts while rejoining, then 5 s


def active_polling(pull: Callable[..., int | None], schedule: PollSchedule, window: float,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Callable[..., int | None]:
    """Wrap the SuperNode's pull: within ``window`` s of the last message, retry after ``schedule``'s waits.

    The schedule restarts at its first wait when a message arrives and doubles to its cap while none does.
    Returns to Flower's loop (and its 3 s sleep) once ``FLOWER_IDLE_SLEEP`` s of retries found nothing,
    so its exit handling still runs at least that often.
    """
    last_message = [-float("inf")]

    def pull_and_store_message(**kwargs: Any) -> int | None:
        give_up = clock() + FLOWER_IDLE_SLEEP
        while True:
            run_id = pull(**kwargs)
            now = clock()
            if run_id is not None:
                last_message[0] = now
                schedule.arrived()
                return run_id
            if now - last_message[0] > window or now >= give_up:
                return None
            sleep(schedule.wait())

    return pull_and_store_message


def install_active_polling() -> None:
    """Make this process's SuperNode poll on $FEDSHOP_ACTIVE_POLL's schedule while a run is active (module doc)."""
    from flwr.supernode import start_client_internal

    schedule = PollSchedule.of(pull_backoff.active_poll_from_env())
    window = seconds_from_env(ACTIVE_WINDOW_ENV, 60.0, 0.0, 3600.0, "unset it (60 s)")
    if window == 0:  # Flower's own polling: nothing to patch, so no check of its internals either
        return
    original = getattr(start_client_internal, "_pull_and_store_message", None)
    if original is None:
        raise RuntimeError("flwr.supernode.start_client_internal changed: this flwr version is not the one fedshop "
                           f"was built on. Fix: install flwr==1.42.0 or set {ACTIVE_WINDOW_ENV}=0")
    start_client_internal._pull_and_store_message = active_polling(original, schedule, window)


def _record(event: str, ids: list[str]) -> None:
    record({"where": "supernode", "event": event, "pid": os.getpid(), "ids": ids, "at": time.time()})


def install_timing() -> None:
    """With $FEDSHOP_TIMING_LOG set, record when each message is received and stored and its reply sent."""
    if not timing_enabled():
        return
    from flwr.supernode import start_client_internal

    pull = getattr(start_client_internal, "_pull_and_store_message", None)
    push = getattr(start_client_internal, "_push_messages", None)
    if pull is None or push is None:
        raise RuntimeError("flwr.supernode.start_client_internal changed: this flwr version is not the one fedshop "
                           "was built on. Fix: install flwr==1.42.0 or unset FEDSHOP_TIMING_LOG")

    @functools.wraps(pull)
    def pull_and_store_message(**kwargs: Any) -> int | None:
        receive, confirm = kwargs["receive"], kwargs["confirm_message_received"]

        def received() -> Any:
            if (result := receive()) is not None:
                _record("received", [result[0].metadata.message_id])
            return result

        def confirmed(run_id: int, message_id: str) -> None:
            confirm(run_id, message_id)
            _record("stored", [message_id])  # every object of the message is in the SuperNode's store

        return pull(**{**kwargs, "receive": received, "confirm_message_received": confirmed})

    @functools.wraps(push)
    def push_messages(**kwargs: Any) -> None:
        send, replied_to = kwargs["send"], []

        def sending(message: Any, *args: Any) -> Any:
            replied_to.append(message.metadata.reply_to_message_id)
            _record("sending", replied_to[-1:])  # the reply was found; pushing it to the SuperLink starts
            return send(message, *args)

        push(**{**kwargs, "send": sending})
        if replied_to:
            _record("sent", replied_to)  # the reply and all its objects are at the SuperLink

    start_client_internal._pull_and_store_message = pull_and_store_message
    start_client_internal._push_messages = push_messages


def check_heartbeat_interval(seconds: float) -> None:
    """Raise ValueError, naming the range, when the SuperLink would refuse ``seconds``."""
    from flwr.common import constant

    low, high = constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL
    if not low <= seconds <= high:
        raise ValueError(f"--heartbeat-interval {seconds:g}: the SuperLink accepts {low}-{high} seconds. "
                         f"Fix: pass a value in that range ({DEFAULT_INTERVAL:g} is Flower's default)")


def apply_heartbeat_interval(seconds: float) -> None:
    """Make this process's SuperNode announce and keep ``seconds`` as its heartbeat interval."""
    check_heartbeat_interval(seconds)
    for name in _READERS:
        module = importlib.import_module(name)
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{name} no longer reads HEARTBEAT_DEFAULT_INTERVAL: this flwr version is not "
                               "the one fedshop was built on. Fix: install flwr==1.42.0 or use the default "
                               "--heartbeat-interval")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def _trusted_entities_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--trusted-entities" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--trusted-entities="):
            return arg.split("=", 1)[1]
    return None


def signed_fab_getter(get_fab: Callable[[str, int], Any], get_run: Callable[[int], Any],
                      trusted: dict[str, str]) -> Callable[[str, int], Any]:
    """Wrap the SuperNode's ``get_fab`` so the FAB carries the run's signature record for Flower to verify."""
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal

    from simulations.deploy.app_signing import SIGNATURE_KEY, AppSignatureError, verification_record

    def get_signed_fab(fab_hash: str, run_id: int) -> Any:
        fab = get_fab(fab_hash, run_id)
        value = str(get_run(run_id).override_config.get(SIGNATURE_KEY, ""))
        fab.verifications = {"valid_license": "Valid"}  # no signer: Flower's check finds no trusted key
        if not value:
            log(ERROR, "fedshop: refusing run %s: its app (FAB %s) is not signed. This merchant runs only apps "
                "signed by a key in its --trusted-entities file, i.e. submitted with `fedshop coordinator run`",
                run_id, fab_hash[:12])
            return fab
        try:
            fab.verifications = verification_record(value)
        except AppSignatureError as err:
            log(ERROR, "fedshop: refusing run %s: %s", run_id, err)
            return fab
        signer = next(k for k in fab.verifications if k != "valid_license")
        if signer not in trusted:
            log(ERROR, "fedshop: refusing run %s: its app is signed by key %s, which is not in this merchant's "
                "--trusted-entities (%s)", run_id, signer, ", ".join(sorted(trusted)))
        elif not start_client_internal._verify_fab(fab, trusted):
            log(ERROR, "fedshop: refusing run %s: the signature of trusted key %s does not match this FAB "
                "(the app was changed after signing)", run_id, signer)
        else:
            log(INFO, "fedshop: run %s: app FAB %s signed by trusted key %s", run_id, fab_hash[:12], signer)
        return fab

    return get_signed_fab


def install_signature_check(trusted_path: str) -> None:
    """Make this process's SuperNode give Flower each run's FAB signature record before Flower verifies it."""
    from flwr.supernode import start_client_internal

    from simulations.deploy.app_signing import read_trusted

    trusted = read_trusted(trusted_path)
    original = getattr(start_client_internal, "_pull_and_store_message", None)
    if original is None or not hasattr(start_client_internal, "_verify_fab"):
        raise RuntimeError("flwr.supernode.start_client_internal changed: this flwr version is not the one fedshop "
                           "was built on. Fix: install flwr==1.42.0")

    def pull_and_store_message(**kwargs: Any) -> Any:
        kwargs["get_fab"] = signed_fab_getter(kwargs["get_fab"], kwargs["get_run"], trusted)
        return original(**kwargs)

    start_client_internal._pull_and_store_message = pull_and_store_message


class Admission:
    """What the SuperLink said to this process's SuperNode: activated it, then refused its node ID (401)."""

    def __init__(self) -> None:
        self.activated = False
        self.refused = False  # a 401 after activation: the node ID is no longer the key's
        self.activation_refused = False  # the SuperLink answered the activation with an error (key unknown)


def install_rejoin_watch() -> Admission:
    """Note, on Flower's Fleet client, the activation and a later 401 (node ID no longer the key's)."""
    import httpx
    from flwr.supernode.fleet_http_client import FleetHttpClient

    original = getattr(FleetHttpClient, "_unary_unary", None)
    if original is None:
        raise RuntimeError("flwr.supernode.fleet_http_client changed: this flwr version is not the one fedshop was "
                           f"built on. Fix: install flwr==1.42.0 or set {REJOIN_ENV}=0")
    admission = Admission()

    @functools.wraps(original)
    def unary(self: Any, *, path: str, **kwargs: Any) -> Any:
        try:
            response = original(self, path=path, **kwargs)
        except httpx.HTTPStatusError as err:
            if err.response.status_code == httpx.codes.UNAUTHORIZED and admission.activated:
                admission.refused = True
            if path.endswith("/activate-node"):
                admission.activation_refused = True
            raise
        if path.endswith("/activate-node"):
            admission.activated = True
        return response

    FleetHttpClient._unary_unary = unary
    return admission


def rejoin_state(environ: Mapping[str, str]) -> tuple[float, int] | None:
    """(deadline, attempt) of a rejoin in progress, from ``environ``; None when there is none."""
    raw = environ.get(_REJOIN_STATE_ENV, "")
    try:
        deadline, attempt = float(raw.split(",")[0]), int(raw.split(",")[1])
    except (ValueError, IndexError):
        return None
    return deadline, attempt


def _restart_self(argv: list[str], deadline: float, attempt: int) -> None:
    """Start this launcher again in this process (same PID), carrying the rejoin's deadline and attempt."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_REJOIN_STATE_ENV] = f"{deadline:.3f},{attempt}"
    os.execv(sys.executable, [sys.executable, "-m", "simulations.deploy.supernode_launcher", *argv])


def main(argv: list[str] | None = None) -> int:
    """Apply the interval, then hand the remaining arguments to Flower's `flower-supernode`."""
    args = list(sys.argv[1:] if argv is None else argv)
    launcher_args = list(args)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m simulations.deploy.supernode_launcher SECONDS -- FLOWER-SUPERNODE-ARGS",
              file=sys.stderr)
        return 2
    try:
        apply_heartbeat_interval(float(args[0]))
        pull_backoff.apply_from_env(pull_backoff.SUPERNODE)
        pull_backoff.apply_reply_poll()
        if (trusted := _trusted_entities_path(args[2:])) is not None:
            install_signature_check(trusted)
        install_active_polling()
        install_timing()
        rejoin_for = seconds_from_env(REJOIN_ENV, 120.0, 0.0, 86400.0, "unset it (120 s)")
        admission = install_rejoin_watch() if rejoin_for > 0 else None
    except (ValueError, RuntimeError, FileNotFoundError) as err:  # FlowerInterfaceError is a RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    rejoining = rejoin_state(os.environ)
    os.environ.pop(_REJOIN_STATE_ENV, None)
    if rejoining and rejoining[1] > 0:  # a refused activation before: give the coordinator time
        time.sleep(REJOIN_PAUSES[min(rejoining[1] - 1, len(REJOIN_PAUSES) - 1)])
    if admission is not None:
        install_rejoin_on_exit(admission, rejoining, rejoin_for, launcher_args)
    sys.argv = ["flower-supernode", *args[2:]]
    return int(flower_supernode() or 0)


def install_rejoin_on_exit(admission: Admission, rejoining: tuple[float, int] | None, rejoin_for: float,
                           launcher_args: list[str]) -> None:
    """Register, first of Flower's exit handlers, the restart that rejoins (or the line saying it gave up).

    It runs before Flower starts its 5 s force-exit timer and before its own clean-up (Runtime API server
    stop, deactivation), so the `exec` cannot be cut short by that timer; `exec` closes the sockets anyway.
    """
    from flwr.common.logger import log
    from flwr.supercore.exit import add_exit_handler

    def rejoin() -> None:
        if admission.refused:
            log(WARNING, "fedshop: the SuperLink no longer accepts this SuperNode's node ID (the coordinator "
                "restarted and registered its key again, or unregistered it): rejoining by its key for up to "
                "%g s (%s)", rejoin_for, REJOIN_ENV)
            _restart_self(launcher_args, time.time() + rejoin_for, 0)
        if rejoining and admission.activation_refused and not admission.activated:  # not a stop signal
            if time.time() < rejoining[0]:
                _restart_self(launcher_args, rejoining[0], rejoining[1] + 1)
            log(ERROR, "fedshop: this SuperNode's key is still refused after %s attempts to rejoin: the "
                "coordinator did not register it again (it was unregistered, or the coordinator is down). Fix: "
                "check `fedshop coordinator status` on the coordinator, then `fedshop merchant start` again",
                rejoining[1] + 1)

    add_exit_handler(rejoin, run_before_force_exit=True)


if __name__ == "__main__":
    sys.exit(main())
