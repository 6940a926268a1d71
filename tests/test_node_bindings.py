"""Node <-> shop-index bindings (`server.node_identity.ShopClaims`) outlive a coordinator restart: the checkpoint
keeps them, a resumed run holds them from the start, and a node claiming another's index is refused, through the
strategy and checkpoint API and through the real resume path (`run_federation` on `LocalGrid`)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from flower_harness import LocalGrid, claiming_app, honest_train_round, tiny_scenario, write_scenario
from flwr.app import Error, Message
from flwr.serverapp.strategy import FedAvg

from client import client_app
from server.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from server.node_identity import ShopClaims, public_key_digest
from server.robust import RobustSettings
from server.server_app import FederationSettings, run_federation
from server.strategies import ShopStrategy
from shared.protocol import SHOP_INDEX

BIG = 2**64 - 5  # Flower's node IDs are unsigned 64-bit
KEY_A, KEY_B = public_key_digest(b"merchant-a"), public_key_digest(b"merchant-b")


class NodesGrid:
    """Just what `ShopClaims.observe` reads: the online nodes' IDs and public keys (Flower's `NodeInfo`)."""

    def __init__(self, nodes: dict[int, bytes]) -> None:
        self.nodes = nodes

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=n, public_key=k) for n, k in self.nodes.items()]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _roundtrip(tmp_path, claims: ShopClaims) -> dict[int, tuple[int, str]]:
    """``claims``' bindings as a resumed run reads them back from a checkpoint file."""
    save_checkpoint(tmp_path, Checkpoint(3, {"w": np.zeros(2, np.float32)}, shop_bindings=claims.export()))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.server_round == 3
    return ckpt.shop_bindings


# ---- ShopClaims and the checkpoint ------------------------------------------------------------------------------

def test_bindings_survive_a_checkpoint_and_a_node_claiming_anothers_index_is_refused_after_resume(tmp_path):
    before = ShopClaims(lambda: 3)
    assert before.check(101, 0) == (0, "") and before.check(BIG, 1) == (1, "")
    restored = _roundtrip(tmp_path, before)
    assert restored == {0: (101, ""), 1: (BIG, "")}
    after = ShopClaims(lambda: 3, restored=restored)
    index, why = after.check(666, 0)  # a hostile node answering first after the resume
    assert index is None and "which node 101 held before the resume" in why
    index, why = after.check(BIG, 0)  # shop 1's node claiming shop 0
    assert index is None and "was bound to 1 before the resume" in why
    assert after.check(101, 0) == (0, "") and after.check(666, 2) == (2, "")  # owner back; a free index binds
    # shop 1's node has not come back yet: its binding is carried into the next checkpoint
    assert after.export() == {0: (101, ""), 1: (BIG, ""), 2: (666, "")}
    assert after.check(777, 1)[0] is None


def test_a_restored_binding_follows_the_key_when_the_node_id_changed():
    after = ShopClaims(lambda: 3, restored={0: (101, KEY_A)})
    after.observe(NodesGrid({201: b"merchant-a", 202: b"merchant-b"}))  # a restarted SuperLink: new node IDs
    index, why = after.check(202, 0)
    assert index is None and "held before the resume" in why  # another key
    assert after.check(201, 0) == (0, "")  # the same key under a new node ID keeps its shop
    assert after.export() == {0: (201, KEY_A)}
    assert after.check(202, 1) == (1, "")


def test_an_offline_owner_keeps_its_index_while_any_restored_node_is_online(caplog):
    after = ShopClaims(lambda: 3, restored={0: (101, ""), 1: (102, "")})
    after.observe(NodesGrid({102: b"", 666: b""}))  # 101 is offline; 102 shows the node IDs were kept
    assert after.check(666, 0)[0] is None and after.check(101, 0) == (0, "")
    assert "bind on first use again" not in caplog.text


def test_restored_bindings_are_dropped_when_no_restored_node_is_online(caplog):
    """Flower's Ray simulation (and unauthenticated SuperNodes) draw new node IDs and keys in every process: the
    restored bindings match nobody, and keeping them would refuse every shop after `--resume`."""
    caplog.set_level(logging.WARNING)
    after = ShopClaims(lambda: 3, restored={0: (101, KEY_A), 1: (102, "")})
    after.observe(NodesGrid({301: b"fresh-1", 302: b"fresh-2"}))
    assert "none of the 2 node(s) bound to a shop-index before the resume is online" in caplog.text
    assert after.check(302, 0) == (0, "") and after.check(301, 1) == (1, "") and not after.restored


def test_a_grid_without_node_info_still_tells_which_nodes_are_online():
    class IdsOnly(NodesGrid):
        def get_nodes(self) -> list[SimpleNamespace]:
            raise NotImplementedError

    claims = ShopClaims(lambda: 3, restored={0: (101, KEY_A)})
    assert claims.observe(IdsOnly({101: b"", 102: b""})) == {101, 102} and claims.keys == {}
    assert claims.restored == {0: (101, KEY_A)} and claims.check(102, 0)[0] is None


def test_with_authenticated_keys_a_restored_binding_holds_even_when_every_owner_is_offline(caplog):
    """`fedshop coordinator run` (SuperNode authentication, node-bindings.json in the run dir): a key outlives every
    restart, so hostile nodes online at the resume while the bound merchants are not cannot take their indexes."""
    caplog.set_level(logging.WARNING)
    after = ShopClaims(lambda: 3, restored={0: (101, KEY_A), 1: (102, "")}, stable_keys=True)
    after.observe(NodesGrid({301: b"hostile-1", 302: b"hostile-2"}))
    assert after.restored == {0: (101, KEY_A)} and "1 shop-index(es) bind on first use again" in caplog.text
    index, why = after.check(301, 0)
    assert index is None and "held before the resume" in why
    assert after.check(302, 1) == (1, "")  # a binding without a key cannot be told from a reissued node ID
    after.observe(NodesGrid({401: b"merchant-a"}))  # merchant A back, under a new node ID
    assert after.check(401, 0) == (0, "")


def test_registered_bindings_win_over_restored_ones():
    """`node-bindings.json` is rewritten at every `coordinator run` (node IDs remapped after a SuperLink restart)."""
    after = ShopClaims(lambda: 3, {501: 0}, restored={0: (101, ""), 1: (501, ""), 2: (102, "")})
    assert after.restored == {2: (102, "")}
    assert after.check(501, 0) == (0, "") and after.check(101, 0)[0] is None and after.check(666, 2)[0] is None


def test_a_restored_binding_of_a_key_registered_to_another_index_is_dropped():
    """The operator registered the key of a merchant bound on first use to index 1 with `--shop-index 0`."""
    after = ShopClaims(lambda: 3, {201: 0}, restored={1: (101, KEY_A)})
    after.observe(NodesGrid({201: b"merchant-a", 202: b"merchant-b"}))
    assert after.restored == {} and after.check(202, 1) == (1, "") and after.check(201, 0) == (0, "")


def test_a_checkpoint_without_bindings_loads_and_a_malformed_one_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2, np.float32)}))
    payload = torch.load(path, weights_only=True)
    del payload["shop_bindings"]
    torch.save(payload, path)
    assert load_checkpoint(path).shop_bindings == {}  # written before bindings were kept: none
    for bad in ({"0": [101, ""]}, {"x": ["101", ""]}, {"0": ["101"]}, {"0": ["101", ""], "1": ["101", ""]},
                {"0": ["101", "k"], "1": ["102", "k"]}, ["0"]):
        payload["shop_bindings"] = bad
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match=r"shop_bindings .*Fix: delete it"):
            load_checkpoint(path)


# ---- through the strategy ----------------------------------------------------------------------------------------

SHAPES = {"emb": (20, 4), "dense.weight": (3, 5)}
GLOBAL = {k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _trained(i: int) -> dict[str, np.ndarray]:
    return {k: v + 0.01 * (i + 1) for k, v in GLOBAL.items()}


def _strategy(restored: dict[int, tuple[int, str]] | None) -> ShopStrategy:
    return ShopStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3), min_shops=2,
                        shop_name=lambda i: f"shop_{i}", robust=RobustSettings(),
                        claims=ShopClaims(lambda: 5, restored=restored))


def _hostile_first_round(strategy: ShopStrategy) -> dict:
    """One train round of 4 nodes (1000..1003) in which new node 1003 claims shop 0 and answers first."""
    _, replies = honest_train_round(strategy, GLOBAL, 4, _trained, "none")
    next(iter(replies[3].content.metric_records.values()))[SHOP_INDEX] = 0
    strategy.aggregate_train(1, [replies[3], *replies[:3]])
    assert strategy._report is not None
    return {"train": sorted(strategy._report.train), "left_out": strategy._report.left_out}


def test_the_strategy_refuses_a_hostile_node_that_answers_first_after_a_resume(tmp_path):
    first = _strategy(None)
    _, replies = honest_train_round(first, GLOBAL, 3, _trained, "none")
    first.aggregate_train(1, replies)
    assert first.claims.export() == {0: (1000, ""), 1: (1001, ""), 2: (1002, "")}
    restored = _roundtrip(tmp_path, first.claims)

    resumed = _hostile_first_round(_strategy(restored))
    assert resumed["train"] == ["shop_0", "shop_1", "shop_2"]  # shop_0's row is node 1000's
    assert "held before the resume" in resumed["left_out"]["node-1003"]
    # without the checkpoint's bindings (the code before 2026-12-07) the hostile node took shop 0
    unprotected = _hostile_first_round(_strategy(None))
    assert "which node 1003 holds" in unprotected["left_out"]["node-1000"]


def test_a_bound_nodes_error_reply_is_named_by_its_shop_from_the_first_resumed_round():
    strategy = _strategy({0: (1000, ""), 1: (1001, ""), 2: (1002, "")})
    sent, replies = honest_train_round(strategy, GLOBAL, 3, _trained, "none")
    to_1000 = next(m for m in sent if m.metadata.dst_node_id == 1000)
    failed = Message(Error(code=2, reason="out of memory"), reply_to=to_1000)
    strategy.aggregate_train(1, [failed, *replies[1:]])
    assert strategy._report is not None
    assert strategy._report.left_out == {"shop_0": "error reply: out of memory"}  # was 'node-1000'


# ---- through the real resume path --------------------------------------------------------------------------------

def test_after_a_real_resume_a_node_cannot_take_the_index_of_an_offline_shop(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    scenario_file = write_scenario(tiny_scenario(), tmp_path / "scenario.toml")
    run_dir = tmp_path / "run"

    def settings(rounds: int, **extra: object) -> FederationSettings:
        return FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                               "run-dir": str(run_dir), "max-steps": 2, "min-shops": 1, **extra})

    run_federation(LocalGrid(3, client_app.app), settings(2))
    assert latest_checkpoint(run_dir).shop_bindings == {0: (1000, ""), 1: (1001, ""), 2: (1002, "")}
    reports: list = []
    # shop_00's node is offline after the restart; shop_02's node claims shop_00
    grid = LocalGrid(3, claiming_app(0, 2), silent=[0])
    run_federation(grid, settings(3, resume=True), lambda report, _total: reports.append(report))
    (report,) = reports
    assert report.server_round == 3 and sorted(report.train) == ["shop_01"]
    assert "shop_00" not in report.evaluate and "shop_02" not in report.evaluate
    assert "was bound to 2 before the resume" in caplog.text
    assert "was bound to 2 before the resume" in " ".join(report.left_out.values())
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert set(rows[rows["round"] == 3]["shop"]) <= {"shop_01", "coordinator"}  # nothing written as shop_00
    # the offline shop's binding is carried into round 3's checkpoint
    assert latest_checkpoint(run_dir).shop_bindings == {0: (1000, ""), 1: (1001, ""), 2: (1002, "")}


# ---- a real deployment: the SuperLink restarts, the merchants keep their keys and get new node IDs ---------------

@pytest.mark.slow
def test_a_deployed_run_resumed_after_a_superlink_restart_keeps_its_first_use_bindings_by_key(tmp_path):
    """Flower's `grid.get_nodes()` gives the ServerApp each node's public key over the real Runtime API: the
    checkpoint records it, and after an in-memory SuperLink restart (new node IDs) the resumed run matches each
    merchant by key, so no binding is dropped and each index stays with its merchant."""
    import io
    import json
    import time

    from server.node_identity import BINDINGS_FILE
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import (
        MERCHANTS_FILE,
        deployment_run_config,
        registered_merchants,
        resume_run_config,
        start_coordinator,
        stop_coordinator,
        submit_run,
    )
    from simulations.deploy.loopback import loopback_federation, write_tiny_shops
    from simulations.deploy.loopback import tiny_scenario as deploy_scenario
    from simulations.deploy.status import latest_node_id

    shops = write_tiny_shops(tmp_path)[:2]
    (tmp_path / "tiny.toml").write_text(deploy_scenario(rounds=2))
    with loopback_federation(tmp_path, shops, env={"FEDSHOP_REJOIN_FOR": "25"}, scenario=tmp_path / "tiny.toml") as fed:
        home = fed.coordinator.home
        unbound = {node: {**entry, "shop-index": None} for node, entry in registered_merchants(home).items()}
        (Path(home) / MERCHANTS_FILE).write_text(json.dumps(unbound))  # registered keys; indexes bound on first use
        run_dir = tmp_path / "runs" / "first-use"
        run_dir.mkdir(parents=True)
        config = deployment_run_config(load_scenario(str(tmp_path / "tiny.toml")), str(tmp_path / "tiny.toml"),
                                       run_dir, rounds=1, extra={"min-shops": 2})
        log = io.StringIO()
        assert submit_run(home, config, out=log, timeout=600).ok, log.getvalue()[-3000:]
        assert json.loads((run_dir / BINDINGS_FILE).read_text()) == {}
        first = latest_checkpoint(run_dir).shop_bindings
        old_ids = {name: m.node_id for name, m in fed.merchants.items()}
        assert {i: node for i, (node, _) in first.items()} == {0: old_ids[shops[0]], 1: old_ids[shops[1]]}
        assert all(key.startswith("sha256:") for _, key in first.values())  # the public keys reached the ServerApp

        assert stop_coordinator(home)
        start_coordinator(home, tmp_path / "certs", port=fed.coordinator.port, state_db=False, warn=lambda _: None)
        new_ids = {entry["name"]: int(node) for node, entry in registered_merchants(home).items()}
        deadline = time.monotonic() + 120
        while not all(latest_node_id(fed.merchants[n].log) == new_ids[n] for n in shops):
            assert time.monotonic() < deadline, "merchants did not re-activate under their new node IDs"
            time.sleep(0.5)
        log = io.StringIO()
        assert submit_run(home, resume_run_config(run_dir, rounds=2), out=log, timeout=600).ok, log.getvalue()[-3000:]
    after = latest_checkpoint(run_dir)
    assert after.server_round == 2 and set(new_ids.values()).isdisjoint(old_ids.values())
    assert after.shop_bindings == {0: (new_ids[shops[0]], first[0][1]), 1: (new_ids[shops[1]], first[1][1])}
    # the same "flwr" logger's lines reach this log (Flower's sampling line), and the drop warning is not among them
    assert "configure_train: Sampled" in log.getvalue() and "before the resume is online" not in log.getvalue()
    rows = pd.read_csv(run_dir / "metrics.csv").query("split == 'train' and round == 2")
    assert sorted(rows["shop"].unique()) == ["shop-0", "shop-1"]
