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


def test_a_late_turn_is_compared_with_the_floor_of_the_same_turn_and_caught_rounds_count_from_it():
    test = {s: [0.5, 0.8, 0.9] for s in SHOPS}
    clean = _run("fedavg", "none", test)
    floor1 = _run("fedavg", "absent", {**test, "shop_01": [0.5, 0.6, 0.9]})  # absent from round 1: a lower floor
    floor2 = {**_run("fedavg", "absent", {**test, "shop_01": [0.5, 0.75, 0.9]}), "turn_round": 2}
    late = {**_run("fedshop", "signflip", {**test, "shop_01": [0.5, 0.72, 0.9]},
                   left_out={"1": {"shop_00": "x"}, "2": {"shop_00": "sudden turn"}, "3": {"shop_00": "x"}}),
            "turn_round": 2}
    rows = byzantine.summarise([clean, floor1, floor2, late], [3])
    row = next(r for r in rows if r["attack"] == "signflip")
    assert row["turn_round"] == 2 and row["cost_vs_floor"] == [pytest.approx(0.015)]  # the round-2 floor
    assert (row["attacker_left_out_rounds"], row["attacker_rounds"]) == (2, 2)  # rounds 2-3 only


def test_the_attacker_is_honest_before_its_turn_round():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MessageType, RecordDict

    attacker = byzantine.Attacker(lambda m, c: m, node_id=7, rewrite=lambda d: -d, turn_round=4)

    def msg(rnd: int, kind: str = MessageType.TRAIN) -> SimpleNamespace:  # the two fields Attacker reads
        return SimpleNamespace(metadata=SimpleNamespace(message_type=kind),
                               content=RecordDict({"config": ConfigRecord({"server-round": rnd})}))

    ctx = SimpleNamespace(node_id=7)
    assert [attacker.attacks(msg(r), ctx) for r in (1, 3, 4, 9)] == [False, False, True, True]
    assert not attacker.attacks(msg(5, MessageType.EVALUATE), ctx)
    assert not attacker.attacks(msg(5), SimpleNamespace(node_id=8))  # another node
    assert byzantine.Attacker(lambda m, c: m, 7, lambda d: d).attacks(msg(1), ctx)  # turn round 1: from the start
