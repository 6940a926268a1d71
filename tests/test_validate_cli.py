"""`fedshop validate`: table or JSON per shop, exit code 1 on any bad shop."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from shared.schema import ShopData, write_shop_dir
from simulations.commands import validate

runner = CliRunner()
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


@pytest.fixture
def app() -> typer.Typer:
    """A root app holding only `validate` (a callback keeps it a command group, as in the real CLI)."""
    root = typer.Typer()
    root.callback()(lambda: None)
    validate.register(root)
    return root


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A valid shop with clicks, non-clicks and purchases."""
    inter = pd.DataFrame({"user_id": ["u1", "u2", "u1", "u3"], "item_id": ["007", "8", "8", "007"],
                          "timestamp": [T0 + 100, T0 + 200, T0 + 90_000, T0 + 90_100], "clicked": [1, 0, 1, 1],
                          "carted": [0, 0, 1, 0], "purchased": [0, 0, 1, 0], "quantity": [0.0, 0.0, 2.0, 0.0]})
    return write_shop_dir(ShopData("Good shop", inter), tmp_path / "good")


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    """A shop whose log holds an unknown event on row 3."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "interactions.csv").write_text(
        f"user_id,item_id,timestamp,event\nu,i,{T0},click\nu,i,{T0 + 1},view\n", encoding="utf-8")
    return tmp_path / "bad"


def test_good_shop_exits_zero_with_counts_and_tasks(app: typer.Typer, good: Path) -> None:
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "Good shop" in result.output and "ctr, cvr, ranking, sales" in result.output
    assert "error" not in result.output


def test_bad_shop_exits_one_and_prints_the_fix(app: typer.Typer, good: Path, bad: Path) -> None:
    result = runner.invoke(app, ["validate", str(good), str(bad)])
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # undo Rich's line wrapping
    assert "row 3, column 'event': unknown event (found 'view')" in text
    assert "['impression', 'click', 'cart', 'purchase']" in text  # brackets survive Rich markup


def test_json_output(app: typer.Typer, good: Path, bad: Path) -> None:
    result = runner.invoke(app, ["validate", "--json", str(good), str(bad)])
    assert result.exit_code == 1
    reports = json.loads(result.output)
    assert [r["ok"] for r in reports] == [True, False]
    splits, warnings = reports[0].pop("splits"), reports[0].pop("warnings")
    assert splits == {"train": 2, "validation": 0, "test": 2}  # 4 rows over a day: the span's last 20% holds 2
    assert [w.split(" has")[0] for w in warnings] == ["task ctr", "task cvr", "task ranking", "task sales"]
    assert reports[0] | {"path": ""} == {"path": "", "ok": True, "name": "Good shop", "rows": 4, "users": 3,
                                         "items": 2, "tasks": ["ctr", "cvr", "ranking", "sales"],
                                         "sales_derived": True, "ignored_columns": {}}
    err = reports[1]["error"]
    assert (err["row"], err["column"]) == (3, "event") and err["file"].endswith("interactions.csv")
    assert "impression" in err["fix"]


def test_missing_dir_is_an_error_not_a_crash(app: typer.Typer, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "--json", str(tmp_path / "nope")])
    assert result.exit_code == 1 and json.loads(result.output)[0]["error"]["problem"] == "no such shop directory"


def test_root_cli_registers_validate() -> None:
    from simulations.cli import app as root

    assert "validate" in [command.name for command in root.registered_commands]
