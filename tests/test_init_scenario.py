"""`fedshop init-scenario`: a world from `fedshop generate`, a scenario over its shop directories, loaded."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shared.scenario import load_scenario
from simulations.commands import generate, init_scenario, validate

# The commands alone, without the root app's callback (it reconfigures Flower's logger for the whole process).
app = typer.Typer()
generate.register(app)
validate.register(app)
init_scenario.register(app)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("own-data") / "world"
    result = CliRunner().invoke(app, ["generate", "--shops", "2", "--late-joiners", "0", "--eval-impressions", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_init_scenario_writes_a_shop_dirs_scenario_that_loads_the_shops(world: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths given, absolute paths written
    shops = sorted(p for p in world.iterdir() if p.is_dir())
    dirs = [os.path.relpath(p, tmp_path) for p in shops]
    out = tmp_path / "mine.toml"
    result = CliRunner().invoke(app, ["init-scenario", *dirs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "shop_00" in result.output and "rows per split" in result.output
    assert f"fedshop simulate {out}" in result.output
    raw = tomllib.loads(out.read_text())
    assert raw["data"] == {"source": "shop-dirs", "paths": [str(p.resolve()) for p in shops]}
    assert raw["transfer"]["late_joiners"] == [] and "synthetic" not in raw["data"]
    scenario = load_scenario(out)
    default = load_scenario("default")
    assert scenario.name == "mine"
    assert (scenario.model, scenario.federation) == (default.model, default.federation)  # settings of `default`
    assert [s.name for s in scenario.training_shops()] == ["shop_00", "shop_01"]
    assert len(scenario.training_shops()[1].interactions) > 0

    again = CliRunner().invoke(app, ["init-scenario", *dirs, "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output


def test_init_scenario_writes_nothing_when_a_shop_is_refused(world: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "interactions.csv").write_text("user_id,item_id,timestamp,event\nu1,i1,1700000000,teleport\n")
    out = tmp_path / "s.toml"
    result = CliRunner().invoke(app, ["init-scenario", str(world / "shop_00"), str(bad), "--out", str(out)])
    assert result.exit_code == 1
    assert "interactions.csv" in result.output and "Nothing written" in result.output
    assert not out.exists()
    twice = CliRunner().invoke(app, ["init-scenario", str(world / "shop_00"), str(world / "shop_00"),
                                     "--out", str(out)])
    assert twice.exit_code == 1 and "also the name of" in twice.output and not out.exists()


def test_init_scenario_loads_the_base_scenario_once(world: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    real = init_scenario.load_scenario

    def counting(name, *args, **kwargs):
        loaded.append(str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(init_scenario, "load_scenario", counting)
    out = tmp_path / "once.toml"
    result = CliRunner().invoke(app, ["init-scenario", str(world / "shop_00"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert loaded == ["default", str(out)]  # the base once, then the written file as simulate will read it
