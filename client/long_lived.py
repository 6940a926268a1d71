"""One long-lived ClientApp process per SuperNode, serving every message of every run over Flower's Runtime API.

flwr 1.42 runs each ClientApp message in a fresh `flwr-clientapp` process (~4 CPU s of imports: torch,
torch._dynamo, sklearn). With ``flower-supernode --isolation process`` the SuperNode launches nothing and
waits for an external process to acquire its tasks on the Runtime API, the way Flower's own SuperExec does.
This module is that process. Its loop per task is Flower's own steps: ``AcquireTask`` (as `flower-superexec`,
signed with the SuperExec auth secret), then, with the task's token, `run_clientapp.pull_task_input`, the
ClientApp call, `run_clientapp.push_message` and `run_clientapp.push_task_output` (Flower's functions, not
copies). `flwr-clientapp` cannot be kept alive: it takes one ``--token`` and exits after that task.

The ClientApp (the ``clientapp`` component of this checkout's pyproject.toml) is imported once. It serves
a task in-process only when the task's FAB hash equals the hash of the FAB Flower's builder makes from this
checkout at start (the FAB the coordinator signs is built the same way and the build is deterministic). The
SuperNode creates a task only for a FAB that passed its ``--trusted-entities`` signature check, so this
process runs its own code only where that code is, byte for byte, an app the operator signed. Any other
accepted FAB runs as before in a fresh `flwr-clientapp` given the task's token. Per-process caches of the
app (the shop's tensors) are dropped whenever a new run starts. See docs/deployment.md, "Long-lived ClientApp".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.env_seconds import seconds_from_env
from shared.timing_log import record

logger = logging.getLogger("fedshop.long_lived")

APP_DIR = Path(__file__).resolve().parents[1]  # the checkout whose pyproject.toml names the ClientApp
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the Runtime method Flower signs with the SuperExec secret
IDLE_POLL_SECONDS = 0.1  # between AcquireTask calls when no task is waiting (a local loopback request)
# After a minute without tasks the loop asks every $FEDSHOP_CLIENTAPP_IDLE_POLL s (default 0.5) instead: each
# AcquireTask costs CPU in this process and in the SuperNode serving it; the next task makes it fast again.
RELAX_AFTER_SECONDS = 60.0
RELAXED_POLL_ENV, DEFAULT_RELAXED_POLL = "FEDSHOP_CLIENTAPP_IDLE_POLL", 0.5
# The SuperNode hands out a task before it has pulled the message's objects from the SuperLink, so
# pull_task_input often finds them missing and waits Flower's 1 s initial back-off (a default argument,
# no flag): `shared.pull_backoff` binds 0.01 s doubling to 0.05 s in this process only
# ($FEDSHOP_CLIENTAPP_PULL_BACKOFF; "1" keeps Flower's; Flower's tries per object unchanged).

# What this adapter uses from flwr (1.42), with the parameter names it passes. `check_flower_interface`
# raises at start when one is missing or changed, so a Flower upgrade fails loudly instead of mid-round.
FLOWER_INTERFACE: dict[str, dict[str, tuple[str, ...] | None]] = {
    "flwr.supernode.runtime.run_clientapp": {
        "pull_task_input": ("client",),
        "push_message": ("client", "message", "context"),
        "push_task_output": ("client", "context", "sub_status", "details"),
        # what pull_task_input pulls the message's objects with; its back-off: shared.pull_backoff
        "pull_and_inflate_object_from_tree": ("initial_backoff", "backoff_cap"),
    },
    "flwr.supercore.runtime": {"RuntimeHttpClient": None},
    "flwr.supercore.interceptors": {
        "RuntimeTokenHttpInterceptor": ("token",),
        "RuntimeVersionHttpInterceptor": ("component_name",),
        "SuperExecAuthHttpInterceptor": ("master_secret", "protected_methods"),
    },
    "flwr.supercore.heartbeat": {"HeartbeatSender": None, "make_task_heartbeat_fn_http": ("client",)},
    "flwr.supercore.retry": {"make_simple_http_retry_invoker": ()},
    "flwr.supercore.auth.superexec_secret": {"load_superexec_auth_secret": ("secret_file",)},
    "flwr.supercore.app_utils": {"start_parent_process_monitor": ("parent_pid",)},
    "flwr.clientapp.utils": {"get_load_client_app_fn": ("default_app_ref", "app_path", "multi_app")},
    "flwr.cli.build": {"build_fab_from_disk": ("app",)},
    "flwr.common.config": {"get_project_config": ("project_dir",)},
}
# Protobuf fields read or set: message -> field names.
FLOWER_PROTO_FIELDS: dict[str, tuple[str, ...]] = {
    "AcquireTaskRequest": ("supported_task_types",),
    "AcquireTaskResponse": ("task", "token"),
}
TASK_FIELDS = ("task_id", "run_id", "fab_hash", "type")


class FlowerInterfaceError(RuntimeError):
    """The installed flwr no longer offers what this adapter calls."""


def check_flower_interface() -> None:
    """Raise FlowerInterfaceError naming each missing or changed flwr function, class or protobuf field."""
    problems: list[str] = []
    for module_name, names in FLOWER_INTERFACE.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            problems.append(f"{module_name}: cannot import ({err})")
            continue
        for name, params in names.items():
            obj = getattr(module, name, None)
            if obj is None:
                problems.append(f"{module_name}.{name}: missing")
                continue
            if params is None:
                continue
            have = list(inspect.signature(obj).parameters)
            if [p for p in params if p not in have]:
                problems.append(f"{module_name}.{name}{inspect.signature(obj)}: expected parameters {params}")
    from flwr.proto import runtime_pb2, task_pb2
    from flwr.supercore.constant import TaskType

    for message, fields in FLOWER_PROTO_FIELDS.items():
        descriptor = getattr(runtime_pb2, message, None)
        have = set(descriptor.DESCRIPTOR.fields_by_name) if descriptor is not None else set()
        problems += [f"flwr.proto.runtime_pb2.{message}.{f}: missing" for f in fields if f not in have]
    problems += [f"flwr.proto.task_pb2.Task.{f}: missing" for f in TASK_FIELDS
                 if f not in task_pb2.Task.DESCRIPTOR.fields_by_name]
    if getattr(TaskType, "CLIENT_APP", None) != "flwr-clientapp":
        problems.append("flwr.supercore.constant.TaskType.CLIENT_APP: not 'flwr-clientapp'")
    if problems:
        raise FlowerInterfaceError("the installed flwr does not offer what client/long_lived.py uses:\n  "
                                   + "\n  ".join(problems) + "\nFix: install flwr==1.42.0, or start merchants "
                                   "with `fedshop merchant start --isolation subprocess` (a process per message)")


def relaxed_poll_from_env(environ: dict[str, str] | None = None) -> float:
    """$FEDSHOP_CLIENTAPP_IDLE_POLL: seconds between AcquireTask calls after a minute idle (default 0.5), validated."""
    return seconds_from_env(RELAXED_POLL_ENV, DEFAULT_RELAXED_POLL, IDLE_POLL_SECONDS, 5.0,
                            f"unset it (default {DEFAULT_RELAXED_POLL:g}) or set {IDLE_POLL_SECONDS:g} to keep polling "
                            "fast", environ)


def idle_poll_seconds(idle_for: float, relaxed: float = DEFAULT_RELAXED_POLL) -> float:
    """The wait before the next AcquireTask after ``idle_for`` s without a task: fast, then ``relaxed``."""
    return IDLE_POLL_SECONDS if idle_for < RELAX_AFTER_SECONDS else relaxed


def shorten_task_input_backoff() -> None:
    """Make this process's `pull_task_input` retry a missing object after $FEDSHOP_CLIENTAPP_PULL_BACKOFF s."""
    from shared import pull_backoff

    pull_backoff.apply_from_env(pull_backoff.CLIENTAPP)


def local_fab_hash(app_dir: Path = APP_DIR) -> str | None:
    """sha256 of the FAB Flower's builder makes from ``app_dir`` (what `flwr run` submits); None if it cannot."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()
    except Exception as err:  # noqa: BLE001 - any build failure just means "never serve in-process"
        logger.warning("fedshop: cannot build this checkout's FAB (%s): every task runs in a fresh "
                       "flwr-clientapp", err)
        return None


def load_local_app(app_dir: Path = APP_DIR) -> Any:
    """The ClientApp named by ``app_dir``'s pyproject.toml, loaded once with Flower's own loader."""
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_config

    ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
    return get_load_client_app_fn(default_app_ref=ref, app_path=str(app_dir), multi_app=False)("", "", "")


def forget_run_state() -> None:
    """Drop what the ClientApp caches per process (the shop's tensors), so a new run starts clean."""
    from client.local_state import forget_shops

    forget_shops()


@dataclass
class Served:
    """What the loop did, for logs and tests."""

    in_process: int = 0
    fresh_process: int = 0
    runs: list[int] = field(default_factory=list)


@dataclass
class LongLivedClient:
    """The loop: acquire a task, serve it in-process (own signed app) or in a fresh `flwr-clientapp`."""

    runtime_api_address: str
    superexec_secret: bytes | None = None
    parent_pid: int | None = None
    app_dir: Path = APP_DIR
    served: Served = field(default_factory=Served)
    relaxed_poll: float = DEFAULT_RELAXED_POLL
    _app: Any = None
    _fab_hash: str | None = None
    _run_id: int | None = None

    def start(self) -> None:
        """Check Flower's interface, hash this checkout's FAB and import the ClientApp (once)."""
        check_flower_interface()
        shorten_task_input_backoff()
        self._fab_hash = local_fab_hash(self.app_dir)
        if self._fab_hash is not None:
            self._app = load_local_app(self.app_dir)
        logger.info("fedshop: long-lived ClientApp ready (this checkout's FAB %s)",
                    (self._fab_hash or "unavailable")[:12])

    def _acquire_client(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.superexec_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.superexec_secret,
                                                             protected_methods={ACQUIRE_METHOD}))
        return self._client(interceptors)

    def _client(self, interceptors: list[Any]) -> Any:
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(server_address=self.runtime_api_address, insecure=True,
                                                     root_certificates=None, interceptors=interceptors,
                                                     retry_invoker=make_simple_http_retry_invoker())

    def run_forever(self, *, stop: Callable[[], bool] = lambda: False,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> None:
        """Acquire and serve tasks until ``stop()`` is true (or the SuperNode, the parent, exits).

        Between empty AcquireTask calls it waits `idle_poll_seconds` (0.1 s, after a minute idle ``relaxed_poll``).
        """
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.app_utils import start_parent_process_monitor
        from flwr.supercore.constant import TaskType

        if self.parent_pid is not None:
            start_parent_process_monitor(self.parent_pid)
        client = self._acquire_client()
        last_task = clock()
        try:
            while not stop():
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    record({"where": "long_lived", "event": "acquired", "pid": os.getpid(), "at": time.time()})
                    self.serve(res.task, res.token)
                    last_task = clock()
                else:
                    sleep(idle_poll_seconds(clock() - last_task, self.relaxed_poll))
        finally:
            client.close()

    def serve(self, task: Any, token: str) -> None:
        """Serve one acquired task: in this process when its FAB is this checkout's, else in `flwr-clientapp`."""
        if self._app is None or task.fab_hash != self._fab_hash:
            logger.warning("fedshop: run %s: FAB %s is not this checkout's app (%s); running it in a fresh "
                           "flwr-clientapp", task.run_id, task.fab_hash[:12], (self._fab_hash or "none")[:12])
            self._serve_fresh(token)
            self.served.fresh_process += 1
            return
        if task.run_id != self._run_id:
            forget_run_state()  # a new run may bring another scenario, shop data or config
            self._run_id = task.run_id
            self.served.runs.append(task.run_id)
            logger.info("fedshop: run %s: FAB %s is this checkout's signed app: served in-process",
                        task.run_id, task.fab_hash[:12])
        self._serve_in_process(token)
        self.served.in_process += 1

    def _serve_fresh(self, token: str) -> None:
        """Flower's default: one `flwr-clientapp` process for this task (what its SuperExec would start)."""
        exe = shutil.which("flwr-clientapp") or str(Path(sys.executable).with_name("flwr-clientapp"))
        command = [exe, "--runtime-api-address", self.runtime_api_address, "--token", token, "--insecure"]
        if self.parent_pid is not None:
            command += ["--parent-pid", str(self.parent_pid)]
        subprocess.run(command, check=False)  # one task at a time, like the SuperNode's own message loop

    def _serve_in_process(self, token: str) -> None:
        """`flwr-clientapp`'s steps for one task with the already-loaded ClientApp, without exiting."""
        from flwr.app import Context, Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            record({"where": "long_lived", "event": "inputs pulled", "pid": os.getpid(), "at": time.time()})
            # The bytes the SuperNode verified must be this checkout's FAB (hash of the content itself, not
            # the hash the SuperLink announced).
            if (content_hash := hashlib.sha256(fab.content).hexdigest()) != self._fab_hash:
                raise RuntimeError(f"the task's FAB {content_hash[:12]} is not this checkout's app "
                                   f"{(self._fab_hash or '')[:12]}; refusing to run local code for it")
            reply = self._app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - reported to the ServerApp as Flower does, then the next task
            logger.exception("fedshop: ClientApp raised an exception")
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                logger.exception("fedshop: failed to push the reply message")
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m client.long_lived --runtime-api-address HOST:PORT [--parent-pid PID] [--secret-file F]`."""
    parser = argparse.ArgumentParser(description="fedshop's long-lived ClientApp process for one SuperNode "
                                     "started with --isolation process")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (127.0.0.1:PORT)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) does")
    parser.add_argument("--superexec-auth-secret-file", default=None,
                        help="the secret file the SuperNode was given (signs AcquireTask)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [clientapp] %(message)s")
    logging.getLogger().handlers[0].setStream(sys.stdout)
    try:
        from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        loop = LongLivedClient(args.runtime_api_address, superexec_secret=secret, parent_pid=args.parent_pid,
                               relaxed_poll=relaxed_poll_from_env())
        loop.start()
    except (FlowerInterfaceError, RuntimeError, ValueError) as err:  # RuntimeError: shared.pull_backoff's check
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        loop.run_forever()
    except KeyboardInterrupt:  # SIGINT, also raised by Flower's parent monitor when the SuperNode exits
        logger.info("fedshop: long-lived ClientApp stopped (%s)", loop.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
