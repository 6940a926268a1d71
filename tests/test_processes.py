"""Process records and stopping by PID (what merchants and the coordinator rely on to restart at once)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from simulations.deploy.processes import (
    ProcessRecord,
    pid_alive,
    read_record,
    recorded_running,
    start_process,
    stop_pid,
    stop_recorded,
)
from simulations.deploy.status import _process

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"


def _wait_for_output(log: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "up" not in log.read_text(errors="replace"):
        time.sleep(0.05)


def test_stop_pid_escalates_and_returns_only_when_the_process_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = start_process("stubborn", [sys.executable, "-c", IGNORES_TERM], log_path=log,
                         record_path=tmp_path / "p.json")
    _wait_for_output(log)
    assert pid_alive(proc.pid)
    assert stop_pid(proc.pid, timeout=0.5) is True  # SIGTERM is ignored: escalated to SIGKILL
    assert not pid_alive(proc.pid)
    assert stop_pid(proc.pid) is False  # nothing left to stop


def test_stop_recorded_stops_the_recorded_process_and_removes_the_record(tmp_path: Path) -> None:
    log, record = tmp_path / "p.log", tmp_path / "p.json"
    proc = start_process("sleeper", [sys.executable, "-c", IGNORES_TERM], log_path=log, record_path=record)
    _wait_for_output(log)
    assert stop_recorded(record, timeout=0.5) is True
    assert not pid_alive(proc.pid) and not record.exists()


def test_a_recorded_pid_reused_by_another_program_is_not_running(tmp_path: Path) -> None:
    log, record = tmp_path / "p.log", tmp_path / "p.json"
    proc = start_process("sleeper", [sys.executable, "-c", IGNORES_TERM], log_path=log, record_path=record)
    _wait_for_output(log)
    try:
        assert recorded_running(read_record(record)) and _process(record) == {"running": True, "pid": proc.pid}
    finally:
        stop_pid(proc.pid, timeout=0.5)
    assert not recorded_running(read_record(record)) and not _process(record)["running"]
    # The SuperLink died and the OS gave its PID to another program (here: this test process).
    reused = tmp_path / "reused.json"
    reused.write_text(json.dumps(asdict(ProcessRecord(os.getpid(), "superlink", ["flower-superlink", "--insecure"],
                                                      str(log)))))
    assert pid_alive(os.getpid())
    assert not recorded_running(read_record(reused))
    assert _process(reused) == {"running": False, "pid": os.getpid()}
    assert stop_recorded(reused) is False and pid_alive(os.getpid())  # never signals the other program
