"""What a user sees: Flower's log once and only with -v, progress lines with an ETA off a terminal, a verdict."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flower_harness import tiny_scenario, write_scenario
from rich.console import Console
from typer.testing import CliRunner

from simulations import console as console_mod
from simulations.cli import app
from simulations.console import StepProgress, duration

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Flower logs INFO, WARNING and a deprecation notice after a library has called logging.basicConfig (as
# Opacus does on import); prints what reached stderr.
LOGS = """
import logging, sys
{setup}
logging.basicConfig(level=logging.INFO)
from flwr.supercore.logger import log, warn_deprecated_feature
log(logging.INFO, "probe-info")
log(logging.WARNING, "probe-warning")
warn_deprecated_feature("probe-deprecated")
"""


def _stderr(setup: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FLWR_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", LOGS.format(setup=setup)], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO)}, timeout=120, check=True)
    return out.stderr


def test_without_the_fix_a_root_handler_prints_flowers_lines_twice() -> None:
    err = _stderr("")  # the positive control: the bug the console fixes is real in this Flower version
    assert err.count("probe-info") == 2 and err.count("probe-warning") == 2


def test_quiet_by_default_keeps_one_copy_of_flowers_warnings_only() -> None:
    err = _stderr("from simulations.console import configure_logging; configure_logging(False)")
    assert "probe-info" not in err and "probe-deprecated" not in err
    assert err.count("probe-warning") == 1


def test_verbose_shows_flowers_info_once() -> None:
    err = _stderr("from simulations.console import configure_logging; configure_logging(True)")
    assert err.count("probe-info") == 1 and err.count("probe-warning") == 1 and "probe-deprecated" in err


def test_quiet_mode_tells_only_a_simulations_workers_to_log_errors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    console_mod.configure_logging(False)
    assert "FLWR_LOG_LEVEL" not in os.environ  # a SuperLink/SuperNode started now keeps Flower's INFO log
    with console_mod.quiet_simulation_workers():
        assert os.environ["FLWR_LOG_LEVEL"] == "ERROR"  # Ray actors inherit it: no teardown warnings
    assert "FLWR_LOG_LEVEL" not in os.environ  # restored for whatever this process starts later
    console_mod.configure_logging(True)
    with console_mod.quiet_simulation_workers():
        assert "FLWR_LOG_LEVEL" not in os.environ  # -v: the workers log as Flower does
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")
    console_mod.configure_logging(False)
    with console_mod.quiet_simulation_workers():
        assert os.environ["FLWR_LOG_LEVEL"] == "DEBUG"  # a level the user chose is left alone


def test_the_server_and_client_apps_do_not_import_opacus_without_dp() -> None:
    code = ("import logging, sys; import server.server_app, server.secure, client.client_app; "
            "print('opacus' in sys.modules, len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["False", "0"], out.stdout + out.stderr


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_line_per_step_with_elapsed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(console_mod.time, "monotonic", clock)
    out = io.StringIO()
    with StepProgress(Console(file=out, force_terminal=False, width=200), unit="round") as bar:
        assert not bar.live
        bar.start("default (fedshop, 3 shops)", 4, status="round 1 running (includes starting Ray)")
        for clock.now, done in ((40.0, 1), (50.0, 2), (60.0, 3), (70.0, 4)):
            bar.update("default (fedshop, 3 shops)", done, 4, status=f"val ctr.auc 0.7{done}")
    lines = out.getvalue().splitlines()
    assert lines == ["default (fedshop, 3 shops): round 1 running (includes starting Ray)",
                     "default (fedshop, 3 shops): rounds done 1/4 (elapsed 0:40, ETA 2:00)  val ctr.auc 0.71",
                     # from the second round on the pace leaves out Ray's start: 10 s a round
                     "default (fedshop, 3 shops): rounds done 2/4 (elapsed 0:50, ETA 0:20)  val ctr.auc 0.72",
                     "default (fedshop, 3 shops): rounds done 3/4 (elapsed 1:00, ETA 0:10)  val ctr.auc 0.73",
                     "default (fedshop, 3 shops): rounds done 4/4 (elapsed 1:10)  val ctr.auc 0.74"]


def test_plain_progress_is_throttled_but_always_prints_a_finished_label(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(console_mod.time, "monotonic", clock)
    out = io.StringIO()
    with StepProgress(Console(file=out, force_terminal=False, width=200), unit="epoch", every=10.0) as bar:
        for clock.now, label, done in ((1, "shop_00", 1), (2, "shop_00", 2), (5, "shop_00", 3), (13, "shop_01", 1),
                                       (16, "shop_01", 2), (17, "shop_01", 3)):
            bar.update(label, done, 3)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "shop_00: epochs done 1/3", "shop_00: epochs done 3/3", "shop_01: epochs done 2/3", "shop_01: epochs done 3/3"]


def test_a_terminal_gets_a_live_bar() -> None:
    with StepProgress(Console(file=io.StringIO(), force_terminal=True), unit="round") as bar:
        bar.update("x", 1, 2)
        assert bar.live


def test_duration_formats_minutes_and_hours() -> None:
    assert [duration(s) for s in (0, 65, 3723.4)] == ["0:00", "1:05", "1:02:03"]


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenario(tiny_scenario(**{"federation.rounds": 2}), tmp_path_factory.mktemp("scn") / "tiny.toml")


def test_train_local_ends_with_a_verdict_and_a_report(tiny_toml: Path, tmp_path: Path) -> None:
    out = tmp_path / "local"
    result = runner.invoke(app, ["train-local", str(tiny_toml), "--epochs", "1", "--run-dir", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    verdict = lines[next(i for i, line in enumerate(lines) if "verdict" in line) + 1:]
    assert 3 <= len(verdict) <= 5, verdict
    assert verdict[0].startswith("local-only on default (3 shops, 1 epoch, seed 0): CTR AUC 0.")
    assert verdict[2].startswith("gap closed: n/a (no oracle in this run")
    assert verdict[-1].startswith(f"report: {out / 'report.html'}")
    assert "shop_00: epochs done 1/1" in result.output  # progress lines off a terminal
    assert "best validation epoch" not in result.output  # the per-shop table is in the report, or with -v
    for name in ("report.html", "summary.md", "plots/final_ctr.png"):
        assert (out / name).exists(), name
    verbose = runner.invoke(app, ["-v", "train-local", str(tiny_toml), "--epochs", "1",
                                  "--run-dir", str(tmp_path / "v")])
    assert verbose.exit_code == 0 and "best validation epoch" in verbose.output


@pytest.mark.slow
def test_simulate_through_a_pipe_prints_progress_lines_and_a_verdict_not_flowers_log(tiny_toml: Path,
                                                                                     tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLWR_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", str(tiny_toml), "--run-dir",
                          str(tmp_path / "sim")], capture_output=True, text=True, timeout=900, check=False,
                         env={**env, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    # Ray 2.55 workers sometimes abort in their own teardown under load (abseil "UnlockSlow is confused",
    # SIGABRT, after the run's result is written; seen in CI 2026-12-05): that upstream dump is not
    # fedshop's or Flower's log, so an aborted worker's lines are left out of the count (and only those).
    aborted = set(re.findall(r"\(pid=(\d+)\)[^\n]*SIGABRT received", text))
    lines = [line for line in text.splitlines()
             if line.strip() and not any(f"(pid={pid})" in line for pid in aborted)]
    assert len(lines) < 20, text  # was ~250 lines for two rounds: Flower's log, every line twice
    assert "INFO" not in text and "DEPRECATED" not in text and "ClientAppActor" not in text, text
    assert "rounds done 1/2 (elapsed" in text and "ETA" in text and "rounds done 2/2" in text
    assert "fedshop on default (3 shops, 2 rounds, seed 0): CTR AUC" in text
    assert "gap closed: n/a (no oracle in this run" in text
    assert (tmp_path / "sim" / "report.html").exists()
