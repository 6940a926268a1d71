"""Faults in a round: failing, silent and NaN-sending shops are left out; too few shops stop the run."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from flower_harness import TEST_FAULTS, LocalGrid, tiny_scenario, write_scenario

from client import client_app
from server.checkpoint import latest_checkpoint
from server.server_app import FederationSettings, run_federation


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("faults") / "scenario.toml")


def _run(scenario_file, run_dir, *, silent=(), rounds=1, **config):
    grid = LocalGrid(3, client_app.app, silent=silent, node_config=TEST_FAULTS)
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                               "run-dir": str(run_dir), **config})
    reports = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    return reports, grid


def test_nan_update_is_rejected_with_a_log_line_and_never_aggregated(scenario_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    reports, _ = _run(scenario_file, tmp_path, **{"fault-inject": "nan:1"})
    assert set(reports[0].train) == {"shop_00", "shop_02"}
    assert "NaN" in reports[0].left_out["shop_01"]
    assert any("left out shop shop_01" in r.message and "NaN" in r.message for r in caplog.records)
    arrays = latest_checkpoint(tmp_path).arrays
    assert all(np.isfinite(a).all() for a in arrays.values())


def test_a_failing_shop_is_left_out_and_the_run_goes_on(scenario_file, tmp_path):
    # warmup-rounds 0: with the default 1, a shop whose local part never trained (it failed round 1)
    # warms up in round 2 like any node that arrives with fresh heads (tests/test_join.py).
    reports, _ = _run(scenario_file, tmp_path, rounds=2, **{"fault-inject": "error:2@1", "warmup-rounds": 0})
    assert set(reports[0].train) == {"shop_00", "shop_01"}
    assert "error reply" in reports[0].left_out["shop_02"]
    assert set(reports[1].train) == {"shop_00", "shop_01", "shop_02"}  # back in round 2
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert set(metrics[metrics["round"] == 2]["shop"]) == {"shop_00", "shop_01", "shop_02"}


def test_a_shop_that_does_not_reply_in_time_is_left_out(scenario_file, tmp_path):
    reports, _ = _run(scenario_file, tmp_path, silent=[0])
    assert set(reports[0].train) == {"shop_01", "shop_02"}
    assert "timeout" in reports[0].left_out["node-1000"]  # silent from the start: never named


def test_fewer_usable_shops_than_min_shops_stops_the_run(scenario_file, tmp_path):
    with pytest.raises(RuntimeError, match=r"min-shops=3"):  # max-short-rounds=0: no round may be skipped
        _run(scenario_file, tmp_path, **{"fault-inject": "nan:0", "min-shops": 3, "max-short-rounds": 0})
