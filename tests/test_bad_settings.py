"""Bad scenario settings: one table of cases (`CASES`), each refused by the loader and by the CLI (exit 2).

Every case is run through the loader (`load_scenario` with the `--set` values parsed as the CLI parses them,
then `Scenario.check_federation`) and through Typer's CliRunner (`fedshop simulate` or `compare`: exit code
2, the message names the field, no traceback, nothing written). A few run as real subprocesses (slow).
docs/bad-input.md's "Scenario settings" table is generated from `CASES`:

    PYTHONPATH=$PWD .venv/bin/python tests/test_bad_settings.py     # rewrites the table in docs/bad-input.md

and `test_the_doc_table_is_generated_from_the_cases` fails when the doc and the cases differ.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.scenario import SCENARIO_DIR, ScenarioError, load_scenario, scenario_from_dict
from shared.settings import (
    DataTable,
    FeaturesTableChecked,
    FederationTable,
    ModelTable,
    RunSettings,
    ShopRoundSettings,
    SyntheticTable,
    TrainTable,
    TransferTable,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-input.md"
BEGIN = "<!-- settings table: generated from tests/test_bad_settings.py CASES (python tests/test_bad_settings.py) -->"
END = "<!-- end of the generated settings table -->"
BAD_FILE = "bad.toml"  # the name a case's scenario file is written under

# A small world (3 shops + 1 late joiner) for the cases that need the shops: generated in a second.
SMALL_WORLD = """
[data.synthetic]
n_shops = 3
n_late_joiners = 1
max_impressions = 2500
min_impressions = 800
n_small_shops = 1
late_joiner_impressions = 1500
"""


@dataclass(frozen=True)
class Case:
    """One bad input: `--set` values on the default scenario, or a scenario file's text; what fedshop says."""

    bad: str  # the bad input, as the doc shows it
    says: tuple[str, ...]  # fragments of the message (the first names the field)
    sets: dict[str, str] = field(default_factory=dict)  # --set key=value (value as typed on the command line)
    toml: str | None = None  # a scenario file's text instead of the default scenario
    command: Literal["simulate", "compare"] = "simulate"
    slow: bool = False  # also run as a real `fedshop` subprocess

    @property
    def id(self) -> str:
        """A test id."""
        return re.sub(r"[^a-z0-9_.=+-]+", "-", self.bad.lower()).strip("-")[:60]


def _s(key: str, value: str, *says: str, command: Literal["simulate", "compare"] = "simulate",
       slow: bool = False, bad: str | None = None) -> Case:
    return Case(bad or f"`--set {key}={value}`", (f"{key} = ", *says), {key: value}, command=command, slow=slow)


CASES: list[Case] = [
    # ranges
    _s("federation.rounds", "0", ">= 1", slow=True),
    _s("federation.fraction_train", "2", "<= 1", bad="`--set federation.fraction_train=2` (used to hang: no round "
       "could sample 2x the shops)"),
    _s("federation.fraction_train", "0", "> 0"),
    _s("train.lr", "nan", "finite number", slow=True),
    _s("train.lr", "inf", "finite number"),
    _s("train.lr", "-0.1", "> 0"),
    _s("train.batch_size", "0", ">= 1"),
    _s("federation.local_epochs", "0", ">= 1", command="compare"),
    _s("features.val_fraction", "1.5", "< 1"),
    _s("federation.dp_noise_multiplier", "-1", ">= 0"),
    _s("federation.round_timeout", "0", "> 0"),
    _s("federation.join_round", "-1", ">= 0"),
    _s("data.synthetic.n_shops", "0", ">= 1"),
    _s("seed", "-3", ">= 0"),
    Case("`--set federation.robust_norm_factor=0.5`", ("robust_norm_factor = 0.5 is between 0 and 1",
                                                         "Fix: give a factor >= 1"),
         {"federation.robust_norm_factor": "0.5"}),
    Case("`features.val_fraction = 0.6` with `test_fraction = 0.5`", ("val_fraction + test_fraction", "leaves no "
         "training rows"), {"features.val_fraction": "0.6", "features.test_fraction": "0.5"}),
    # names
    Case("`[federaton]` in a scenario file", ("unknown table [federaton]", "did you mean [federation]"),
         toml="[federaton]\nrounds = 3\n", slow=True),
    Case("`--set federation.rouds=3`", ("unknown key 'rouds'", "did you mean 'rounds'"), {"federation.rouds": "3"}),
    _s("federation.objective", '"metaa"', "did you mean 'meta'"),
    _s("federation.strategy", '"fedavgg"', "did you mean 'fedavg'"),
    _s("model.weighting", '"uncertainy"', "did you mean 'uncertainty'"),
    _s("federation.engine", '"rey"', "did you mean 'ray'"),
    Case('`--set transfer.modes=["scratch", "frozn"]`', ("transfer.modes = 'frozn'", "did you mean 'frozen'"),
         {"transfer.modes": '["scratch", "frozn"]'}),
    _s("data.source", '"kaggle"', "synthetic"),
    Case("`[train] epochs = 3`", ("epochs", "is not read", "federation.local_epochs"), toml="[train]\nepochs = 3\n"),
    Case("`--set seed.x=1`", ("seed is a value, not a table",), {"seed.x": "1"}),
    # types: refused, never converted
    _s("federation.rounds", '"ten"', "valid integer", "whole number"),
    _s("federation.rounds", '"3"', "valid integer", "without quotes"),
    _s("federation.rounds", "3.0", "valid integer", "whole number", slow=True),
    _s("train.batch_size", "64.0", "valid integer"),
    _s("train.lr", '"0.01"', "valid number", "without quotes"),
    _s("federation.secure_aggregation", '"true"', "valid boolean", "true or false"),
    _s("federation.secure_aggregation", "1", "valid boolean"),
    _s("federation.strategy", "3", "'fedavg'"),
    Case("`[data] paths = \"shop\"` (a string, not a list)", ("data.paths = 'shop'", "valid list"),
         toml='[data]\nsource = "shop-dirs"\npaths = "shop"\n'),
    # combinations
    Case("`compression = \"fp16\"` with `secure_aggregation = true`",
         ("compression = 'fp16' with secure_aggregation = true is refused", "Fix: set compression = 'none'"),
         {"federation.compression": '"fp16"', "federation.secure_aggregation": "true"}),
    Case("`compression = \"sparse-int8\"` with `dp_noise_multiplier = 1`",
         ("compression = 'sparse-int8' with dp_noise_multiplier > 0 is refused", "Fix: set compression = 'none'"),
         {"federation.compression": '"sparse-int8"', "federation.dp_noise_multiplier": "1.0"}),
    Case("`secure_aggregation = true` with `dp_noise_multiplier > 0`", ("secure_aggregation = true with "
         "dp_noise_multiplier > 0 is not supported", "Fix: choose one"),
         {"federation.secure_aggregation": "true", "federation.dp_noise_multiplier": "1.0"}),
    Case("central DP with `join_round > 0`", ("dp_noise_multiplier > 0 with join_round > 0", "Fix: set join_round = 0"),
         {"federation.dp_noise_multiplier": "1.0", "federation.join_round": "2"}),
    # the federation against its shops (Scenario.check_federation)
    Case("`min_shops = 5` with 3 shops (+ 1 late joiner who never joins)",
         ("federation.min_shops = 5", "only 3 shop(s)", "Fix: set federation.min_shops to at most 3"),
         toml="[federation]\nmin_shops = 5\n" + SMALL_WORLD, command="compare"),
    Case("`join_round = 5` with `rounds = 3`", ("federation.join_round = 5 is after the last round (rounds = 3)",
                                                 "Fix: set federation.join_round between 1 and 3"),
         toml="[federation]\nrounds = 3\njoin_round = 5\n" + SMALL_WORLD, slow=True),
    Case("`min_shops = 4` with 3 shops + 1 late joiner from round 2",
         ("federation.min_shops = 4", "only 3 shop(s) train from round 1", "1 late joiner(s)"),
         toml="[federation]\nrounds = 3\njoin_round = 2\nmin_shops = 4\n" + SMALL_WORLD),
    Case("`secure_aggregation = true` with 1 shop (`min_shops = 1`)",
         ("federation.secure_aggregation = true with 1 shop(s)", "SecAgg+ needs at least 2",
          "Fix: set federation.secure_aggregation = false, or add shops"),
         toml="[federation]\nrounds = 2\nmin_shops = 1\nsecure_aggregation = true\n"
              + SMALL_WORLD.replace("n_shops = 3", "n_shops = 1").replace("n_late_joiners = 1", "n_late_joiners = 0")
              .replace("n_small_shops = 1", "n_small_shops = 0"), command="compare"),
]


def _message(case: Case, tmp_path: Path) -> str:
    """What the loader says for ``case`` (a ScenarioError's text; the test fails if it loads)."""
    from simulations.options import parse_overrides

    source = _scenario(case, tmp_path)
    with pytest.raises(ScenarioError) as err:
        load_scenario(source, parse_overrides([f"{k}={v}" for k, v in case.sets.items()])).check_federation()
    return str(err.value)


def _scenario(case: Case, tmp_path: Path) -> str:
    if case.toml is None:
        return "default"
    path = tmp_path / BAD_FILE
    path.write_text(case.toml, encoding="utf-8")
    return str(path)


def _args(case: Case, tmp_path: Path) -> list[str]:
    sets = [a for k, v in case.sets.items() for a in ("--set", f"{k}={v}")]
    return [case.command, _scenario(case, tmp_path), *sets, "--runs", str(tmp_path / "runs")]


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_loader_refuses_the_case_by_name(case: Case, tmp_path: Path) -> None:
    message = _message(case, tmp_path)
    for fragment in case.says:
        assert fragment in message, message
    assert "Fix:" in message and "pydantic" not in message and "validation error" not in message.lower()
    assert (BAD_FILE if case.toml else "default.toml") in message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_cli_exits_2_with_the_message(case: Case, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, _args(case, tmp_path))
    out = _one_line(result.output)
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert out.startswith("error: ") and "Traceback" not in out, out
    for fragment in case.says:
        assert _one_line(fragment) in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.slow], ids=[c.id for c in CASES if c.slow])
def test_the_real_cli_exits_2_with_one_line(case: Case, tmp_path: Path) -> None:
    fedshop = Path(sys.executable).parent / "fedshop"
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([str(fedshop), *_args(case, tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # one line: the problem, the field and the fix (not wrapped); only the overrides given may follow it
    assert lines and lines[0].startswith("error: ") and case.says[0] in lines[0] and "Fix:" in lines[0], done.stderr
    assert all(line.startswith("(with the overrides") for line in lines[1:]), done.stderr
    assert "Traceback" not in done.stderr + done.stdout and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- every field, fuzzed
def _fields() -> list[tuple[str, str, Any]]:
    """(table, key, annotation) of every scenario setting."""
    tables = {"federation": FederationTable, "features": FeaturesTableChecked, "model": ModelTable,
              "train": TrainTable, "data": DataTable, "data.synthetic": SyntheticTable, "transfer": TransferTable}
    out = []
    for table, model in tables.items():
        for name, info in model.model_fields.items():
            nested = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            if not nested and not (model is TrainTable and name == "epochs"):
                out.append((table, name, info.annotation))
    return out


FIELDS = _fields()
WRONG = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                  st.sampled_from(["3", "3.0", "true", "nan", "-1", "1e9"]), st.lists(st.integers(-2, 2), max_size=2),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def _accepted(annotation: Any, value: Any) -> bool:
    """Whether a strict schema may keep ``value`` for a field of ``annotation`` unchanged (no conversion)."""
    if annotation is bool:
        return type(value) is bool
    if annotation is int:
        return type(value) is int
    if annotation is float:
        return type(value) in (int, float)
    if annotation is str:
        return type(value) is str
    if typing.get_origin(annotation) is Literal:
        return value in typing.get_args(annotation) and type(value) is str
    return True  # lists and optional strings: checked by the schema's own tests


@settings(max_examples=int(os.environ.get("FEDSHOP_FUZZ_EXAMPLES", 200)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(FIELDS), value=WRONG)
def test_any_value_of_any_field_loads_unchanged_or_is_a_clear_error(target: tuple, value: Any) -> None:
    table, key, annotation = target
    raw: dict = {}
    node = raw
    for part in table.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    try:
        sc = scenario_from_dict(raw)
    except ScenarioError as exc:
        message = str(exc)
        assert key in message and "Fix:" in message and "Traceback" not in message, message
        assert "validation error" not in message.lower() and "pydantic" not in message, message
        return
    assert _accepted(annotation, value), f"{table}.{key} = {value!r} was converted, not refused"
    tables = {"federation": sc.federation, "transfer": sc.transfer, "data": sc.data,
              "data.synthetic": sc.data["synthetic"]}
    if table in tables and key != "seed":
        kept = tables[table][key]
        assert kept == value or (isinstance(value, float) and math.isnan(value) and kept != kept), (kept, value)


RUN_FIELDS = list(RunSettings.model_fields)


@settings(max_examples=int(os.environ.get("FEDSHOP_FUZZ_EXAMPLES", 100)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(RUN_FIELDS), value=WRONG, shop=st.booleans())
def test_any_run_config_value_is_kept_or_refused_by_name(name: str, value: Any, shop: bool) -> None:
    from shared.settings import run_key

    key = run_key(name)
    try:
        parsed = (ShopRoundSettings.from_message({}, {key: value}) if shop
                  else RunSettings.from_config({key: value}))
    except ScenarioError as exc:
        assert (key in str(exc) or name in str(exc)) and "Fix:" in str(exc) or "fault" in key, str(exc)
        return
    assert _accepted(RunSettings.model_fields[name].annotation, value), f"{key} = {value!r} was converted"
    assert getattr(parsed, name) == value


# ------------------------------------------------------------------------------------------- the doc
def _shown(message: str, tmp_path: Path) -> str:
    """A message as the doc shows it: paths as file names, one line, table-safe."""
    text = message.replace(str(tmp_path) + os.sep, "").replace(str(SCENARIO_DIR) + os.sep, "")
    return _one_line(text).replace("|", "\\|")


def settings_table(tmp_path: Path) -> str:
    """The doc's table: each case's bad input and the full message fedshop prints for it."""
    rows = ["| bad input | what fedshop says (`fedshop simulate` / `compare`: `error: ` + this, exit 2) |",
            "|---|---|"]
    for case in CASES:
        rows.append(f"| {case.bad.replace('|', chr(92) + '|')} | {_shown(_message(case, tmp_path), tmp_path)} |")
    return "\n".join(rows)


def _doc_section(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def test_the_doc_table_is_generated_from_the_cases(tmp_path: Path) -> None:
    assert _doc_section(DOC.read_text(encoding="utf-8")) == settings_table(tmp_path), \
        "regenerate: PYTHONPATH=$PWD .venv/bin/python tests/test_bad_settings.py"


def write_doc() -> None:
    """Rewrite the generated table of docs/bad-input.md from `CASES`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = settings_table(Path(tmp))
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    write_doc()
