"""The Reptile-style objective runs through the real apps: short inner loops, a partial outer step."""

from __future__ import annotations

import numpy as np
from flower_harness import LocalGrid, tiny_scenario, write_scenario

from client import client_app
from server.server_app import FederationSettings, initial_encoder, run_federation


def _first_round(tmp_path, name: str, **config):
    scenario = tiny_scenario()
    path = write_scenario(scenario, tmp_path / f"{name}.toml")
    settings = FederationSettings.from_config({"scenario": str(path), "num-server-rounds": 1,
                                               "run-dir": str(tmp_path / name), **config})
    reports = []
    run_federation(LocalGrid(3, client_app.app), settings, lambda report, total: reports.append(report))
    start = {k: a.numpy() for k, a in initial_encoder(scenario).items()}
    return reports[0], start


def test_meta_objective_moves_the_encoder_part_way(tmp_path):
    full, start = _first_round(tmp_path, "full", objective="meta", **{"meta-inner-steps": 3})
    half, _ = _first_round(tmp_path, "half", objective="meta", **{"meta-inner-steps": 3, "meta-outer-step": 0.5})
    assert set(full.train) == {"shop_00", "shop_01", "shop_02"}
    key = "experts.0.0.weight"
    move_full = full.arrays[key].numpy() - start[key]
    move_half = half.arrays[key].numpy() - start[key]
    assert np.abs(move_full).max() > 0
    np.testing.assert_allclose(move_half, 0.5 * move_full, rtol=1e-4, atol=1e-6)
