"""Checkpoints: strategy state and RNG survive a round trip; resume continues where a run stopped."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario

from client import client_app
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    check_settings,
    latest_checkpoint,
    list_checkpoints,
    load_strategy_state,
    restore_rng,
    save_checkpoint,
    strategy_state,
)
from server.server_app import FederationSettings, initial_encoder, run_federation
from server.strategies import STRATEGIES, build_strategy
from shared.features import build_shop_tensors
from shared.model import build_model


def test_fedadam_moments_and_rng_round_trip(tmp_path):
    adam = build_strategy("fedadam")
    adam.m_t = {"w": np.arange(3, dtype=np.float32)}
    adam.v_t = {"w": np.ones(3, dtype=np.float32)}
    random.seed(3)
    rng = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, Checkpoint(4, {"w": np.zeros(3, np.float32)}, strategy_state(adam), rng, {"seed": 1}))
    ckpt = latest_checkpoint(tmp_path)
    fresh = build_strategy("fedadam")
    load_strategy_state(fresh, ckpt.strategy_state)
    np.testing.assert_array_equal(fresh.m_t["w"], adam.m_t["w"])
    np.testing.assert_array_equal(fresh.v_t["w"], adam.v_t["w"])
    restore_rng(ckpt.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert ckpt.server_round == 4


def test_old_checkpoints_are_pruned_and_a_corrupt_newest_one_is_skipped(tmp_path):
    for rnd in range(1, 5):
        save_checkpoint(tmp_path, Checkpoint(rnd, {"w": np.full(2, rnd, np.float32)}), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-0003.pt", "round-0004.pt"]
    list_checkpoints(tmp_path)[-1].write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).server_round == 3


def test_resume_refuses_changed_settings():
    ckpt = Checkpoint(2, {}, settings={"strategy": "fedadam"})
    with pytest.raises(CheckpointError, match="strategy='fedadam'"):
        check_settings(ckpt, {"strategy": "fedavg"})


def test_server_initial_encoder_is_what_every_shop_builds():
    scenario = tiny_scenario()
    tensors = build_shop_tensors(scenario.training_shops()[1], scenario.features)
    shop_encoder = build_model(tensors, scenario.model, scenario.features, seed=scenario.seed).encoder_state()
    server = initial_encoder(scenario).to_torch_state_dict()
    assert set(server) == set(shop_encoder)
    assert all(torch.equal(server[k], shop_encoder[k]) for k in server)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_over_the_encoder(name, tmp_path):
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 1,
                                               "run-dir": str(tmp_path / "run"), "strategy": name,
                                               "proximal-mu": 0.01, "max-steps": 2,
                                               # Bulyan needs 4f + 3 replies: 3 shops allow f = 0
                                               "robust-num-malicious": 0 if name == "bulyan" else 1})
    run_federation(LocalGrid(3, client_app.app), settings)
    arrays = latest_checkpoint(tmp_path / "run").arrays
    assert set(arrays) == set(initial_encoder(tiny_scenario()))
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays.values())


@pytest.mark.parametrize("strategy", [{"strategy": "fedadam"},
                                      {"strategy": "fedavgm", "server-lr": 1.5, "server-momentum": 0.9}])
def test_in_process_resume_matches_an_uninterrupted_run(strategy, tmp_path):
    """Server optimiser state (FedAdam's moments, FedAvgM's momentum) survives a resume."""
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")

    def settings(run_dir, rounds, resume=False):
        return FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                               "run-dir": str(run_dir), **strategy,
                                               "max-steps": 3, "resume": resume})

    run_federation(LocalGrid(3, client_app.app), settings(tmp_path / "full", 3))
    run_federation(LocalGrid(3, client_app.app), settings(tmp_path / "cut", 2))
    run_federation(LocalGrid(3, client_app.app), settings(tmp_path / "cut", 3, resume=True))  # fresh contexts
    full, cut = latest_checkpoint(tmp_path / "full"), latest_checkpoint(tmp_path / "cut")
    assert full.server_round == cut.server_round == 3
    for key, value in full.arrays.items():
        np.testing.assert_allclose(cut.arrays[key], value, atol=1e-6, rtol=0)


def test_server_lr_zero_means_each_strategys_own_default():
    assert build_strategy("fedavgm").server_learning_rate == 1.0  # not FedAdam's 0.1
    assert build_strategy("fedadam").eta == build_strategy("fedyogi").eta == 0.1
    assert build_strategy("fedavgm", server_lr=2.0, server_momentum=0.5).server_learning_rate == 2.0
    assert build_strategy("fedadam", server_lr=0.03).eta == 0.03
