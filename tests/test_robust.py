"""Screens against a malicious shop (server/robust.py) and robust rules, through ShopStrategy with real Messages."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flower_harness import TEST_FAULTS, LocalGrid, tiny_scenario, write_scenario
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client import client_app
from server.robust import (
    NETWORK_MAX,
    RobustSettings,
    cap_claims,
    cap_shares,
    leave_one_out,
    median_update,
    screen,
    sorting_network,
)
from server.server_app import FAILED_FILE, FederationSettings, failure_reason, run_federation
from server.strategies import RoundReport, RunFailed, ShopStrategy, build_strategy

N = 8
SHAPES = {"a": (4, 3), "b": (5,)}
RNG = np.random.default_rng(0)
GLOBAL = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
DIRECTION = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}  # the honest shops' common step


def _honest_delta(i: int) -> dict[str, np.ndarray]:
    """Shop i's step: the common direction plus a little shop-specific noise."""
    rng = np.random.default_rng(100 + i)
    return {k: 0.1 * DIRECTION[k] + 0.01 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _round(strategy: ShopStrategy, replies: dict[int, tuple[dict[str, Array] | dict[str, np.ndarray], float]]
           ) -> tuple[ArrayRecord | None, RoundReport]:
    """Send the global arrays to N shops, get ``replies`` (shop index -> arrays, num-examples) back, aggregate."""
    reports: list[RoundReport] = []
    strategy.on_round_end = reports.append
    grid = LocalGrid(N, None)
    sent = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(),
                                         grid))
    out = []
    for msg in sent:
        i = msg.metadata.dst_node_id - 1000
        arrays, examples = replies[i]
        record = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})
        out.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": examples,
                                                                                  "shop-index": i})}),
                           reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, out)
    strategy.aggregate_evaluate(1, [])
    return arrays, reports[0]


def _strategy(inner: FedAvg | None = None, robust: RobustSettings | None = None, min_shops: int = 2) -> ShopStrategy:
    inner = inner or FedAvg(min_train_nodes=N, min_available_nodes=N, fraction_evaluate=0.0)
    return ShopStrategy(inner, min_shops=min_shops, shop_name=lambda i: f"shop_{i:02d}", robust=robust)


def _honest_replies(examples: float = 1000.0) -> dict[int, tuple[dict[str, np.ndarray], float]]:
    return {i: ({k: GLOBAL[k] + d for k, d in _honest_delta(i).items()}, examples) for i in range(N)}


def _delta(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([(arrays[k].numpy() - GLOBAL[k]).ravel() for k in sorted(SHAPES)])


def _honest_mean() -> np.ndarray:
    return np.mean([np.concatenate([_honest_delta(i)[k].ravel() for k in sorted(SHAPES)]) for i in range(1, N)],
                   axis=0)


# ---- bad replies: a left-out shop with a reason, not a crash -------------------------------------------------

def test_a_wrong_shape_array_leaves_that_shop_out_with_a_reason():
    replies = _honest_replies()
    replies[0] = ({"a": np.zeros((3, 4), np.float32), "b": GLOBAL["b"]}, 1000.0)
    arrays, report = _round(_strategy(), replies)
    assert "shop_00" not in report.train and len(report.train) == N - 1
    assert "shape" in report.left_out["shop_00"] and "'a'" in report.left_out["shop_00"]
    assert arrays is not None and arrays["a"].numpy().shape == SHAPES["a"]


def test_well_shaped_garbage_bytes_leave_that_shop_out_with_a_reason():
    replies = _honest_replies()
    good = Array(GLOBAL["a"])
    garbage = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=os.urandom(len(good.data)))
    replies[3] = ({"a": garbage, "b": GLOBAL["b"]}, 1000.0)
    arrays, report = _round(_strategy(), replies)
    assert "cannot be decoded" in report.left_out["shop_03"]
    assert "shop_03" not in report.train and arrays is not None


def test_missing_or_extra_encoder_arrays_leave_that_shop_out():
    replies = _honest_replies()
    replies[1] = ({"a": GLOBAL["a"]}, 1000.0)
    replies[2] = ({**GLOBAL, "c": np.zeros(2, np.float32)}, 1000.0)
    _, report = _round(_strategy(), replies)
    assert "differ from the global encoder" in report.left_out["shop_01"]
    assert "differ from the global encoder" in report.left_out["shop_02"]


# ---- the screens, through the strategy ------------------------------------------------------------------------

def test_a_clean_round_keeps_every_shop_and_is_the_plain_weighted_mean():
    arrays, report = _round(_strategy(), _honest_replies())
    assert not report.left_out and len(report.train) == N
    all_mean = np.mean([np.concatenate([_honest_delta(i)[k].ravel() for k in sorted(SHAPES)]) for i in range(N)], 0)
    np.testing.assert_allclose(_delta(arrays), all_mean, atol=1e-6)


@pytest.mark.parametrize("scale", [100.0, -10.0])
def test_a_scaled_update_beyond_the_norm_bound_is_left_out(scale):
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] + scale * d for k, d in _honest_delta(0).items()}, 1000.0)
    arrays, report = _round(_strategy(), replies)
    assert "norm" in report.left_out["shop_00"] and "median" in report.left_out["shop_00"]
    np.testing.assert_allclose(_delta(arrays), _honest_mean(), atol=1e-6)


def test_clip_action_scales_the_outlier_down_to_the_bound_instead():
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] + 100 * d for k, d in _honest_delta(0).items()}, 1000.0)
    arrays, report = _round(_strategy(robust=RobustSettings(norm_action="clip")), replies)
    assert "shop_00" in report.train and not report.left_out
    norms = [np.linalg.norm(np.concatenate([d.ravel() for d in _honest_delta(i).values()])) for i in range(N)]
    # the clipped update has norm 4 x median, so the mean moves by at most ~5 x median / N off the honest mean
    assert np.linalg.norm(_delta(arrays) - _honest_mean()) < 5 * np.median(norms) / N


def test_a_sign_flipped_update_is_left_out_by_the_direction_check():
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] - d for k, d in _honest_delta(0).items()}, 1000.0)
    arrays, report = _round(_strategy(), replies)
    assert "direction" in report.left_out["shop_00"] and "cosine" in report.left_out["shop_00"]
    np.testing.assert_allclose(_delta(arrays), _honest_mean(), atol=1e-6)
    _, loo = _round(_strategy(robust=RobustSettings(min_cosine=-1.0)), replies)  # -1: median check off
    assert "leave-one-out" in loo.left_out["shop_00"]  # the leave-one-out screen still catches it
    _, off = _round(_strategy(robust=RobustSettings(min_cosine=-1.0, loo_min_cosine=-1.0)), replies)  # both off
    assert "shop_00" in off.train


def test_a_huge_examples_claim_cannot_take_the_average():
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] + 1.5 * (0.1 * DIRECTION[k]) for k in SHAPES}, 1e9)  # inside the norm bound
    arrays, report = _round(_strategy(), replies)
    assert "shop_00" in report.train
    honest, attacker = _honest_mean(), np.concatenate([(0.15 * DIRECTION[k]).ravel() for k in sorted(SHAPES)])
    share = float((_delta(arrays) - honest) @ (attacker - honest) / np.sum((attacker - honest) ** 2))
    assert 0.3 < share <= 4 / N + 1e-4  # robust-weight-cap = 4: at most four times the equal share
    unscreened, _ = _round(_strategy(robust=RobustSettings.off()), replies)
    np.testing.assert_allclose(_delta(unscreened), attacker, atol=1e-4)  # what the cap prevents


def test_too_few_shops_left_after_the_screens_skip_the_round():
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] + 100 * d for k, d in _honest_delta(0).items()}, 1000.0)
    arrays, report = _round(_strategy(min_shops=N), replies)
    assert arrays is None and f"min-shops={N}" in report.skipped and "norm" in report.skipped


@pytest.mark.parametrize("rule", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_each_robust_rule_resists_one_x100_attacker_without_any_screen(rule):
    replies = _honest_replies()
    replies[0] = ({k: GLOBAL[k] + 100 * d for k, d in _honest_delta(0).items()}, 1000.0)
    inner = build_strategy(rule, min_shops=N, num_malicious=1, trim_beta=0.2)
    arrays, report = _round(_strategy(inner, robust=RobustSettings.off()), replies)
    assert arrays is not None and not report.left_out
    honest = _honest_mean()
    assert np.linalg.norm(_delta(arrays) - honest) < 0.5 * np.linalg.norm(honest)
    plain, _ = _round(_strategy(robust=RobustSettings.off()), replies)
    assert np.linalg.norm(_delta(plain) - honest) > 5 * np.linalg.norm(honest)  # FedAvg alone does not


def test_bulyan_short_of_4f_plus_3_updates_skips_the_round_and_says_why():
    strategy = _strategy(build_strategy("bulyan", min_shops=2, num_malicious=2), robust=RobustSettings.off())
    arrays, report = _round(strategy, _honest_replies())  # 8 updates, Bulyan with f = 2 needs 11
    assert arrays is None and strategy.aggregated_rounds == 0
    assert "Bulyan needs at least 4 x num-malicious + 3 = 11 usable updates" in report.skipped


def test_multikrum_averages_all_but_the_assumed_attackers_each_round():
    strategy = _strategy(build_strategy("multikrum", min_shops=2, num_malicious=1), robust=RobustSettings.off())
    _round(strategy, _honest_replies())
    assert strategy.inner.num_nodes_to_select == N - 1


# ---- the pure screens -------------------------------------------------------------------------------------------

def test_claims_are_capped_by_the_round_median_and_the_shops_first_claim():
    assert cap_claims([100, 120, 1e9], [None, None, None], 10) == [100, 120, 1200]
    assert cap_claims([100, 120, 500], [None, None, 40], 10) == [100, 120, 400]
    assert cap_claims([100, 1e9], [None, None], 0) == [100, 1e9]  # 0: off


def test_weight_shares_are_capped_and_the_excess_goes_to_the_others():
    out = cap_shares([1000, 10, 10, 10], 2.0)
    shares = np.asarray(out) / sum(out)
    assert shares[0] == pytest.approx(0.5) and sum(out) == pytest.approx(1030)
    np.testing.assert_allclose(shares[1:], 0.5 / 3)
    assert cap_shares([1, 2, 3], 0.0) == [1, 2, 3]
    assert cap_shares([5, 5, 5, 5], 2.0) == [5, 5, 5, 5]


def test_the_direction_check_reads_each_array_not_the_whole_vector():
    # a big first array (a shop's own embedding rows) orthogonal to the others; the small dense arrays aligned
    rng = np.random.default_rng(1)
    common = rng.normal(size=30)
    deltas = [np.concatenate([rng.normal(size=3000), common + 0.1 * rng.normal(size=30)]) for _ in range(5)]
    bounds = [3000, 3010, 3020, 3030]
    per_array = screen(deltas, [1.0] * 5, [None] * 5, RobustSettings(min_cosine=0.8), bounds)
    assert not per_array.left_out and min(per_array.cosines) > 0.9
    whole = screen(deltas, [1.0] * 5, [None] * 5, RobustSettings(min_cosine=0.8))
    assert len(whole.left_out) == 5  # over the flat vector the embedding rows hide the agreement
    flipped = screen([-deltas[0], *deltas[1:]], [1.0] * 5, [None] * 5, RobustSettings(), bounds)
    assert set(flipped.left_out) == {0}


def test_screen_reports_norms_and_cosines():
    deltas = [np.ones(4), np.ones(4) * 1.1, np.ones(4) * 0.9, -np.ones(4)]
    out = screen(deltas, [1, 1, 1, 1], [None] * 4, RobustSettings())
    assert set(out.left_out) == {3} and out.cosines[3] == pytest.approx(-1.0)


@pytest.mark.parametrize("bad", [{"norm_action": "drop"}, {"norm_factor": 0.5}, {"min_cosine": 2.0},
                                 {"examples_cap": 0.5}, {"weight_cap": 0.5}])
def test_bad_robust_settings_are_refused_with_the_key_and_a_fix(bad):
    with pytest.raises(ValueError, match=r"robust-.*Fix"):
        RobustSettings(**bad)


def test_run_config_rejects_a_bad_robust_key_before_the_run():
    with pytest.raises(ValueError, match="robust.weight.cap"):
        FederationSettings.from_config({"robust-weight-cap": 0.5})


# ---- a run whose every round is skipped fails -------------------------------------------------------------------

def test_a_run_whose_every_round_is_skipped_fails_with_the_reason(tmp_path):
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / FAILED_FILE).write_text("an older failure\n")
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 1,
                                               "run-dir": str(tmp_path / "run"), "min-shops": 3, "max-steps": 2,
                                               "max-short-rounds": 3, "fault-inject": "nan:0"})
    with pytest.raises(RunFailed, match=r"every round \(1-1\) was skipped.*NaN"):
        run_federation(LocalGrid(3, client_app.app, node_config=TEST_FAULTS), settings)
    reason = failure_reason(tmp_path / "run")
    assert reason is not None and "min-shops=3" in reason and "shop_00" in reason and "older" not in reason


def test_the_cli_exits_non_zero_and_says_why_when_the_run_fails(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import simulations.commands.simulate as federate
    from simulations.cli import app
    from simulations.federated import RunFailed as CliRunFailed

    def failing(*_args, **_kwargs):
        raise CliRunFailed("every round (1-2) was skipped, none updated the model")

    monkeypatch.setattr(federate, "run_federated", failing)
    result = CliRunner().invoke(app, ["simulate", "default", "--run-dir", str(tmp_path / "run"), "--rounds", "2"])
    assert result.exit_code == 1
    assert "run failed" in result.output and "every round" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pool", "ray"])
def test_a_simulated_run_whose_every_round_is_skipped_raises_run_failed(engine, tmp_path):
    """Through either engine: the ServerApp's failure reaches the caller with its reason."""
    from simulations.federated import RunFailed as SimRunFailed
    from simulations.federated import run_federated

    scenario = tiny_scenario(**{"federation.min_shops": 3})
    with pytest.raises(SimRunFailed, match=r"every round \(1-1\) was skipped"):
        run_federated(scenario, tmp_path / "run", rounds=1, engine=engine,
                      extra_config={"fault-inject": "nan:0", "max-steps": 2})
    assert "min-shops=3" in (failure_reason(tmp_path / "run") or "")



def test_the_sorting_network_sorts_every_input_up_to_its_limit():
    rng = np.random.default_rng(0)
    for n in range(1, NETWORK_MAX + 1):
        values = rng.integers(0, 4, size=(200, n))  # many ties
        for lo, hi in sorting_network(n):
            values[:, [lo, hi]] = np.sort(values[:, [lo, hi]], axis=1)
        assert (np.diff(values, axis=1) >= 0).all(), n


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 30, NETWORK_MAX + 8])
def test_the_screens_median_and_leave_one_out_are_bit_identical_to_the_plain_formulas(n):
    rng = np.random.default_rng(n)
    deltas = [(rng.standard_normal(20_000) * rng.uniform(0.01, 1)).astype(np.float32) for _ in range(n)]
    for d in deltas:
        d[rng.integers(0, d.size, d.size // 2)] = 0.0  # row-sparse updates: many exact zeros and ties
        d[:50] = -0.0
        d[50:60] = np.float32(1e-45)  # subnormals: the middle pair's halving rounds
    expected = np.median(np.stack(deltas), axis=0)
    got = median_update(deltas)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()  # sign of zero included
    if n < 3:
        return
    for kept in (list(range(n)), list(range(1, n))):  # every update kept, and one left out
        total = np.sum(np.stack([deltas[i] for i in kept]), axis=0, dtype=np.float64)
        expected = {}
        for i, d in enumerate(deltas):
            others = (total - d) / (len(kept) - 1) if i in kept else total / len(kept)
            a = d.astype(np.float64)
            expected[i] = float(a @ others) / (float(np.linalg.norm(a)) * float(np.linalg.norm(others)))
        assert leave_one_out(deltas, kept) == expected
