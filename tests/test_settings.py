"""The settings schema (shared/settings.py): bad scenario and run-config values are refused up front with
file, key, value and fix; the run config is derived from it; pyproject.toml and docs/settings.md agree with it.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shared.scenario import SCENARIO_DIR, Scenario, ScenarioError, load_scenario, scenario_from_dict
from shared.settings import (
    FEDERATION_DEFAULTS,
    STRATEGIES,
    FederationTable,
    RunSettings,
    ShopRoundSettings,
    settings_reference,
)
from simulations.cli import app

REPO = Path(__file__).resolve().parents[1]
DEFAULT = SCENARIO_DIR / "default.toml"
runner = CliRunner()


def _raw() -> dict:
    return tomllib.loads(DEFAULT.read_text(encoding="utf-8"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------- the loader
# Bad values, names, types and combinations: the table of cases in tests/test_bad_settings.py (loader and CLI).


def test_defaults_are_the_schema_and_the_table_is_typed() -> None:
    sc = scenario_from_dict({})
    assert sc.federation == FEDERATION_DEFAULTS == FederationTable().model_dump()
    assert sc.federation["warmup_rounds"] == 1
    typed = load_scenario("default", {"federation.rounds": 3, "train.lr": 1})  # a TOML int is a number
    assert typed.federation["rounds"] == 3 and isinstance(typed.federation["rounds"], int)
    assert typed.train.lr == 1.0 and isinstance(typed.train.lr, float)
    with pytest.raises(ScenarioError, match=r"federation.rounds = 3.0: input should be a valid integer"):
        load_scenario("default", {"federation.rounds": 3.0})  # strict: refused, not converted


# ------------------------------------------------------------------------------------------ the run config
def test_run_config_is_derived_and_parses_back_to_the_same_settings(tmp_path: Path) -> None:
    from server.server_app import FederationSettings
    from simulations.federated import run_config

    sc = load_scenario("default", {"federation.rounds": 4, "federation.prox_mu": 0.1,
                                   "federation.max_epsilon": 2.0, "federation.strategy": "fedprox"})
    config = run_config(sc, tmp_path, method="fedshop", rounds=None, resume=False)
    assert config["num-server-rounds"] == 4 and config["proximal-mu"] == 0.1 and config["dp-max-epsilon"] == 2.0
    parsed = FederationSettings.from_config(config)
    assert {k: getattr(parsed, k) for k in FEDERATION_DEFAULTS} == sc.federation
    assert parsed.num_server_rounds == 4 and parsed.proximal_mu == 0.1 and parsed.seed == sc.seed
    assert run_config(sc, tmp_path, method="fedshop", rounds=7, resume=False)["num-server-rounds"] == 7


@pytest.mark.parametrize(("config", "fragment"), [
    ({"num-server-rounds": 0}, "num-server-rounds = 0"),
    ({"fraction-train": 2.0}, "fraction-train = 2.0"),
    ({"local-epochs": 0}, "local-epochs = 0"),
    ({"objective": "metaa"}, "did you mean 'meta'"),
    ({"rounds-server-num": 3}, "unknown key 'rounds-server-num'"),
    ({"eval-split": "val+tset"}, "unknown split(s) ['tset']"),
    ({"dp-noise-multiplier": -1.0}, "dp-noise-multiplier = -1.0"),
])
def test_a_bad_run_config_is_refused_on_the_server(config: dict, fragment: str) -> None:
    from server.server_app import split_privacy

    with pytest.raises(ScenarioError) as err:
        split_privacy(config)
    assert str(err.value).startswith("run config: ") and fragment in str(err.value) and "Fix:" in str(err.value)


def test_the_shop_parses_the_message_once_and_ignores_flowers_own_keys() -> None:
    sent = {**RunSettings(local_epochs=3, warmup_rounds=2).client_config(seed=5), "server-round": 4,
            "clipping_norm": 1.0, "proximal-mu": 0.01}
    parsed = ShopRoundSettings.from_message({"scenario": "default", "personal-mix": 7.0}, sent)
    assert (parsed.local_epochs, parsed.warmup_rounds, parsed.seed, parsed.server_round) == (3, 2, 5, 4)
    assert parsed.prox_mu == 0.01 and parsed.personal_mix == 0.0  # the message wins over the node's run config
    with pytest.raises(ScenarioError, match="message config: local-epochs = 0"):
        ShopRoundSettings.from_message({}, {"local-epochs": 0})


def test_pyproject_run_config_equals_the_schema_defaults() -> None:
    """`flwr run .` reads pyproject; `fedshop simulate` derives from the schema: both must agree."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunSettings().to_run_config()


def test_strategy_names_match_the_servers_strategies() -> None:
    from server.strategies import STRATEGIES as SERVER_STRATEGIES

    assert set(STRATEGIES) == set(SERVER_STRATEGIES)


def test_settings_reference_in_docs_is_generated_from_the_schema() -> None:
    docs = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert docs == settings_reference(), "regenerate: python -m shared.settings > docs/settings.md"
    for key in FEDERATION_DEFAULTS:
        assert f"`{key}`" in docs


# ------------------------------------------------------------------------------------------ the CLI
def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, _one_line(result.output)


@pytest.mark.parametrize(("args", "fragment"), [
    (["train-local", "default", "--set", "train.lr=nan"], "train.lr = nan"),
    (["train-central", "default", "--set", "train.batch_size=0"], "train.batch_size = 0"),
    (["transfer", "default", "--set", "federation.objective=\"metaa\""], "did you mean 'meta'"),
    (["privacy", "default", "--small", "--runs", "/nonexistent-never-written"], None),
])
def test_other_commands_print_the_error_and_exit_non_zero(args: list[str], fragment: str | None,
                                                          tmp_path: Path) -> None:
    if fragment is None:  # privacy has no --set: a bad scenario file instead
        bad = tmp_path / "bad.toml"
        bad.write_text('[federation]\ndp_noise_multiplier = -1\n', encoding="utf-8")
        args = ["privacy", str(bad), "--small", "--runs", str(tmp_path / "runs")]
        fragment = "federation.dp_noise_multiplier = -1"
    code, out = _cli(*args)
    assert code != 0 and fragment in out and "Fix:" in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()


def test_validate_with_a_bad_scenario_prints_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[features]\nval_fraction = 1.5\n', encoding="utf-8")
    code, out = _cli("validate", str(tmp_path), "--scenario", str(bad))
    assert code != 0 and "bad.toml" in out and "features.val_fraction = 1.5" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------ fuzzing
TABLES = ["data", "features", "model", "train", "federation", "transfer", "data.synthetic", "federaton", "x"]
KEYS = sorted({*FEDERATION_DEFAULTS, "lr", "batch_size", "embed_dim", "split", "val_fraction", "weighting",
               "source", "n_shops", "modes", "fractions", "late_joiners", "epochs", "seed", "rouds"})
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["fedavg", "meta", "user", "temporal", "synthetic"]),
                   st.lists(st.one_of(st.floats(-1, 2), st.text(max_size=5)), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(TABLES), st.sampled_from(KEYS) | st.text(max_size=8), VALUES),
                      min_size=1, max_size=4),
       top=st.none() | st.tuples(st.sampled_from(["seed", "name", "federation", "train"]), VALUES))
def test_any_edit_of_a_valid_scenario_loads_or_is_a_scenario_error(edits: list, top: tuple | None) -> None:
    raw = _raw()
    for table, key, value in edits:
        node = raw
        for part in table.split("."):
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[key] = value
    if top is not None:
        raw[top[0]] = top[1]
    try:
        sc = scenario_from_dict(raw, path=DEFAULT)
    except ScenarioError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(sc, Scenario)
    FederationTable(**sc.federation)  # what loaded is itself valid
    assert sc.federation["rounds"] >= 1 and 0 < sc.federation["fraction_train"] <= 1
    assert math.isfinite(sc.train.lr) and sc.train.lr > 0 and sc.train.batch_size >= 1


def test_resume_with_a_bad_saved_scenario_prints_the_error(tmp_path: Path) -> None:
    (tmp_path / "scenario.toml").write_text("[federation]\nrounds = 0\n", encoding="utf-8")
    code, out = _cli("simulate", "--resume", str(tmp_path))
    assert code == 2 and "scenario.toml: federation.rounds = 0" in out and "Traceback" not in out, out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from([*TABLES, *KEYS, "synthetic"]) | st.text(min_size=1, max_size=6),
                      min_size=1, max_size=3),
       value=VALUES)
def test_any_set_override_loads_or_is_a_scenario_error(parts: list[str], value: object) -> None:
    """What `--set key=value` reaches: any dotted key with any value."""
    try:
        sc = load_scenario("default", {".".join(parts): value})
    except ScenarioError as exc:
        assert str(exc)
        return
    FederationTable(**sc.federation)


def test_a_whole_number_a_float_cannot_hold_is_refused_not_rounded() -> None:
    """2^53 + 1 for a number field would silently become 2^53: refused by name; 2^53 itself is exact."""
    from shared.settings import RunSettings, ScenarioError

    with pytest.raises(ScenarioError, match=r"personal-mix = 9007199254740993: .*rounded.*Fix: set personal-mix"):
        RunSettings.from_config({"personal-mix": 2**53 + 1})
    with pytest.raises(ScenarioError, match="personal-mix"):
        RunSettings.from_config({"personal-mix": -(2**60)})
    assert RunSettings.from_config({"personal-mix": 2**53}).personal_mix == 2.0**53
