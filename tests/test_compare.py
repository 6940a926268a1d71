"""`fedshop compare` on a tiny scenario: files written, same budget for every method, CLI exit codes."""

from __future__ import annotations

import json
import tomllib

import pandas as pd
import pytest
from flower_harness import tiny_scenario, write_scenario
from typer.testing import CliRunner

from simulations.cli import app
from simulations.compare import run_comparison, small_shops_of
from simulations.rundir import METRIC_COLUMNS

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    return write_scenario(tiny_scenario(**{"federation.rounds": 2}), tmp_path_factory.mktemp("scn") / "tiny.toml")


@pytest.fixture(scope="module")
def local_central(tmp_path_factory):
    scenario = tiny_scenario(**{"federation.rounds": 2})
    return run_comparison([scenario], tmp_path_factory.mktemp("cmp") / "run", methods=["local", "central"])


def test_local_and_central_run_on_the_same_budget_and_write_every_artifact(local_central):
    run_dir = local_central.run_dir
    for name in ("config.toml", "versions.json", "metrics.csv", "comparison.csv", "summary.json", "summary.md",
                 "plots/rounds_ctr.png", "plots/final_ctr.png"):
        assert (run_dir / name).exists(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS  # one seed: no seed column
    evaluated = metrics[metrics["split"].isin(["val", "test"])]
    assert set(evaluated["method"]) == {"local", "central"}
    # rounds x local epochs = 2 epochs each, every shop scored by both methods
    assert evaluated.groupby("method")["round"].max().to_dict() == {"local": 2, "central": 2}
    assert evaluated.groupby("method")["shop"].nunique().to_dict() == {"local": 3, "central": 3}
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["methods"] == ["local", "central"] and config["seeds"] == [0]


def test_comparison_csv_and_summary_json_agree(local_central):
    run_dir = local_central.run_dir
    table = pd.read_csv(run_dir / "comparison.csv")
    assert list(table.columns) == ["method", "shop", "task", "metric", "value", "round"]
    summary = json.loads((run_dir / "summary.json").read_text())
    ctr = summary["tasks"]["ctr"]
    auc = table[(table["task"] == "ctr") & (table["metric"] == "auc")]
    assert ctr["mean"]["local"] == pytest.approx(auc[auc["method"] == "local"]["value"].mean())
    assert ctr["mean"]["central"] == pytest.approx(auc[auc["method"] == "central"]["value"].mean())
    assert (ctr["gap_closed"], ctr["gap_status"]) == (None, "missing-method")  # no fedshop run
    assert summary["small_shops"] == small_shops_of(tiny_scenario()) == ["shop_02"]
    assert set(ctr["small_shop_gain"]) == {"central"}


def test_cli_compare_with_two_seeds_adds_a_seed_column(tiny_toml, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["compare", str(tiny_toml), "--methods", "local", "--seeds", "0,1", "--rounds", "1",
                                 "--run-dir", str(out), "--set", "train.batch_size=1024"])
    assert result.exit_code == 0, result.output
    assert "run directory" in result.output and "ctr" in result.output
    table = pd.read_csv(out / "comparison.csv")
    assert sorted(table["seed"].unique()) == [0, 1]
    assert set(pd.read_csv(out / "metrics.csv")["round"]) == {1}  # --rounds 1 -> one epoch
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["scenario"]["train"]["batch_size"] == 1024 and config["seeds"] == [0, 1]


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "local,fedprox"], "unknown method"),
    (["--seeds", "0,x"], "not a list of integers"),
    (["--set", "model.no_such_key=1"], "unknown key"),
])
def test_cli_compare_rejects_bad_input_with_exit_code_2(tiny_toml, tmp_path, args, message):
    result = runner.invoke(app, ["compare", str(tiny_toml), "--run-dir", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


def test_cli_compare_unknown_scenario_exits_2(tmp_path):
    result = runner.invoke(app, ["compare", "no-such-scenario", "--runs", str(tmp_path)])
    assert result.exit_code == 2 and "no scenario named" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_all_four_methods_on_a_tiny_scenario(tmp_path):
    result = run_comparison([tiny_scenario(**{"federation.rounds": 2})], tmp_path / "all")
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    assert set(metrics["method"]) == {"local", "central", "fedavg-all", "fedshop"}
    ctr = result.summary["tasks"]["ctr"]
    assert set(ctr["mean"]) == {"local", "central", "fedavg-all", "fedshop"}
    assert all(0.0 <= v <= 1.0 for v in ctr["mean"].values())
    assert ctr["gap_status"] in {"ok", "no-gap", "oracle-below-local"}
    if ctr["gap_status"] == "ok":
        expected = (ctr["mean"]["fedshop"] - ctr["mean"]["local"]) / (ctr["mean"]["central"] - ctr["mean"]["local"])
        assert ctr["gap_closed"] == pytest.approx(expected)
    for method in ("fedshop", "fedavg-all"):
        assert (result.run_dir / f"{method}-seed0" / "metrics.csv").exists()
    finals = result.final[(result.final["task"] == "ctr") & (result.final["metric"] == "auc")]
    assert finals.groupby("method")["shop"].nunique().to_dict() == {m: 3 for m in ctr["mean"]}
    assert "fedshop" in (result.run_dir / "summary.md").read_text()


def test_cli_compare_exits_1_when_a_method_fails_and_keeps_finished_rows(tiny_toml, tmp_path, monkeypatch):
    # A federation short of shops at run time (a deployment's nodes not answering): settings that cannot run
    # are refused before any run (tests/test_bad_settings.py, tests/test_federation_plan.py).
    from simulations.federated import RunFailed

    def fails(*_args, **_kwargs):
        raise RunFailed("every round (1-1) was skipped: only 1 shop(s) sent a usable update, fewer than "
                        "min-shops=2")

    monkeypatch.setattr("simulations.federated.run_federated", fails)
    out = tmp_path / "fail"
    result = runner.invoke(app, ["compare", str(tiny_toml), "--methods", "local,fedshop", "--rounds", "1",
                                 "--run-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert "min-shops" in " ".join(result.output.split())
    assert set(pd.read_csv(out / "metrics.csv")["method"]) == {"local"}
