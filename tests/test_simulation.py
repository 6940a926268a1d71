"""End to end on both engines (the pool, `auto`'s choice, and Ray): a 3-shop, 2-round run, and resume after round 1."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
from flower_harness import tiny_scenario

from server.checkpoint import latest_checkpoint
from simulations.federated import run_federated

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["pool", "ray"])
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, engine):
    reports = []
    run_dir = run_federated(tiny_scenario(), tmp_path_factory.mktemp("sim") / "full", rounds=2, engine=engine,
                            progress=lambda report, total: reports.append((report, total)))
    return run_dir, reports


def test_three_shops_two_rounds_write_a_complete_run_directory(full_run):
    run_dir, reports = full_run
    assert [(r.server_round, total) for r, total in reports] == [(1, 2), (2, 2)]
    assert all(set(r.train) == {"shop_00", "shop_01", "shop_02"} and not r.left_out for r, _ in reports)
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["run"]["num-server-rounds"] == 2 and config["scenario"]["data"]["synthetic"]["n_shops"] == 3
    assert config["run"]["engine"] in ("pool", "ray")
    assert (run_dir / "versions.json").exists()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == ["method", "round", "shop", "task", "split", "metric", "value"]
    evaluated = metrics[metrics["split"] != "train"]
    assert set(evaluated["split"]) == {"val", "test"}  # last round is evaluated on test
    assert set(evaluated[evaluated["round"] == 2]["shop"]) == {"shop_00", "shop_01", "shop_02"}
    assert {"ctr", "ranking"} <= set(evaluated["task"])
    auc = evaluated[(evaluated["task"] == "ctr") & (evaluated["metric"] == "auc")]["value"]
    assert auc.between(0, 1).all()
    for shop in ("shop_00", "shop_01", "shop_02"):
        assert (run_dir / "shop-state" / shop / "local_part.pt").exists()
    assert latest_checkpoint(run_dir).server_round == 2


def test_resume_after_round_one_gives_the_same_encoder(full_run, engine, tmp_path):
    run_dir, _ = full_run
    cut = run_federated(tiny_scenario(), tmp_path / "cut", rounds=1, engine=engine)
    assert latest_checkpoint(cut).server_round == 1
    run_federated(tiny_scenario(), cut, rounds=2, resume=True, engine=engine)
    full, resumed = latest_checkpoint(run_dir), latest_checkpoint(cut)
    assert resumed.server_round == 2
    for key, value in full.arrays.items():
        np.testing.assert_allclose(resumed.arrays[key], value, atol=1e-6, rtol=0)
    rounds = pd.read_csv(cut / "metrics.csv").groupby("round").size()
    assert list(rounds.index) == [1, 2]


def test_shared_world_gives_the_same_run_as_building_it_per_process(full_run, engine, tmp_path, monkeypatch):
    run_dir, _ = full_run  # the world was shared: the driver wrote it into the run directory
    assert len(list(run_dir.glob("world-*.pkl"))) == 1
    monkeypatch.setenv("FEDSHOP_WORLD_CACHE", "0")
    alone = run_federated(tiny_scenario(), tmp_path / "alone", rounds=2, engine=engine)
    assert not list(alone.glob("world-*.pkl"))
    shared, built = latest_checkpoint(run_dir), latest_checkpoint(alone)
    for key, value in shared.arrays.items():
        np.testing.assert_allclose(built.arrays[key], value, atol=1e-6, rtol=0)
