"""Start, wait for and stop the long-running Flower processes (SuperLink, SuperNode) by PID.

Each process runs in its own session, so stopping its process group also stops the SuperExec and
ClientApp/ServerApp children Flower spawns, and never touches anything else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.atomic import atomic_write_text


class ProcessStartError(RuntimeError):
    """A Flower process exited or never became ready; the message carries the end of its log."""


@dataclass
class ProcessRecord:
    """What `start_process` writes beside the log so `stop` can find the process later."""

    pid: int
    name: str
    command: list[str]
    log: str


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_process(name: str, command: list[str], *, log_path: str | Path, record_path: str | Path,
                  env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a new session with output to ``log_path``; record its PID in ``record_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    record = ProcessRecord(proc.pid, name, list(command), str(log_path))
    atomic_write_text(record_path, json.dumps(asdict(record), indent=2))
    return proc


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return not Path("/proc/self").exists()  # exited between the two checks (where /proc exists)
    except OSError:
        return True


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, log_path: str | Path,
               what: str) -> None:
    """Poll ``ready()`` until true; raise with the log tail when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessStartError(f"{what} exited with code {proc.returncode}. Log {log_path}:\n"
                                    f"{log_tail(log_path)}")
        if ready():
            return
        time.sleep(0.1)
    raise ProcessStartError(f"{what} not ready after {timeout:.0f}s. Log {log_path}:\n{log_tail(log_path)}")


def read_record(record_path: str | Path) -> ProcessRecord:
    """The record `start_process` wrote, with a clear error when there is none."""
    path = Path(record_path)
    try:
        return ProcessRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no process record. Fix: start the process first (nothing to stop)") \
            from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: unreadable process record ({err}). Fix: stop the process by hand and delete "
                         "this file") from err


def _is_same_process(record: ProcessRecord) -> bool:
    """Guard against a recycled PID: the running command line must still be the one we started."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(record.pid)  # no /proc (macOS): trust the record
    exe = Path(record.command[0]).name.encode()
    return any(Path(part.decode(errors="replace")).name.encode() == exe for part in cmdline[:2])


def recorded_running(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs: its PID is alive and not recycled by another program."""
    return pid_alive(record.pid) and _is_same_process(record)


def descendants(pid: int) -> list[int]:
    """PIDs of all processes below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_pid(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Signal the process group led by ``pid``, escalate to SIGKILL after ``timeout``; True if it was running.

    Flower detaches some children into their own session (the SuperLink's SuperExec and the ServerApp
    it launches), so those are found by parent PID and killed too.
    """
    if not pid_alive(pid):
        return False
    below = descendants(pid)
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, sig)
    if not _wait_gone(pid, timeout):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # A killed process can linger in uninterruptible I/O on a loaded machine; callers restart at
        # once and must not find the old PID still running.
        _wait_gone(pid, timeout)
    # Children that outlived their leader (ClientApp processes) belong to the same group.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Reap and poll ``pid`` until it is gone or ``timeout`` seconds pass; True if it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_recorded(record_path: str | Path, *, timeout: float = 10.0) -> bool:
    """Stop the process named in ``record_path`` (if it is still ours) and delete the record."""
    record = read_record(record_path)
    stopped = False
    if recorded_running(record):
        stopped = stop_pid(record.pid, timeout=timeout)
    Path(record_path).unlink(missing_ok=True)
    return stopped
