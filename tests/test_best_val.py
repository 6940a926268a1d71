"""Shops compute test metrics only in rounds a report can pick: same reported numbers as testing every round."""

from __future__ import annotations

import json
import logging
import math
import random
from types import SimpleNamespace

import pandas as pd
import pytest
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client import best_val, shop_round
from client.best_val import (
    BEST_VAL_FILE,
    MAX_FILE_BYTES,
    MAX_ROUNDS,
    compact,
    load_record,
    next_tests,
    note_round,
    primaries,
    save_record,
    tasks_to_test,
)
from server.federation_common import lets_shops_skip_tests
from shared.protocol import SELECTION_METRICS
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


# --- bounded record: the same decisions as keeping every round ---------------------------------------------------


class Reference:
    """The unbounded rule, written out plainly: every round kept; redoing round r forgets rounds >= r."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, float]]] = []  # (round, each task's best up to and with it), ascending

    def tested(self, server_round: int, scores: dict[str, float]) -> set[str]:
        while self.rounds and self.rounds[-1][0] >= server_round:
            self.rounds.pop()
        earlier = dict(self.rounds[-1][1]) if self.rounds else {}
        out, bests = set(), dict(earlier)
        for task, score in scores.items():
            if task not in SELECTION_METRICS or math.isnan(score) or task not in earlier:
                out.add(task)
            elif score > earlier[task] if SELECTION_METRICS[task][1] else score < earlier[task]:
                out.add(task)
            if task in SELECTION_METRICS and not math.isnan(score):
                higher = SELECTION_METRICS[task][1]
                if task not in bests or (score > bests[task] if higher else score < bests[task]):
                    bests[task] = score
        self.rounds.append((server_round, bests))
        return out


def _noisy_val(rng: random.Random, r: int) -> dict[str, dict[str, float]]:
    """A round's validation metrics: slowly improving with noise, sometimes NaN, missing or an unknown task."""
    trend = 1 - math.exp(-r / 800)
    val: dict[str, dict[str, float]] = {}
    for task, (metric, higher) in SELECTION_METRICS.items():
        roll = rng.random()
        if roll < 0.02:
            continue  # the task is missing this round
        value = 0.7 + (0.05 if higher else -0.05) * trend + rng.gauss(0, 0.01)
        val[task] = {metric: math.nan if roll < 0.04 else round(value, 3)}  # rounded: ties happen
    if rng.random() < 0.05:
        val["extra"] = {"score": rng.random()}  # no selection metric: always tested, never kept
    return val


def _rounds(rng: random.Random, n: int):
    """``n`` server rounds going forward, with resumes (redo 1-3 rounds) and rarely a redo far back."""
    r = 0
    for step in range(n):
        far = step in (n // 3, 2 * n // 3)
        r = max(1, r - 300) if far else max(1, r - rng.randint(0, 2)) if rng.random() < 0.01 else r + 1
        yield r


def test_5000_noisy_rounds_keep_a_small_record_and_test_exactly_the_tasks_of_the_unbounded_rule(tmp_path):
    rng, ref, record, unbounded = random.Random(7), Reference(), {}, {}
    largest = 0
    for step, r in enumerate(_rounds(rng, 5000)):
        val = _noisy_val(rng, r)
        wanted, record = next_tests(record, r, val)
        assert wanted == ref.tested(r, primaries(val)), f"round {r} (step {step})"
        unbounded = note_round(unbounded, r, primaries(val))
        largest = max(largest, len(record))
        if step % 500 == 0:  # through the file and back, as a new process would
            context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
            save_record(context, tmp_path, "run", record)
            fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
            assert load_record(fresh, tmp_path, "run") == record
    assert len(unbounded) > 4000 and largest <= 100, (len(unbounded), largest)
    size = (tmp_path / BEST_VAL_FILE).stat().st_size
    assert size < 8_000, size
    assert compact(unbounded) == record  # an old, unbounded file reads back as the same compact record


def test_when_the_cap_bites_going_forward_is_exact_and_a_deep_redo_tests_more_never_less(monkeypatch):
    monkeypatch.setattr(best_val, "MAX_ROUNDS", 20)
    ref, record = Reference(), {}
    sales_once = {"sales": {"wape": 0.1}}  # best at round 1, never beaten: its only round is older than the cap
    for r in range(1, 101):
        val = {"ctr": {"auc": 0.5 + r / 1000}, "sales": {"wape": 0.2 + r / 1000}} if r > 1 else sales_once
        wanted, record = next_tests(record, r, val)
        assert wanted == ref.tested(r, primaries(val))
        assert len(record) <= 20 + len(SELECTION_METRICS)
    assert record[1] == {"sales": 0.1} and min(r for r in record if r > 1) == 81  # newest 20, and sales' latest
    val = {"ctr": {"auc": 0.52}, "sales": {"wape": 0.15}}  # redo round 50: older than every kept ctr round
    wanted, record = next_tests(record, 50, val)
    expected = ref.tested(50, primaries(val))
    assert expected == set() and wanted == {"ctr"}  # tests more (ctr has no kept earlier round), never fewer
    for r in range(51, 120):  # afterwards still never fewer
        val = {"ctr": {"auc": 0.55 + math.sin(r) / 100}, "sales": {"wape": 0.15 + math.cos(r) / 100}}
        wanted, record = next_tests(record, r, val)
        assert wanted >= ref.tested(r, primaries(val))


def test_the_largest_capped_record_fits_the_file_cap():
    huge = 2**63 - 1 - 2 * MAX_ROUNDS  # Flower's rounds are int64
    record = {huge + r: {t: (0.1 + r * 1e-12 if SELECTION_METRICS[t][1] else 0.9 - r * 1e-12) + 1 / 3
                         for t in SELECTION_METRICS} for r in range(MAX_ROUNDS + 50)}
    capped = compact(record)
    assert len(capped) == MAX_ROUNDS
    text = json.dumps({"run": "r" * 4096, "rounds": {str(r): capped[r] for r in capped}})
    assert len(text) < MAX_FILE_BYTES / 4, len(text)


def _after_val(tmp_path, server_round: int, context: Context, val) -> set[str]:
    """`shop_round.test_after_val`, the evaluate handler's step, for a shop whose state dir is ``tmp_path``."""
    shop = SimpleNamespace(state_dir=tmp_path)
    settings = SimpleNamespace(run_dir="run-a", server_round=server_round)
    return shop_round.test_after_val(shop, context, settings, val)


VAL = {"ctr": {"auc": 0.6}, "sales": {"wape": 0.5}}


def test_a_corrupt_best_val_file_warns_naming_it_tests_every_task_and_is_rewritten(tmp_path, caplog):
    save_record(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), tmp_path, "run-a",
                {1: {"ctr": 0.9, "sales": 0.1}})
    path = tmp_path / BEST_VAL_FILE
    for bad in ("{not json", "null", '{"run": "run-a", "rounds": {"1": {"ctr": "high"}}}',
                '{"run": "run-a", "rounds": {"' + "9" * 5000 + '": {}}}'):
        path.write_text(bad)
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="client.best_val"):
            wanted = _after_val(tmp_path, 2, context, VAL)
        assert wanted == {"ctr", "sales"}, bad  # the 0.9 / 0.1 of round 1 would have skipped both
        assert str(path) in caplog.text and "not a best-val record" in caplog.text and "Fix" in caplog.text
        fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        assert load_record(fresh, tmp_path, "run-a") == {2: {"ctr": 0.6, "sales": 0.5}}  # rewritten, valid


def test_an_oversized_best_val_file_is_ignored_unread_with_a_warning(tmp_path, caplog):
    path = tmp_path / BEST_VAL_FILE
    record = json.dumps({"run": "run-a", "rounds": {"1": {"ctr": 0.9, "sales": 0.1}}})
    path.write_text(record + " " * MAX_FILE_BYTES)  # valid JSON, but no record fedshop writes is this large
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.WARNING, logger="client.best_val"):
        wanted = _after_val(tmp_path, 2, context, VAL)
    assert wanted == {"ctr", "sales"}
    assert str(path) in caplog.text and f"over {MAX_FILE_BYTES} bytes" in caplog.text and "Fix" in caplog.text
    assert path.stat().st_size < 200  # rewritten as this round's compact record
    path.write_text(record)  # the same record at its normal size is read
    fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert _after_val(tmp_path, 2, fresh, VAL) == set()


def test_a_resumed_or_redone_round_overwrites_its_entry_and_never_competes_with_it(tmp_path):
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert _after_val(tmp_path, 1, context, {"ctr": {"auc": 0.7}}) == {"ctr"}
    assert _after_val(tmp_path, 2, context, {"ctr": {"auc": 0.8}}) == {"ctr"}
    assert _after_val(tmp_path, 3, context, {"ctr": {"auc": 0.75}}) == set()  # not kept
    fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})  # a new process
    assert _after_val(tmp_path, 2, fresh, {"ctr": {"auc": 0.72}}) == {"ctr"}  # > round 1
    assert _after_val(tmp_path, 3, fresh, {"ctr": {"auc": 0.75}}) == {"ctr"}  # > redone 2
    assert load_record(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), tmp_path,
                       "run-a") == {1: {"ctr": 0.7}, 2: {"ctr": 0.72}, 3: {"ctr": 0.75}}


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
