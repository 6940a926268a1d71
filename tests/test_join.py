"""A shop joining a running federation: it waits, warms up against the frozen encoder, then counts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from flower_harness import LocalGrid, tiny_scenario, write_scenario

from client import client_app
from client.shop_round import join_stage
from server.server_app import FederationSettings, run_federation
from shared.settings import ShopRoundSettings

JOIN, ROUNDS = 2, 3


def _run(tmp_path, name: str, *, join_round: int, warmup: int):
    scenario = tiny_scenario(**{"data.synthetic.n_late_joiners": 1, "data.synthetic.late_joiner_impressions": 1500,
                                "federation.join_round": join_round, "federation.warmup_rounds": warmup})
    path = write_scenario(scenario, tmp_path / f"{name}.toml")
    n_nodes = len(scenario.federation_shops())
    settings = FederationSettings.from_config({"scenario": str(path), "num-server-rounds": ROUNDS,
                                               "run-dir": str(tmp_path / name), "join-round": join_round,
                                               "warmup-rounds": warmup})
    reports = []
    run_federation(LocalGrid(n_nodes, client_app.app), settings, lambda report, total: reports.append(report))
    return reports, pd.read_csv(tmp_path / name / "metrics.csv"), scenario


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("join")
    return {name: _run(tmp, name, join_round=j, warmup=w)
            for name, j, w in (("alone", 0, 0), ("warmup", JOIN, 2), ("naive", JOIN, 0))}


def _encoder(report):
    return {k: a.numpy() for k, a in report.arrays.items()}


def test_late_joiner_waits_then_warms_up_then_counts(runs):
    reports, _, scenario = runs["warmup"]
    joiner = scenario.late_joiners[0]
    assert "waiting" in reports[0].left_out[joiner]  # round 1 < join round
    assert "warm-up" in reports[1].left_out[joiner] and joiner not in reports[1].train
    assert "warm-up" in reports[2].left_out[joiner]  # warm-up lasts 2 rounds
    naive, _, _ = runs["naive"]
    assert joiner in naive[1].train  # without warm-up it counts from its first round


def test_warmup_keeps_the_other_shops_exactly_where_they_would_be_without_the_newcomer(runs):
    alone, warm, naive = runs["alone"][0], runs["warmup"][0], runs["naive"][0]
    at_join = JOIN - 1
    for key, value in _encoder(alone[at_join]).items():
        np.testing.assert_array_equal(_encoder(warm[at_join])[key], value)
    assert any(not np.array_equal(_encoder(naive[at_join])[k], v) for k, v in _encoder(alone[at_join]).items())

    def others_val_auc(metrics: pd.DataFrame, scenario) -> pd.Series:
        rows = metrics[(metrics["round"] == JOIN) & (metrics["split"] == "val") & (metrics["task"] == "ctr")
                       & (metrics["metric"] == "auc") & (~metrics["shop"].isin(scenario.late_joiners))]
        return rows.set_index("shop")["value"].sort_index()

    scenario = runs["warmup"][2]
    base = others_val_auc(runs["alone"][1], scenario)
    pd.testing.assert_series_equal(others_val_auc(runs["warmup"][1], scenario), base)
    assert not others_val_auc(runs["naive"][1], scenario).equals(base)


def test_a_node_arriving_mid_run_with_a_fresh_local_part_warms_up_first(tmp_path):
    """The deployment join: no scenario late joiner, just a SuperNode that connects at round 2."""
    scenario = tiny_scenario(**{"federation.warmup_rounds": 1})
    path = write_scenario(scenario, tmp_path / "s.toml")
    n = len(scenario.federation_shops())
    settings = FederationSettings.from_config({"scenario": str(path), "num-server-rounds": 3, "min-shops": 2,
                                               "run-dir": str(tmp_path / "run"), "warmup-rounds": 1})
    grid = LocalGrid(n, client_app.app, absent_until={n - 1: 2})
    reports = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    newcomer = scenario.federation_shops()[n - 1].name
    assert newcomer not in reports[0].train  # not connected yet
    assert "warm-up" in reports[1].left_out[newcomer] and newcomer not in reports[1].train
    assert newcomer in reports[2].train  # its local part has trained a round: it counts
    assert all(shop in reports[1].train for shop in (s.name for s in scenario.federation_shops()[:-1]))


def test_join_stage_rule_for_nodes_that_are_not_scenario_late_joiners():
    shop = SimpleNamespace(late_joiner=False)

    def stage(server_round: int, trained: int, warmup: int = 2) -> str:
        settings = ShopRoundSettings.from_message({"warmup-rounds": warmup}, {"server-round": server_round})
        return join_stage(shop, settings, trained)

    assert stage(1, trained=0) == "active"  # everyone starts fresh together
    assert stage(5, trained=4) == "active"  # trained every round so far
    assert stage(5, trained=0) == "warm-up"  # arrives at round 5
    assert stage(6, trained=1) == "warm-up"  # second of its two warm-up rounds
    assert stage(7, trained=2) == "active"
    assert stage(3, trained=10) == "active"  # a merchant whose heads trained in an earlier run
    assert stage(5, trained=0, warmup=0) == "active"
