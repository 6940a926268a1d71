"""A merchant's local-part file counts the rounds its local part has trained, across runs and restarts."""

from __future__ import annotations

import pytest
import torch
from flower_harness import tiny_scenario
from flwr.app import Context, RecordDict

from client.local_state import STATE_FILE, restore_local_part, rounds_trained, save_local_part
from shared.features import build_shop_tensors
from shared.model import build_model
from simulations.deploy.merchant import node_config


@pytest.fixture(scope="module")
def shop():
    scenario = tiny_scenario()
    return scenario, build_shop_tensors(scenario.training_shops()[0], scenario.features)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _saved(tmp_path) -> dict:
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    return {"round": payload["round"], "rounds_trained": payload["rounds_trained"]}


def _train_round(shop, context: Context, tmp_path, server_round: int) -> str:
    scenario, tensors = shop
    model = build_model(tensors, scenario.model, scenario.features, seed=server_round)
    source = restore_local_part(model, context, tmp_path)
    save_local_part(model, context, tmp_path, shop="s", server_round=server_round)
    return source


def test_lineage_grows_within_a_run_and_carries_into_the_next(shop, tmp_path) -> None:
    run1 = _context()
    assert [_train_round(shop, run1, tmp_path, r) for r in (1, 2)] == ["fresh", "context"]
    assert _saved(tmp_path) == {"round": 2, "rounds_trained": 2} and rounds_trained(run1) == 2
    run2 = _context()  # a new run, or a restarted SuperNode: empty context.state, the file is used
    assert _train_round(shop, run2, tmp_path, 1) == "disk"
    assert _saved(tmp_path) == {"round": 1, "rounds_trained": 3}


def test_a_corrupt_file_restarts_the_lineage(shop, tmp_path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\x00garbage")
    assert _train_round(shop, _context(), tmp_path, 4) == "fresh"
    assert _saved(tmp_path) == {"round": 4, "rounds_trained": 1}


def test_node_config_carries_the_shop_index(tmp_path) -> None:
    text = node_config(tmp_path / "shop", tmp_path / "state", 2)
    assert text.endswith("shop-index=2") and f"shop-dir='{tmp_path / 'shop'}'" in text
    assert "shop-index" not in node_config(tmp_path / "shop", tmp_path / "state")
    with pytest.raises(ValueError, match="--shop-index -1"):
        node_config(tmp_path / "shop", tmp_path / "state", -1)
