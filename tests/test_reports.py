"""Gap closed, shops worse than alone, small-shop gain and the run report, on hand-made metric rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from simulations.best_rounds import PRIMARY, final_table
from simulations.compare import check_targets, comparison_csv, parse_methods, parse_seeds, summarize
from simulations.run_report import read_metrics, seeded_final_table, write_run_report

# Test CTR AUC per shop: local means 0.70, central 0.80, fedshop 0.77 -> fedshop closes exactly 70%.
CTR = {"local": {"a": 0.60, "b": 0.70, "c": 0.80},
       "central": {"a": 0.70, "b": 0.80, "c": 0.90},
       "fedshop": {"a": 0.72, "b": 0.80, "c": 0.79}}
# Test WAPE (lower is better): local 0.50, central 0.40, fedshop 0.45 -> half the gap.
WAPE = {"local": {"a": 0.50, "b": 0.50}, "central": {"a": 0.40, "b": 0.40}, "fedshop": {"a": 0.38, "b": 0.52}}


def _final(values: dict, task: str, metric: str, seed: int = 0) -> list[dict]:
    return [{"method": m, "shop": s, "task": task, "metric": metric, "value": v, "round": 1, "seed": seed}
            for m, shops in values.items() for s, v in shops.items()]


def _rows(values: dict, task: str, metric: str, *, best_round: int, rounds: int = 3, seed: int = 0) -> list[dict]:
    """Metric rows where validation is best at ``best_round``; test there is ``values``, elsewhere 0.5 worse."""
    sign = 1 if PRIMARY[task][1] else -1
    rows = []
    for m, shops in values.items():
        for s, v in shops.items():
            for r in range(1, rounds + 1):
                good = r == best_round
                rows.append({"method": m, "round": r, "shop": s, "task": task, "split": "val", "metric": metric,
                             "value": sign * (0.9 if good else 0.6), "seed": seed})
                rows.append({"method": m, "round": r, "shop": s, "task": task, "split": "test", "metric": metric,
                             "value": v if good else v - sign * 0.5, "seed": seed})
    return rows


def test_gap_closed_worse_shops_and_small_shop_gain_are_exact():
    summary = summarize(pd.DataFrame(_final(CTR, "ctr", "auc")), small_shops=["a", "zz-not-training"])
    ctr = summary["tasks"]["ctr"]
    assert ctr["mean"] == pytest.approx({"local": 0.70, "central": 0.80, "fedshop": 0.77}, abs=1e-12)
    assert ctr["gap_status"] == "ok"
    assert ctr["gap_closed"] == pytest.approx(0.7, abs=1e-9)
    assert [(w["shop"], round(w["margin"], 9), w["beyond_tolerance"]) for w in ctr["worse_shops"]] == [
        ("c", 0.01, True)]
    assert ctr["max_loss"] == pytest.approx(0.01)
    assert ctr["small_shop_gain"] == pytest.approx({"central": 0.10, "fedshop": 0.12})
    targets = summary["targets"]
    assert targets["gap_closed"]["met"]  # exactly at the 0.70 target, despite float rounding
    assert not targets["max_loss"]["met"] and targets["small_shop_gain"]["met"]


def test_worse_shop_margin_carries_a_standard_error_that_shrinks_with_clicks_and_seeds():
    final = pd.DataFrame(_final(CTR, "ctr", "auc"))
    few = summarize(final, ctr_sizes={"c": [(15, 400)]})["tasks"]["ctr"]["worse_shops"][0]
    many = summarize(final, ctr_sizes={"c": [(1500, 40000)]})["tasks"]["ctr"]["worse_shops"][0]
    seeds = summarize(final, ctr_sizes={"c": [(15, 400)] * 4})["tasks"]["ctr"]["worse_shops"][0]
    assert few["shop"] == "c" and few["test_clicks"] == [15]
    assert 0.05 < few["margin_se"] < 0.2  # 15 clicks cannot resolve a 0.01 loss
    assert many["margin_se"] == pytest.approx(few["margin_se"] / 10, rel=0.1)
    assert seeds["margin_se"] == pytest.approx(few["margin_se"] / 2, rel=1e-9)
    assert "margin_se" not in summarize(final)["tasks"]["ctr"]["worse_shops"][0]
    # The max-loss target names the shop that sets it and carries that margin's error when known.
    target = summarize(final, ctr_sizes={"c": [(15, 400)]})["targets"]["max_loss"]
    assert target["shop"] == "c" and target["se"] == pytest.approx(few["margin_se"])
    assert "se" not in summarize(final)["targets"]["max_loss"]
    assert "se" not in summarize(final, ctr_sizes={"other": [(15, 400)]})["targets"]["max_loss"]  # no sizes for c
    # A 0.01 loss misses the 0.005 target; 15 clicks cannot tell it from noise, 150,000 can.
    assert target["within_noise"] is True and not target["met"]
    assert summarize(final, ctr_sizes={"c": [(150000, 4000000)]})["targets"]["max_loss"]["within_noise"] is False
    assert "within_noise" not in summarize(final)["targets"]["max_loss"]  # no error known: no claim


def test_worse_shop_margin_carries_its_seed_to_seed_error_from_three_seeds():
    def seed(k: int, c_margin: float) -> list[dict]:
        values = {m: dict(v) for m, v in CTR.items()}
        values["fedshop"]["c"] = values["local"]["c"] - c_margin
        return _final(values, "ctr", "auc", seed=k)

    two = pd.DataFrame(seed(0, 0.01) + seed(1, 0.02))
    three = pd.DataFrame(seed(0, 0.01) + seed(1, 0.02) + seed(2, 0.03))
    assert "margin_se_seeds" not in summarize(two)["tasks"]["ctr"]["worse_shops"][0]  # two seeds: no spread
    worst = summarize(three)["tasks"]["ctr"]["worse_shops"][0]
    # margins 0.01, 0.02, 0.03: sample std 0.01, over sqrt(3) seeds
    assert worst["shop"] == "c" and worst["n_seeds"] == 3
    assert worst["margin_se_seeds"] == pytest.approx(0.01 / 3 ** 0.5)
    target = summarize(three)["targets"]["max_loss"]
    assert (target["se_seeds"], target["n_seeds"]) == (pytest.approx(0.01 / 3 ** 0.5), 3)
    assert target["value"] == pytest.approx(0.02)


def test_lower_is_better_metrics_count_a_drop_as_a_gain():
    ctr_and_sales = pd.DataFrame(_final(WAPE, "sales", "wape"))
    sales = summarize(ctr_and_sales, small_shops=["b"])["tasks"]["sales"]
    assert sales["higher_is_better"] is False
    assert sales["gap_closed"] == pytest.approx(0.5)
    assert [(w["shop"], round(w["margin"], 9)) for w in sales["worse_shops"]] == [("b", 0.02)]
    assert sales["small_shop_gain"]["fedshop"] == pytest.approx(-0.02)


@pytest.mark.parametrize(("central_shift", "status"), [(0.0, "no-gap"), (0.001, "no-gap"),
                                                         (-0.05, "oracle-below-local")])
def test_gap_closed_is_undefined_without_a_positive_gap(central_shift, status):
    values = {"local": {"a": 0.7}, "central": {"a": 0.7 + central_shift}, "fedshop": {"a": 0.72}}
    ctr = summarize(pd.DataFrame(_final(values, "ctr", "auc")))["tasks"]["ctr"]
    assert ctr["gap_closed"] is None and ctr["gap_status"] == status
    assert ctr["mean"]["fedshop"] == pytest.approx(0.72)  # raw means are still reported
    assert summarize(pd.DataFrame(_final(values, "ctr", "auc")))["targets"]["gap_closed"]["met"] is False


def test_missing_oracle_leaves_gap_undefined_but_reports_worse_shops():
    values = {"local": {"a": 0.7, "b": 0.6}, "fedshop": {"a": 0.65, "b": 0.7}}
    ctr = summarize(pd.DataFrame(_final(values, "ctr", "auc")))["tasks"]["ctr"]
    assert (ctr["gap_closed"], ctr["gap_status"]) == (None, "missing-method")
    assert [w["shop"] for w in ctr["worse_shops"]] == ["a"]


def test_summary_uses_test_at_the_best_validation_round_and_averages_seeds():
    seed1 = {m: {s: v + 0.02 for s, v in shops.items()} for m, shops in CTR.items()}
    rows = pd.DataFrame(_rows(CTR, "ctr", "auc", best_round=2) + _rows(seed1, "ctr", "auc", best_round=3, seed=1))
    final = seeded_final_table(rows)
    assert set(final[final["seed"] == 0]["round"]) == {2} and set(final[final["seed"] == 1]["round"]) == {3}
    ctr = summarize(final)["tasks"]["ctr"]
    assert ctr["mean"]["local"] == pytest.approx(0.71)  # seed means 0.70 and 0.72
    assert ctr["gap_closed"] == pytest.approx(0.7)
    assert summarize(final)["seeds"] == [0, 1]
    table = comparison_csv(final, several_seeds=True)
    assert list(table.columns) == ["seed", "method", "shop", "task", "metric", "value", "round"]
    assert list(comparison_csv(final, several_seeds=False).columns)[0] == "method"


def test_final_table_falls_back_to_the_last_tested_round_when_test_runs_only_at_the_end():
    # A federation that validates rounds 1-2 and tests only after round 3 still gets a test value.
    rows = [{"method": "fedshop", "round": r, "shop": "a", "task": "ctr", "split": "val", "metric": "auc",
             "value": v} for r, v in ((1, 0.6), (2, 0.9))]
    rows.append({"method": "fedshop", "round": 3, "shop": "a", "task": "ctr", "split": "test", "metric": "auc",
                 "value": 0.75})
    table = final_table(rows)
    assert table[["round", "value"]].values.tolist() == [[3, 0.75]]


def test_parse_methods_and_seeds_reject_bad_input_with_the_fix():
    assert parse_methods("fedshop, local,fedshop") == ["fedshop", "local"]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown method.*'fedprox'.*Fix"):
        parse_methods("local,fedprox")
    with pytest.raises(ValueError, match="not a list of integers"):
        parse_seeds("0,one")
    with pytest.raises(ValueError, match="each once"):
        parse_seeds("1,1")


def test_targets_without_ctr_are_empty():
    assert check_targets({"method": "fedshop", "tasks": {}}) == {}


def test_write_run_report_writes_summary_and_plots(tmp_path):
    rows = pd.DataFrame(_rows(CTR, "ctr", "auc", best_round=2) + _rows(WAPE, "sales", "wape", best_round=1))
    rows.drop(columns="seed").to_csv(tmp_path / "metrics.csv", index=False)
    final = seeded_final_table(read_metrics(tmp_path))
    summary = json.loads(json.dumps(summarize(final, small_shops=["a"])))
    written = write_run_report(tmp_path, small_shops=["a"], summary=summary)
    names = {p.name for p in written}
    assert names == {"summary.md", "report.html", "rounds_ctr.png", "rounds_sales.png", "final_ctr.png",
                     "final_sales.png"}
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = (tmp_path / "summary.md").read_text()
    assert "| ctr | auc | 0.7000 | 0.8000 | 0.7700 | 0.700 | c (+0.0100) | 0.1200 |" in text
    assert "a (small)" in text and "0.7200 (r2)" in text
    assert "| sales | wape | 0.5000 | 0.4000 | 0.4500 | 0.500 | b (+0.0200) | 0.1200 |" in text
    assert "max_loss | <= 0.005 | 0.0100 (c) | **no**" in text
    assert "![final_ctr](plots/final_ctr.png)" in text
    assert not list(tmp_path.rglob(".*.tmp"))


def test_write_run_report_of_a_single_method_run_has_no_headline(tmp_path):
    rows = pd.DataFrame(_rows({"fedshop": CTR["fedshop"]}, "ctr", "auc", best_round=3)).drop(columns="seed")
    rows.to_csv(tmp_path / "metrics.csv", index=False)
    write_run_report(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "Headline" not in text and "| c | 0.7900 (r3) |" in text
    assert (tmp_path / "plots" / "rounds_ctr.png").exists()


def test_write_run_report_names_the_missing_file_or_column(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv does not exist"):
        write_run_report(tmp_path)
    pd.DataFrame({"method": ["x"], "round": [1]}).to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['metric', 'shop', 'split', 'task', 'value'\]"):
        write_run_report(tmp_path)
    assert not (tmp_path / "summary.md").exists()


def test_sampled_ranking_gap_is_a_target_and_small_shop_gain_is_na_without_small_shops():
    hr = {"local": {"a": 0.50, "b": 0.60}, "central": {"a": 0.60, "b": 0.70}, "fedshop": {"a": 0.57, "b": 0.65}}
    ndcg = {"local": {"a": 0.30}, "central": {"a": 0.40}, "fedshop": {"a": 0.35}}
    final = pd.DataFrame(_final(CTR, "ctr", "auc") + _final(hr, "ranking", "hr@10_s99")
                         + _final(ndcg, "ranking", "ndcg@10_s99"))
    assert not any(k.startswith("ranking_gap") for k in summarize(final)["targets"])  # temporal splits: none
    summary = summarize(final, ranking_targets=True)
    assert summary["ranking_sampled"]["hr@10_s99"]["gap_closed"] == pytest.approx(0.6)
    targets = summary["targets"]
    assert targets["ranking_gap_closed_hr@10_s99"]["met"]  # exactly 60%, despite float rounding
    assert targets["ranking_gap_closed_ndcg@10_s99"]["value"] == pytest.approx(0.5)
    assert targets["ranking_gap_closed_ndcg@10_s99"]["met"] is False
    assert targets["small_shop_gain"]["met"] is None and "no small shops" in targets["small_shop_gain"]["note"]
    ctr_only = summarize(pd.DataFrame(_final(CTR, "ctr", "auc")), ranking_targets=True)
    assert ctr_only["ranking_sampled"] == {} and not any(k.startswith("ranking_gap") for k in ctr_only["targets"])


def test_a_one_seed_run_report_names_the_seed_its_config_records(tmp_path):
    rows = pd.DataFrame(_rows(CTR, "ctr", "auc", best_round=2))
    rows.drop(columns="seed").to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "config.toml").write_text('command = "compare"\nseeds = [5]\n\n[scenario]\nseed = 5\n')
    write_run_report(tmp_path)
    assert "- seeds: 5;" in (tmp_path / "summary.md").read_text()


def test_targets_a_run_cannot_measure_are_na_with_the_reason_not_missed():
    from simulations.run_report import headline_table, target_status

    no_fedshop = summarize(pd.DataFrame(_final({m: CTR[m] for m in ("local", "central")}, "ctr", "auc")))
    assert {name: target_status(name, t, no_fedshop) for name, t in no_fedshop["targets"].items()} == {
        "gap_closed": "n/a (no fedshop run in this run)", "max_loss": "n/a (no fedshop run in this run)",
        "small_shop_gain": "n/a (the scenario has no small shops)"}
    assert headline_table(no_fedshop)[1][0][-2:] == ["n/a", "-"]  # not "none": fedshop did not run
    flat = {"local": {"a": 0.70}, "central": {"a": 0.70}, "fedshop": {"a": 0.71}}
    no_gap = summarize(pd.DataFrame(_final(flat, "ctr", "auc")), small_shops=["a"])
    assert target_status("gap_closed", no_gap["targets"]["gap_closed"], no_gap) == (
        "n/a (the oracle beats local-only by less than 0.002: no gap to close)")
    assert target_status("small_shop_gain", no_gap["targets"]["small_shop_gain"], no_gap) == "not met"
