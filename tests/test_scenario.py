"""Scenarios: built-in default, dotted overrides, and errors that name the key, the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.scenario import SCENARIO_DIR, ScenarioError, load_scenario, scenario_from_dict

TINY_DATA = {"source": "synthetic", "synthetic": {"n_shops": 2, "n_late_joiners": 1, "max_impressions": 600,
                                                  "min_impressions": 300, "n_small_shops": 1, "days": 10,
                                                  "late_joiner_impressions": 300}}


def test_builtin_default_loads() -> None:
    sc = load_scenario("default")
    assert sc.name == "default" and sc.path == SCENARIO_DIR / "default.toml"
    assert sc.data["source"] == "synthetic"
    assert sc.features.split == "temporal" and sc.features.seed == sc.seed
    assert sc.model.embed_dim > 0 and sc.train.batch_size > 0 and sc.train.seed == sc.seed
    assert sc.federation["rounds"] >= 1 and "strategy" in sc.federation
    assert set(sc.transfer["modes"]) >= {"scratch", "finetune"}


def test_dotted_overrides_apply_without_touching_the_file() -> None:
    sc = load_scenario("default", {"train.lr": 0.01, "federation.rounds": 3, "model.embed-dim": 16,
                                   "features.history_len": 5, "seed": 7, "data.synthetic.n_shops": 2})
    assert sc.train.lr == 0.01 and sc.federation["rounds"] == 3 and sc.model.embed_dim == 16
    assert sc.features.history_len == 5
    assert sc.seed == 7 and sc.features.seed == 7 and sc.train.seed == 7  # seed flows into the tables
    assert sc.raw["data"]["synthetic"]["n_shops"] == 2
    assert sc.federation["local_epochs"] == 1  # untouched keys keep their defaults
    again = load_scenario("default")
    assert again.train.lr != 0.01 and again.federation["rounds"] != 3


@pytest.mark.parametrize(("override", "section"), [
    ("model.embed_dims", "[model]"),
    ("train.learning_rate", "[train]"),
    ("features.bucketz", "[features]"),
    ("federation.roundz", "[federation]"),
])
def test_unknown_key_names_the_key_and_table(override: str, section: str) -> None:
    key = override.split(".")[-1]
    with pytest.raises(ScenarioError) as err:
        load_scenario("default", {override: 1})
    message = str(err.value)
    assert key in message and section in message and "default.toml" in message and "Fix" in message


def test_unknown_world_knob_names_the_key() -> None:
    # Refused when the scenario loads (the schema), not later when the shops are generated.
    with pytest.raises(ScenarioError, match=r"\[data\.synthetic\].*n_shopz.*did you mean 'n_shops'"):
        scenario_from_dict({"data": {"source": "synthetic", "synthetic": {"n_shopz": 2}}})


def test_unknown_source_and_scenario_name() -> None:
    with pytest.raises(ScenarioError, match="source = 'kaggle'"):
        scenario_from_dict({"data": {"source": "kaggle"}}).shops()
    with pytest.raises(ScenarioError, match="default"):  # lists the built-in names
        load_scenario("no-such-scenario")
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario("/nonexistent/where.toml")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n[model\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match="broken.toml"):
        load_scenario(bad)


def test_missing_movielens_path_names_the_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDSHOP_MOVIELENS", raising=False)
    with pytest.raises(ScenarioError, match="FEDSHOP_MOVIELENS"):
        scenario_from_dict({"data": {"source": "movielens"}}).shops()
    with pytest.raises(ScenarioError, match="FEDSHOP_MOVIELENS"):
        scenario_from_dict({"data": {"source": "movielens", "path": str(tmp_path / "absent")}}).shops()
    monkeypatch.setenv("FEDSHOP_MOVIELENS", str(tmp_path / "also-absent"))
    with pytest.raises(ScenarioError, match="also-absent"):
        scenario_from_dict({"data": {"source": "movielens"}}).shops()


def test_synthetic_shops_are_deterministic_and_late_joiners_held_out() -> None:
    sc = scenario_from_dict({"seed": 3, "data": TINY_DATA})
    names = [s.name for s in sc.shops()]
    assert len(names) == 3 and len(sc.late_joiners) == 1
    assert [s.name for s in sc.training_shops()] == [n for n in names if n not in sc.late_joiners]
    assert [s.name for s in sc.joining_shops()] == sc.late_joiners
    other = scenario_from_dict({"seed": 3, "data": TINY_DATA})
    assert all(a.interactions.equals(b.interactions) for a, b in zip(sc.shops(), other.shops(), strict=True))
    # An explicit list in [transfer] overrides the generator's choice of late joiners.
    chosen = scenario_from_dict({"seed": 3, "data": TINY_DATA, "transfer": {"late_joiners": [names[0]]}})
    assert [s.name for s in chosen.joining_shops()] == [names[0]]


def test_train_epochs_is_refused_with_the_key_that_is_read() -> None:
    # [train] epochs used to be accepted and silently ignored: every runner trains local_epochs per round.
    with pytest.raises(ScenarioError, match=r"\[train\].*epochs.*federation\.local_epochs"):
        load_scenario("default", {"train.epochs": 3})
    assert load_scenario("default", {"federation.local_epochs": 3}).federation["local_epochs"] == 3


def test_a_negative_personal_mix_is_refused_by_name() -> None:
    with pytest.raises(ScenarioError, match="personal_mix"):
        load_scenario("default", {"federation.personal_mix": -1})
