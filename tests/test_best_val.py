"""Shops compute test metrics only in rounds a report can pick: same reported numbers as testing every round."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client.best_val import BEST_VAL_FILE, load_record, note_round, primaries, save_record, tasks_to_test
from server.federation_common import lets_shops_skip_tests
from simulations.baselines import run_central, run_local_only
from simulations.best_rounds import final_table
from simulations.federated import run_federated


def test_a_task_is_tested_when_its_validation_primary_is_new_best_nan_or_first():
    record = {1: {"ctr": 0.70, "sales": 0.50}, 2: {"ctr": 0.72, "sales": 0.40}}
    assert tasks_to_test(record, 3, {"ctr": 0.72, "sales": 0.45}) == set()  # a tie is not new best
    assert tasks_to_test(record, 3, {"ctr": 0.7201, "sales": 0.39}) == {"ctr", "sales"}  # wape: lower is better
    assert tasks_to_test(record, 3, {"ctr": math.nan, "cvr": 0.5}) == {"ctr", "cvr"}  # NaN, and no earlier score
    assert tasks_to_test(record, 2, {"ctr": 0.71, "sales": 0.45}) == {"ctr", "sales"}  # a redone round: rounds < 2 only


def test_noting_a_round_drops_later_rounds_and_nan():
    record = note_round({1: {"ctr": 0.7}, 2: {"ctr": 0.9}, 3: {"ctr": 0.8}}, 2, {"ctr": 0.6, "cvr": math.nan})
    assert record == {1: {"ctr": 0.7}, 2: {"ctr": 0.6}}
    scores = primaries({"ctr": {"auc": 0.7, "logloss": 0.4}, "sales": {"rmse": 1.0}})
    assert scores["ctr"] == 0.7 and math.isnan(scores["sales"])  # no wape: unknown, so tested


def test_the_record_survives_a_new_process_and_is_per_run(tmp_path):
    first = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    save_record(first, tmp_path, "run-a", {1: {"ctr": 0.7}, 2: {"ctr": 0.75}})
    assert (tmp_path / BEST_VAL_FILE).exists()
    fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert load_record(fresh, tmp_path, "run-a") == {1: {"ctr": 0.7}, 2: {"ctr": 0.75}}
    assert load_record(fresh, tmp_path, "run-b") == {}
    (tmp_path / BEST_VAL_FILE).write_text("{not json")
    assert load_record(fresh, tmp_path, "run-a") == {}


def test_the_coordinator_lets_shops_skip_tests_except_in_the_last_round():
    assert lets_shops_skip_tests(False, "val+test", 1, 3)
    assert not lets_shops_skip_tests(False, "val+test", 3, 3)  # the last round tests every task
    assert not lets_shops_skip_tests(True, "val+test", 1, 3)  # test_every_round = true
    assert not lets_shops_skip_tests(False, "val", 1, 3)
    assert not lets_shops_skip_tests(False, "test+val", 1, 3)  # test before val: nothing to decide on


def _tests(run) -> pd.DataFrame:
    rows = run if isinstance(run, pd.DataFrame) else pd.read_csv(run / "metrics.csv")
    return rows[rows["split"] == "test"]


@pytest.mark.slow
def test_skipping_test_passes_reports_the_same_numbers_as_testing_every_round(tmp_path):
    every = run_federated(tiny_scenario(), tmp_path / "every", rounds=5, engine="pool",
                          extra_config={"test-every-round": True})
    skip = run_federated(tiny_scenario(), tmp_path / "skip", rounds=5, engine="pool")
    cut = run_federated(tiny_scenario(), tmp_path / "cut", rounds=3, engine="pool")
    run_federated(tiny_scenario(), cut, rounds=5, resume=True, engine="pool")  # record read back from disk
    reference = final_table(pd.read_csv(every / "metrics.csv"))
    assert len(reference) > 0
    for run in (skip, cut):
        pd.testing.assert_frame_equal(final_table(pd.read_csv(run / "metrics.csv")), reference)
        # the test rows it kept are the every-round run's, bit for bit
        kept = _tests(run).merge(_tests(every), on=["method", "round", "shop", "task", "split", "metric"],
                                 how="left", suffixes=("", "_every"))
        assert (kept["value"].isna() & kept["value_every"].isna() | (kept["value"] == kept["value_every"])).all()
    assert len(_tests(skip)) < len(_tests(every)), "no round skipped a test pass: the test shows nothing"
    assert set(_tests(skip)[lambda t: t["round"] == 5]["task"]) == set(_tests(every)[lambda t: t["round"] == 5]["task"])


def test_local_only_and_the_oracle_skip_the_same_way_and_report_the_same_numbers():
    for runner in (run_local_only, run_central):
        every = pd.DataFrame(runner(tiny_scenario(**{"federation.test_every_round": True}), epochs=4))
        skip = pd.DataFrame(runner(tiny_scenario(), epochs=4))
        pd.testing.assert_frame_equal(final_table(skip), final_table(every))
        assert len(_tests(skip)) < len(_tests(every))
        assert set(_tests(skip)[lambda t: t["round"] == 4]["shop"]) == set(_tests(every)["shop"])
