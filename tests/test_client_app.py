"""The shop's ClientApp: local part kept in context.state and on disk, corrupt state never fatal."""

from __future__ import annotations

import logging

import pytest
import torch
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client.client_app import round_seed
from client.local_state import STATE_FILE, restore_local_part, save_local_part
from shared.features import build_shop_tensors
from shared.model import build_model


@pytest.fixture(scope="module")
def shop():
    scenario = tiny_scenario()
    return scenario, build_shop_tensors(scenario.training_shops()[0], scenario.features)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _model(shop, seed: int):
    scenario, tensors = shop
    return build_model(tensors, scenario.model, scenario.features, seed=seed)


def test_local_part_survives_in_context_and_on_disk(shop, tmp_path):
    trained, ctx = _model(shop, seed=1), _context()
    save_local_part(trained, ctx, tmp_path, shop="s", server_round=3)
    for context in (ctx, _context()):  # the second has an empty state: the disk copy is used
        fresh = _model(shop, seed=2)
        source = restore_local_part(fresh, context, tmp_path)
        assert source == ("context" if context is ctx else "disk")
        for key, value in trained.local_state().items():
            assert torch.equal(fresh.local_state()[key], value)


def test_a_corrupt_state_file_warns_and_starts_fresh(shop, tmp_path, caplog):
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    model = _model(shop, seed=2)
    before = model.local_state()
    with caplog.at_level(logging.WARNING):
        assert restore_local_part(model, _context(), tmp_path) == "fresh"
    assert "unreadable" in caplog.text and STATE_FILE in caplog.text
    assert all(torch.equal(model.local_state()[k], v) for k, v in before.items())


def test_an_incompatible_state_file_warns_and_starts_fresh(shop, tmp_path, caplog):
    scenario, _ = shop
    other = build_shop_tensors(scenario.training_shops()[2], scenario.features)  # other vocabulary sizes
    save_local_part(build_model(other, scenario.model, scenario.features), _context(), tmp_path, shop="o",
                    server_round=1)
    with caplog.at_level(logging.WARNING):
        assert restore_local_part(_model(shop, seed=2), _context(), tmp_path) == "fresh"
    assert "does not fit" in caplog.text


def test_round_seeds_differ_by_round_and_shop_and_repeat():
    seeds = {round_seed(0, r, s) for r in range(1, 4) for s in range(3)}
    assert len(seeds) == 9
    assert round_seed(0, 2, 1) == round_seed(0, 2, 1)
