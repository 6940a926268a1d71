"""Process records and stopping by PID (what merchants and the coordinator rely on to restart at once)."""

from __future__ import annotations

import sys
from pathlib import Path

from simulations.deploy.processes import pid_alive, start_process, stop_pid, stop_recorded

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
