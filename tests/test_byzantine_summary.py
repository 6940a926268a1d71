"""The Byzantine benchmark's summary: best-validation round within a horizon, honest set, and both references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("byzantine", Path(__file__).parents[1] / "benchmarks" / "byzantine.py")
byzantine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(byzantine)

SHOPS = ["shop_00", "shop_01", "shop_02"]


def _run(rule: str, attack: str, test: dict[str, list[float]], left_out: dict[str, dict[str, str]] | None = None,
         attacker: str = "shop_00") -> dict:
    val = {s: [0.5, 0.9, 0.6] for s in SHOPS}  # every shop's best validation round is round 2
    return {"rule": rule, "attack": attack, "attacker": attacker, "seed": 0, "rounds": 3, "shops": SHOPS,
            "claims": {"shop_00": 2.0, "shop_01": 1.0, "shop_02": 1.0}, "ctr_auc": {"val": val, "test": test},
            "left_out": left_out or {}}


def test_cost_is_read_at_the_best_validation_round_within_the_horizon_and_excludes_the_attacker():
    clean = _run("fedavg", "none", {s: [0.5, 0.8, 0.9] for s in SHOPS})
    floor = _run("fedavg", "absent", {"shop_00": [0.0] * 3, "shop_01": [0.5, 0.78, 0.9], "shop_02": [0.5, 0.76, 0.9]})
    attacked = _run("fedshop", "signflip", {"shop_00": [0.0] * 3, "shop_01": [0.5, 0.70, 0.9],
                                            "shop_02": [0.5, 0.72, 0.9]},
                    left_out={"1": {"shop_01": "direction"}, "3": {"shop_00": "norm"}})
    rows = byzantine.summarise([clean, floor, attacked], [1, 3])
    at3 = next(r for r in rows if r["rounds"] == 3 and r["attack"] == "signflip")
    assert at3["cost_vs_clean"] == [pytest.approx(0.09)]  # round 2's test values (0.8 vs 0.71), not round 3's
    assert at3["cost_vs_floor"] == [pytest.approx(0.06)] and at3["floor_cost"] == [pytest.approx(0.03)]
    assert (at3["honest_left_out"], at3["honest_shop_rounds"], at3["attacker_left_out_rounds"]) == (1, 6, 1)
    assert at3["attacker_share"] == pytest.approx(0.5) and not at3["met"]
    at1 = next(r for r in rows if r["rounds"] == 1 and r["attack"] == "signflip")
    assert at1["cost_vs_clean"] == [pytest.approx(0.0)] and at1["attacker_left_out_rounds"] == 0


def test_a_run_from_before_a_screen_existed_is_reused_only_where_that_screen_is_off():
    older = {k: v for k, v in byzantine.screens_for("fedshop", {}).items() if k != "robust-loo-min-cosine"}
    assert not byzantine.same_screens(older, byzantine.screens_for("fedshop", {}))  # default on: rerun
    assert byzantine.same_screens(older, byzantine.screens_for("fedshop", {"robust-loo-min-cosine": -1.0}))
    plain = {k: v for k, v in byzantine.screens_for("fedavg", {}).items() if k != "robust-loo-min-cosine"}
    assert byzantine.same_screens(plain, byzantine.screens_for("fedavg", {}))  # screens off: the same run
    assert not byzantine.same_screens({**plain, "robust-norm-factor": 4.0}, byzantine.screens_for("fedavg", {}))
