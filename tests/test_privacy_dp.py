"""Central DP over shops: clipping on the shop, Flower's RDP accountant, epsilon each round, budget stop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

from server.dp import CentralDP, CentralDPSettings, wrap
from server.federation_settings import split_privacy
from shared.settings import FederationTable, ScenarioError
from simulations.privacy.in_process_grid import InProcessGrid, nodes

N_SHOPS = 4


def _toy_app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=[fixedclipping_mod])
    def train(msg: Message, context: Context) -> Message:
        shop = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        # A big update (norm ~ 20) so that clipping to S matters; shops differ in size.
        new = [a + (shop + 1) * 5.0 for a in arrays]
        rec = ArrayRecord({k: Array(v) for k, v in zip(msg.content["arrays"].keys(), new, strict=True)})
        metrics = MetricRecord({"num-examples": 10 * (shop + 1), "loss": 0.1})
        return Message(RecordDict({"arrays": rec, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


def _start(settings: CentralDPSettings, rounds: int, releases: list):
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=N_SHOPS, min_train_nodes=N_SHOPS)
    strategy = wrap(inner, settings, num_shops=N_SHOPS, on_release=lambda r, rep: releases.append((r, rep)))
    assert isinstance(strategy, CentralDP)
    grid = InProcessGrid(_toy_app(), nodes(N_SHOPS))
    initial = ArrayRecord({"w": Array(np.zeros((4, 4), np.float32)), "b": Array(np.zeros(4, np.float32))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord({}))
    return strategy, result


def test_clipped_noised_mean_and_epsilon_every_round() -> None:
    releases: list = []
    settings = CentralDPSettings(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
    strategy, result = _start(settings, 3, releases)
    assert [r for r, _ in releases] == [1, 2, 3]
    eps = [rep.epsilon for _, rep in releases]
    assert eps[0] < eps[1] < eps[2]
    assert all(rep.unit == "shop" and rep.noise_multiplier == 1.0 and rep.clipping_norm == 1.0 for _, rep in releases)
    # The same ledger in Flower's accountant directly: three Gaussian releases, no amplification.
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    ref = RdpAccountant(PrivacyConfig(1e-5, N_SHOPS, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      SamplingMethod.NO_AMPLIFICATION))
    ref.compose(GaussianPrivacyEvent(1.0, N_SHOPS, N_SHOPS), count=3)
    assert eps[2] == pytest.approx(ref.get_epsilon(1e-5))
    assert strategy.round_metrics()["epsilon"] == pytest.approx(eps[2])
    # Each round moves the model by the clipped mean (norm <= S) plus noise of std z*S/n per entry.
    final = np.concatenate([a.numpy().ravel() for a in result.arrays.values()])
    per_round_noise = settings.noise_multiplier * settings.clipping_norm / N_SHOPS
    assert np.linalg.norm(final) < 3 * (1.0 + 4 * per_round_noise * np.sqrt(final.size))


def test_budget_stop_before_the_round_that_would_exceed() -> None:
    releases: list = []
    # Find a budget that admits exactly 2 rounds.
    probe: list = []
    _start(CentralDPSettings(noise_multiplier=2.0, clipping_norm=1.0), 3, probe)
    budget = (probe[1][1].epsilon + probe[2][1].epsilon) / 2
    with pytest.raises(PrivacyBudgetExhausted, match=r"round 3 would take epsilon past dp-max-epsilon"):
        _start(CentralDPSettings(noise_multiplier=2.0, clipping_norm=1.0, max_epsilon=budget), 10, releases)
    assert [r for r, _ in releases] == [1, 2]  # round 3 was never sent, so round 2's checkpoint is the last
    assert releases[-1][1].epsilon <= budget


def test_resume_replays_the_ledger_and_config_errors() -> None:
    settings = CentralDPSettings(noise_multiplier=1.0, clipping_norm=1.0)
    fresh = CentralDP(FedAvg(), settings, num_shops=N_SHOPS, completed_rounds=3)
    assert fresh.report().steps == 3 and fresh.report().epsilon > 0
    *_, dp = split_privacy({"dp-noise-multiplier": 1.2, "dp-max-epsilon": 8, "scenario": "default"})
    assert dp.enabled and dp.max_epsilon == 8.0 and dp.clipping_norm == 1.0
    assert CentralDPSettings() == CentralDPSettings.from_settings(FederationTable())  # one set of defaults
    assert wrap(FedAvg(), CentralDPSettings(), num_shops=3).__class__ is FedAvg
    with pytest.raises(ScenarioError, match="dp-clipping-norm"):
        split_privacy({"dp-clip": 1.0})
    with pytest.raises(ScenarioError, match="dp-delta"):
        split_privacy({"dp-delta": 1.0})
