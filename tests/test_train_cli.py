"""`fedshop train-local` / `train-central`: run directory contents and exit code 2 on a bad scenario."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from shared.scenario import SCENARIO_DIR
from simulations.commands import train
from simulations.rundir import METRIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
MOVIELENS = REPO.parent / "shared" / "data" / "movielens-100k"
TINY_MODEL = ["model.embed_dim=8", "model.n_experts=2", "model.expert_dim=16", "model.tower_dim=8"]
TINY_SCENARIO = """
name = "tiny"
seed = 0

[data]
source = "synthetic"

[data.synthetic]
n_shops = 2
n_late_joiners = 1
max_impressions = 1500
min_impressions = 800
n_small_shops = 1
late_joiner_impressions = 600
days = 20
base_ctr = 0.15

[features]
hash_buckets = 512
product_buckets = 1024
history_len = 5
sampled_negatives = 20

[model]
weighting = "fixed"

[train]
batch_size = 256
lr = 0.003

[federation]
rounds = 1
"""

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """A root app with only the train commands (a callback keeps it a command group, as in the real CLI)."""
    root = typer.Typer()
    root.callback()(lambda: None)
    train.register(root)
    return root


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    """The tiny scenario as a TOML file."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SCENARIO, encoding="utf-8")
    return path


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.mark.parametrize(("command", "method"), [("train-local", "local"), ("train-central", "central")])
def test_train_command_writes_run_directory(app: typer.Typer, scenario_file: Path, tmp_path: Path,
                                            command: str, method: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [command, str(scenario_file), "--epochs", "2", "--run-dir", str(out),
                                 *_sets(*TINY_MODEL, "train.lr=0.01")])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert config["command"] == command and config["epochs"] == 2
    assert config["scenario"]["train"]["lr"] == 0.01 and config["scenario"]["model"]["embed_dim"] == 8
    versions = json.loads((out / "versions.json").read_text(encoding="utf-8"))
    assert versions["git_commit"] and versions["versions"]["torch"].startswith("2.")
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert set(metrics["method"]) == {method}
    assert set(metrics["round"]) == {1, 2}
    assert set(metrics["shop"]) == {"shop_00", "shop_01"}  # the late joiner is not trained here
    assert {"val", "test"} <= set(metrics["split"])
    assert {"ctr", "ranking"} <= set(metrics["task"])
    aucs = metrics[(metrics["task"] == "ctr") & (metrics["metric"] == "auc")]["value"]
    assert len(aucs) and aucs.between(0, 1).all()
    assert "run directory" in result.output and not list(out.glob("*.tmp*"))


def test_bad_scenario_exits_2_with_a_clear_message(app: typer.Typer, scenario_file: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = runner.invoke(app, ["train-local", str(scenario_file), "--run-dir", str(out),
                                 *_sets("model.embed_dims=8")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "embed_dims" in message and "[model]" in message and "Fix" in message
    assert not out.exists(), "nothing may be written for a bad scenario"
    missing = runner.invoke(app, ["train-central", str(tmp_path / "absent.toml"), "--run-dir", str(out)])
    assert missing.exit_code == 2 and "absent.toml" in " ".join(missing.output.split())


def test_movielens_region_scenario_runs(app: typer.Typer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = SCENARIO_DIR / "movielens-region.toml"
    if not scenario.exists():
        pytest.skip(f"{scenario} is not written yet")
    if not MOVIELENS.exists():
        pytest.skip(f"MovieLens-100K not at {MOVIELENS} (../shared/data is not shipped with the repo)")
    monkeypatch.setenv("FEDSHOP_MOVIELENS", str(MOVIELENS))
    out = tmp_path / "ml"
    result = runner.invoke(app, ["train-local", "movielens-region", "--epochs", "1", "--run-dir", str(out),
                                 *_sets(*TINY_MODEL, "features.hash_buckets=512",
                                        "features.product_buckets=2048", "features.history_len=5",
                                        "train.batch_size=1024", "train.max_steps=15")])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["shop"].nunique() >= 2
    ranking = metrics[(metrics["task"] == "ranking") & (metrics["split"] == "test")]
    assert {"hr@10", "ndcg@10", "hr@10_s99", "ndcg@10_s99"} <= set(ranking["metric"])
    assert ranking["value"].between(0, 1).all()
