"""Every command that runs a federation or trains ends a failed run with one message and an exit code.

`RunFailed` (every round skipped), `RunStopped`, a `ScenarioError` and any other run-time error
(a diverged model) must never reach the user as a traceback (simulations/exits.py has the table).
Most cases stand the runner in with one that raises; two run for real: a federation whose every
round is skipped (`fedshop compare` in a subprocess) and a diverging local training (`train-local`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flower_harness import TINY, tiny_scenario, write_scenario
from typer.testing import CliRunner

import simulations.commands.compare as compare_cmd
import simulations.commands.simulate as simulate_cmd
import simulations.commands.train as train_cmd
import simulations.commands.transfer as transfer_cmd
import simulations.deploy.coordinator as coordinator
import simulations.privacy.run as privacy_run
from shared.scenario import ScenarioError
from simulations.cli import app
from simulations.deploy.coordinator import RunOutcome
from simulations.federated import RunFailed, RunStopped

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAILED = "every round (1-2) was skipped, none updated the model. Fix: check the left-out shops' logs"

# command -> (module, name of the runner it calls, extra arguments)
COMMANDS = {
    "simulate": (simulate_cmd, "run_federated", ["--rounds", "2"]),
    "compare": (compare_cmd, "run_comparison", ["--rounds", "2", "--methods", "fedshop"]),
    "train-local": (train_cmd, "run_local_only", []),
    "train-central": (train_cmd, "run_central", []),
    "transfer": (transfer_cmd, "run_transfer", []),
    "privacy": (privacy_run, "run_privacy_eval", ["--small"]),
}
# what the runner raises -> (exit code, what the output must say)
FAILURES = {
    "run-failed": (RunFailed(FAILED), 1, "run failed: every round (1-2) was skipped"),
    "run-stopped": (RunStopped("the privacy budget is spent"), 3, "run stopped: the privacy budget is spent"),
    "scenario-error": (ScenarioError("scenario.toml: train.lr = nan: input should be finite. Fix: ..."), 2,
                       "error: scenario.toml: train.lr = nan"),
    "diverged": (ValueError("y_score contains NaN; fix the model output"), 1, "error: y_score contains NaN"),
    "disk-full": (OSError(28, "No space left on device"), 1, "No space left on device"),
}


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("failing") / "tiny.toml")


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_that_cannot_finish_is_a_message_and_an_exit_code(command, failure, tiny_toml, tmp_path, monkeypatch):
    module, name, extra = COMMANDS[command]
    exc, code, says = FAILURES[failure]

    def failing(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr(module, name, failing)
    where = ["--runs", str(tmp_path)] if command == "privacy" else ["--run-dir", str(tmp_path / "run")]
    result = runner.invoke(app, [command, str(tiny_toml), *where, *extra])
    assert result.exit_code == code, result.output
    assert says in _flat(result.output), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, type(exc)), result.output


def test_verbose_adds_the_traceback_under_the_message(tiny_toml, tmp_path, monkeypatch):
    def failing(*_args, **_kwargs):
        raise ValueError("y_score contains NaN")

    monkeypatch.setattr(train_cmd, "run_local_only", failing)
    result = runner.invoke(app, ["-v", "train-local", str(tiny_toml), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "error: y_score contains NaN" in result.output
    assert "Traceback" in result.output and "failing" in result.output


def test_coordinator_run_says_why_the_run_failed(tiny_toml, tmp_path, monkeypatch):
    """`flwr run` exits 0 on a failed run; the command reads the ServerApp's reason and exits 1."""

    def failed_run(_home, run_config, **_kwargs):
        run_dir = Path(str(run_config["run-dir"]))
        (run_dir / "failed.txt").write_text(FAILED + "\n", encoding="utf-8")
        return RunOutcome(7, "finished:failed", str(run_dir))

    monkeypatch.setattr(coordinator, "submit_run", failed_run)
    result = runner.invoke(app, ["coordinator", "run", str(tiny_toml), "--home", str(tmp_path / "home"),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert "run 7: finished:failed" in text and "run failed: every round (1-2) was skipped" in text
    assert "Traceback" not in result.output


def test_train_local_that_diverges_says_so_without_a_traceback(tiny_toml, tmp_path):
    """A learning rate of 1e30 is a valid setting, but the model's scores become NaN at the first evaluation."""
    result = runner.invoke(app, ["train-local", str(tiny_toml), "--run-dir", str(tmp_path / "run"),
                                 "--set", "train.lr=1e30", "--set", "federation.rounds=1"])
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "NaN" in result.output and "Traceback" not in result.output


def test_compare_whose_every_round_is_skipped_exits_1_without_a_traceback(tmp_path):
    """For real, in a subprocess (the shops' own logs included): every update is NaN, so no round counts."""
    settings = {**TINY, "federation.min_shops": 3, "federation.max_steps": 2, "federation.engine": "pool",
                "federation.workers": 1, "train.lr": 1e30}
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={value!r}".replace("'", '"'))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDSHOP_TORCH_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "compare", "default", "--methods", "fedshop",
                           "--rounds", "2", "--run-dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "run failed: every round (1-2) was skipped" in _flat(output), output
    assert "NaN" in output and "Traceback" not in output, output


# command-line numbers out of range: (command, option, value, its runner's module and name or None)
BAD_OPTIONS = [
    ("simulate", "--rounds", "0", simulate_cmd, "run_federated"),  # used to run the scenario's 10 rounds
    ("simulate", "--rounds", "-3", simulate_cmd, "run_federated"),  # used to blame join_round
    ("train-local", "--epochs", "0", train_cmd, "run_local_only"),  # used to train the default epochs
    ("train-local", "--epochs", "-2", train_cmd, "run_local_only"),  # used to end in a KeyError traceback
    ("train-central", "--epochs", "0", train_cmd, "run_central"),
    ("transfer", "--rounds", "0", transfer_cmd, "run_transfer"),
    ("transfer", "--workers", "0", transfer_cmd, "run_transfer"),
    ("transfer", "--max-periods", "0", transfer_cmd, "run_transfer"),
    ("transfer", "--patience", "0", transfer_cmd, "run_transfer"),
    ("transfer", "--seeds", "-1", transfer_cmd, "run_transfer"),
    ("privacy", "--rounds", "-1", privacy_run, "run_privacy_eval"),
    ("privacy", "--steps", "-1", privacy_run, "run_privacy_eval"),
    ("privacy", "--dpsgd-noise", "-1", privacy_run, "run_privacy_eval"),  # used to fail late, naming a class
    ("privacy", "--seed", "-1", privacy_run, "run_privacy_eval"),  # used to fail late: "expected non-negative"
    ("privacy", "--shadow-shops", "-1", privacy_run, "run_privacy_eval"),
]


@pytest.mark.parametrize(("command", "option", "value", "module", "name"), BAD_OPTIONS,
                         ids=[f"{c}{o}={v}" for c, o, v, _m, _n in BAD_OPTIONS])
def test_an_out_of_range_option_is_refused_before_anything_runs(command, option, value, module, name,
                                                                  tiny_toml, tmp_path, monkeypatch):
    """A count of 0 or below is never read as 'the default' or passed on to fail later: exit 2 naming it."""
    ran = []
    monkeypatch.setattr(module, name, lambda *a, **k: ran.append(a))
    where = ["--runs", str(tmp_path / "runs")] if command == "privacy" else ["--run-dir", str(tmp_path / "run")]
    result = runner.invoke(app, [command, str(tiny_toml), *where, option, value])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert option in text and value in text and "not in the range" in text, result.output
    assert "Traceback" not in result.output and not ran
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


MERCHANT = ["merchant", "start", "--shop-dir", "s", "--state-dir", "st", "--superlink", "127.0.0.1:1", "--ca", "c",
            "--key", "k", "--trusted-entities", "t"]


@pytest.mark.parametrize(("args", "option"), [
    (["coordinator", "run", "--home", "h", "--rounds", "-1"], "--rounds"),
    (["coordinator", "start", "--home", "h", "--port-base", "-1"], "--port-base"),
    (["coordinator", "register", "k.pub", "--home", "h", "--shop-index", "-1"], "--shop-index"),
    ([*MERCHANT, "--retry-for", "-5"], "--retry-for"),
    ([*MERCHANT, "--port", "70000"], "--port"),
    ([*MERCHANT, "--shop-index", "-1"], "--shop-index"),
])
def test_deployment_options_out_of_range_are_refused(args, option, tmp_path, monkeypatch):
    """The deployment commands refuse negative rounds, ports, shop indexes and retry times by name."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert option in text and "not in the range" in text and "Traceback" not in result.output, result.output
    assert not list(tmp_path.iterdir())
