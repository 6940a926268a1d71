"""The privacy options through the MAIN apps: SecAgg+, central DP and DP-SGD selected by run config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flower_harness import tiny_scenario, write_scenario
from flwr.app import Context, RecordDict

from client import client_app
from server.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from server.secagg_settings import SecAggSettings
from server.server_app import STOP_FILE, make_server_app, split_privacy
from simulations.privacy.in_process_grid import InProcessGrid, nodes

N_SHOPS = 3
MAX_WEIGHT = 1e4  # secagg-weighting = examples: at least the largest shop's training rows


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory) -> Path:
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("privacy-wiring") / "scenario.toml")


def _run(scenario_file: Path, run_dir: Path, rounds: int, **config: object) -> tuple[InProcessGrid, list]:
    """One federation through `server.server_app`'s main and `client.client_app.app`, in process."""
    grid = InProcessGrid(client_app.app, nodes(N_SHOPS))
    reports: list = []
    server = make_server_app({"scenario": str(scenario_file), "num-server-rounds": rounds, "run-dir": str(run_dir),
                              "min-shops": 2, "eval-split": "val", "final-split": "val", **config},
                             progress=lambda report, total: reports.append(report))
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return grid, reports


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def test_secure_aggregation_matches_plain_fedavg_within_quantisation(scenario_file: Path, tmp_path: Path) -> None:
    _, plain_reports = _run(scenario_file, tmp_path / "plain", 2)
    grid, reports = _run(scenario_file, tmp_path / "secure", 2, **{
        "secure-aggregation": True, "secagg-weighting": "examples", "secagg-max-weight": MAX_WEIGHT})
    # The coordinator only ever held masked integer vectors: no float arrays in any train reply.
    train = [r for r in grid.received if r.message_type == "train" and r.content is not None]
    assert train and all(len(rec) == 0 for r in train for rec in r.content.array_records.values())
    assert [r.server_round for r in reports] == [1, 2] and len(reports[0].train) == N_SHOPS
    step = SecAggSettings(clipping_range=8.0).quantisation_step()
    plain1 = load_checkpoint(checkpoint_path(tmp_path / "plain", 1)).arrays
    secure1 = load_checkpoint(checkpoint_path(tmp_path / "secure", 1)).arrays
    # Each shop's vector is scaled by num-examples / max-weight before quantising, so one quantum of the
    # sum is worth step / (sum of ratios) in the weighted mean.
    counts = [r["num-examples"] for r in plain_reports[0].train.values()]
    assert max(counts) <= MAX_WEIGHT
    ratio_sum = sum(counts) / MAX_WEIGHT
    err1 = _max_diff(secure1, plain1)
    assert 0 < err1 < N_SHOPS * step / ratio_sum
    # Round 2 trains from encoders that differ by that much. Adam turns a sign flip of a near-zero
    # gradient into a step of about the learning rate, so compare with how far round 2 moved the encoder.
    plain2, secure2 = latest_checkpoint(tmp_path / "plain").arrays, latest_checkpoint(tmp_path / "secure").arrays
    err2, moved = _max_diff(secure2, plain2), _max_diff(plain2, plain1)
    print(f"secagg vs plain: round 1 {err1:.2e} (bound {N_SHOPS * step / ratio_sum:.2e}), round 2 {err2:.2e}, "
          f"round-2 move {moved:.2e}")
    assert err2 < 0.25 * moved
    metrics = pd.read_csv(tmp_path / "secure" / "metrics.csv")
    assert set(metrics["round"]) == {1, 2} and {"train", "val"} <= set(metrics["split"])


def test_central_dp_logs_epsilon_each_round_and_stops_at_the_budget(scenario_file: Path, tmp_path: Path) -> None:
    dp = {"dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.5}
    _run(scenario_file, tmp_path / "probe", 3, **dp)
    probe = pd.read_csv(tmp_path / "probe" / "metrics.csv")
    eps = probe[(probe.shop == "coordinator") & (probe.task == "privacy") & (probe.metric == "epsilon")]
    assert list(eps["round"]) == [1, 2, 3]
    values = list(eps["value"])
    assert values[0] < values[1] < values[2]
    budget = (values[1] + values[2]) / 2  # admits exactly two rounds

    run_dir = tmp_path / "budget"
    _, reports = _run(scenario_file, run_dir, 5, **dp, **{"dp-max-epsilon": budget})
    assert [r.server_round for r in reports] == [1, 2]
    reason = (run_dir / STOP_FILE).read_text()
    assert "round 3 would take epsilon past dp-max-epsilon" in reason and "Fix:" in reason
    metrics = pd.read_csv(run_dir / "metrics.csv")
    eps = metrics[(metrics.shop == "coordinator") & (metrics.metric == "epsilon")]
    assert list(eps["round"]) == [1, 2] and eps["value"].max() <= budget
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.server_round == 2
    assert all(np.isfinite(a).all() for a in ckpt.arrays.values())


def test_dpsgd_epsilon_grows_across_rounds_and_survives_a_restart(scenario_file: Path, tmp_path: Path) -> None:
    dpsgd = {"dpsgd-noise-multiplier": 1.0, "dpsgd-sample-rate": 0.2, "dpsgd-steps": 2}
    _run(scenario_file, tmp_path, 2, **dpsgd)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    eps = metrics[(metrics.task == "privacy") & (metrics.metric == "epsilon")]
    per_shop = eps.pivot(index="shop", columns="round", values="value")
    assert len(per_shop) == N_SHOPS
    assert (per_shop[1] > 0).all() and (per_shop[2] > per_shop[1]).all()
    # A resumed run (fresh processes: new contexts) picks the accountant up from the shop's state directory.
    _run(scenario_file, tmp_path, 3, **dpsgd, resume=True)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    eps = metrics[(metrics.task == "privacy") & (metrics.metric == "epsilon")]
    per_shop = eps.pivot(index="shop", columns="round", values="value")
    assert (per_shop[3] > per_shop[2]).all()


def test_privacy_keys_are_split_off_before_the_settings_and_misuse_is_named() -> None:
    settings, on, secagg, dp = split_privacy({"scenario": "x", "secure-aggregation": True,
                                              "secagg-clipping-range": 4.0, "dpsgd-noise-multiplier": 1.5})
    assert on and secagg.clipping_range == 4.0 and not dp.enabled
    assert settings.client_config(1)["dpsgd-noise-multiplier"] == 1.5
    with pytest.raises(ValueError, match="not supported"):
        split_privacy({"secure-aggregation": True, "dp-noise-multiplier": 1.0})
    with pytest.raises(ValueError, match="dp-clipping-norm"):
        split_privacy({"dp-clip": 1.0})
    with pytest.raises(ValueError, match="run config: unknown key 'roundz'. Fix: did you mean 'num-server-rounds'"):
        split_privacy({"roundz": 3})
    with pytest.raises(ValueError, match="unit"):
        split_privacy({"dpsgd-noise-multiplier": 1.0, "dpsgd-unit": "household"})


def test_scenario_privacy_keys_reach_the_run_config(tmp_path: Path) -> None:
    from simulations.federated import run_config

    plain = run_config(tiny_scenario(), tmp_path, method="fedshop", rounds=1, resume=False)
    # Every key is in the derived run config; privacy is off unless the scenario turns it on.
    assert plain["secure-aggregation"] is False and plain["dp-noise-multiplier"] == 0
    assert plain["dpsgd-noise-multiplier"] == 0
    scenario = tiny_scenario(**{"federation.secure_aggregation": True, "federation.dp_noise_multiplier": 0.0,
                                "federation.dpsgd_noise_multiplier": 0.8, "federation.dpsgd_unit": "record"})
    config = run_config(scenario, tmp_path, method="fedshop", rounds=1, resume=False)
    assert config["secure-aggregation"] is True and config["dpsgd-unit"] == "record"
    settings, on, _, dp = split_privacy(config)
    assert on and not dp.enabled and settings.dpsgd_noise_multiplier == 0.8
    dp_config = run_config(tiny_scenario(**{"federation.dp_noise_multiplier": 1.1, "federation.max_epsilon": 5.0}),
                           tmp_path, method="fedshop", rounds=1, resume=False)
    _, _, _, dp = split_privacy(dp_config)
    assert dp.enabled and dp.noise_multiplier == 1.1 and dp.max_epsilon == 5.0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pool", "ray"])
def test_secure_aggregation_on_the_simulation_engine(engine: str, tmp_path: Path) -> None:
    from simulations.federated import run_federated

    run_dir = run_federated(tiny_scenario(**{"federation.secure_aggregation": True}), tmp_path / "run", rounds=1,
                            engine=engine)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.server_round == 1 and ckpt.settings == {"secure-aggregation": True}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics[metrics.split == "train"]["shop"].nunique() == N_SHOPS
    assert {"val", "test"} <= set(metrics["split"])
