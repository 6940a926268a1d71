"""`fedshop pool`: the seeds of several compare runs in one report, and the runs it refuses."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from flower_harness import tiny_scenario
from typer.testing import CliRunner

from simulations.cli import app
from simulations.pool import PoolError, load_pool, write_pool
from simulations.rundir import METRIC_COLUMNS, write_run_info

runner = CliRunner()
# Test CTR AUC per seed and method on every training shop of the tiny scenario (validation best at round 2).
AUC = {"local": 0.70, "central": 0.80, "fedshop": 0.78}


def _compare_run(root: Path, name: str, seeds: list[int], methods: list[str], **overrides) -> Path:
    """A compare run directory as `fedshop compare` writes it, with hand-made metric rows."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    scenario = tiny_scenario(**{"seed": seeds[0], **overrides})
    write_run_info(run_dir, {"command": "compare", "methods": methods, "seeds": seeds, "scenario": scenario.raw})
    rows = []
    for seed in seeds:
        for method in methods:
            for shop in scenario.training_shops():
                for round_ in (1, 2):
                    for split, value in (("val", 0.6 + 0.1 * round_), ("test", AUC[method] + seed / 100)):
                        rows.append({"method": method, "round": round_, "shop": shop.name, "task": "ctr",
                                     "split": split, "metric": "auc", "value": value - (round_ == 1) * 0.2,
                                     "seed": seed})
    frame = pd.DataFrame(rows)
    frame.to_csv(run_dir / "metrics.csv", index=False, columns=METRIC_COLUMNS + (["seed"] if len(seeds) > 1 else []))
    return run_dir


def test_pooled_report_covers_every_seed_of_every_run(tmp_path):
    first = _compare_run(tmp_path, "a", [0], ["local", "central", "fedshop"])  # one seed: no seed column
    second = _compare_run(tmp_path, "b", [1, 2], ["local", "central"])
    third = _compare_run(tmp_path, "c", [1, 2], ["fedshop"])
    result = write_pool(load_pool([first, second, third]), tmp_path / "pooled")
    summary = json.loads((tmp_path / "pooled" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] == result.summary["seeds"]
    ctr = summary["tasks"]["ctr"]
    assert ctr["mean"]["local"] == pytest.approx(0.71) and ctr["mean"]["fedshop"] == pytest.approx(0.79)
    assert ctr["gap_closed"] == pytest.approx(0.8)
    for name in ("metrics.csv", "comparison.csv", "summary.md", "versions.json", "plots/final_ctr.png"):
        assert (tmp_path / "pooled" / name).exists(), name
    config = tomllib.loads((tmp_path / "pooled" / "config.toml").read_text())
    assert config["pooled_from"] == [str(first), str(second), str(third)] and config["seeds"] == [0, 1, 2]
    # The pooled run is itself a compare run: it pools again with a run of new seeds.
    more = _compare_run(tmp_path, "d", [3], ["local", "central", "fedshop"])
    assert load_pool([tmp_path / "pooled", more]).seeds == [0, 1, 2, 3]


def test_pool_refuses_runs_it_cannot_combine_and_names_the_fix(tmp_path):
    full = _compare_run(tmp_path, "full", [0, 1], ["local", "central", "fedshop"])
    with pytest.raises(PoolError, match="both hold local at seed 1.*leave one of them out"):
        load_pool([full, _compare_run(tmp_path, "overlap", [1, 2], ["local"])])
    with pytest.raises(PoolError, match=r"differ at 'train\.lr'.*same settings"):
        load_pool([full, _compare_run(tmp_path, "other-lr", [2], ["local"], **{"train.lr": 0.01})])
    with pytest.raises(PoolError, match=r"seed 2 has no central, fedshop.*--seeds 2 --methods central,fedshop"):
        load_pool([full, _compare_run(tmp_path, "partial", [2], ["local"])])
    with pytest.raises(PoolError, match="two or more"):
        load_pool([full])
    (tmp_path / "sim").mkdir()
    write_run_info(tmp_path / "sim", {"command": "simulate"})
    pd.DataFrame(columns=METRIC_COLUMNS).to_csv(tmp_path / "sim" / "metrics.csv", index=False)
    with pytest.raises(PoolError, match="not a compare run"):
        load_pool([full, tmp_path / "sim"])
    with pytest.raises(PoolError, match="config.toml does not exist"):
        load_pool([full, tmp_path / "nowhere"])
    (tmp_path / "sim" / "metrics.csv").unlink()
    write_run_info(tmp_path / "sim", {"command": "compare", "scenario": tiny_scenario().raw})
    with pytest.raises(PoolError, match="metrics.csv does not exist"):
        load_pool([full, tmp_path / "sim"])


def test_cli_pool_writes_the_report_or_exits_2_without_writing(tmp_path):
    a = _compare_run(tmp_path, "a", [0], ["local", "central", "fedshop"])
    b = _compare_run(tmp_path, "b", [1], ["local", "central", "fedshop"])
    out = tmp_path / "runs"
    result = runner.invoke(app, ["pool", str(a), str(b), "--runs", str(out)])
    assert result.exit_code == 0, result.output
    assert "pooled seeds 0, 1 from 2 runs" in result.output and "target gap_closed" in result.output
    (made,) = out.iterdir()
    assert made.name.startswith(f"{tiny_scenario().name}-pool-") and (made / "summary.json").exists()
    bad = runner.invoke(app, ["pool", str(a), str(a), "--runs", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "both hold" in bad.output and not (tmp_path / "none").exists()
