"""Resume after faults: a kill between a shop's save and the coordinator's checkpoint, corrupt checkpoints,
orphaned temp files, and rounds short of min-shops (a merchant restarting mid-round).

Runs in-process on `LocalGrid` (the real ClientApp and ServerApp code, no Ray), a second or two per run.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from flower_harness import LocalGrid, tiny_scenario, write_scenario
from flwr.app import Context, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

import client.local_state as local_state
import server.server_app as server_app
from client import client_app
from client.local_state import (
    PREVIOUS_FILE,
    STATE_FILE,
    LocalPartMismatch,
    restore_local_part,
    save_local_part,
)
from server import strategies
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from server.server_app import FederationSettings, run_federation
from shared.features import build_shop_tensors
from shared.model import build_model
from shared.protocol import NUM_EXAMPLES


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, nothing catches it."""


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("resume") / "scenario.toml")


def _settings(scenario_file, run_dir, rounds, **config) -> FederationSettings:
    return FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                           "run-dir": str(run_dir), "max-steps": 3, **config})


def _run(scenario_file, run_dir, rounds, grid=None, **config) -> list:
    reports: list = []
    local_state._SHOPS.clear()  # each run starts like a fresh process: shops are resolved (and cleaned) again
    run_federation(grid or LocalGrid(3, client_app.app), _settings(scenario_file, run_dir, rounds, **config),
                   lambda report, _total: reports.append(report))
    return reports


def _kill_before_checkpoint(monkeypatch, at_round: int) -> None:
    """The coordinator dies after every shop saved round ``at_round``'s local part, before its checkpoint."""
    real = server_app.save_checkpoint

    def save(run_dir, ckpt, **kwargs):
        if ckpt.server_round == at_round:
            raise Killed
        return real(run_dir, ckpt, **kwargs)

    monkeypatch.setattr(server_app, "save_checkpoint", save)


# personal-mix on: the shop's own encoder lives in the local-part file and must roll back with it
MIX = {"personal-mix": 200.0}


def test_resume_after_a_kill_between_local_save_and_checkpoint_matches_an_uninterrupted_run(
        scenario_file, tmp_path, monkeypatch, caplog):
    _run(scenario_file, tmp_path / "full", 3, **MIX)
    with monkeypatch.context() as patch:
        _kill_before_checkpoint(patch, at_round=2)
        with pytest.raises(Killed):
            _run(scenario_file, tmp_path / "cut", 3, **MIX)
    assert latest_checkpoint(tmp_path / "cut").server_round == 1
    saved = torch.load(next((tmp_path / "cut" / "shop-state").glob(f"*/{STATE_FILE}")), weights_only=True)
    assert saved["round"] == 2  # the shops are a round ahead of the checkpoint: the case to handle
    with caplog.at_level(logging.WARNING, logger="client.local_state"):
        _run(scenario_file, tmp_path / "cut", 3, resume=True, **MIX)
    assert caplog.text.count("rolling back") == 3  # every shop, once (round 2's training)
    full, cut = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("full", "cut"))
    pd.testing.assert_frame_equal(cut, full, check_exact=False, atol=1e-6, rtol=0)
    final_full, final_cut = latest_checkpoint(tmp_path / "full"), latest_checkpoint(tmp_path / "cut")
    assert final_full.server_round == final_cut.server_round == 3
    for key, value in final_full.arrays.items():
        np.testing.assert_allclose(final_cut.arrays[key], value, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def shop():
    scenario = tiny_scenario()
    return scenario, build_shop_tensors(scenario.training_shops()[0], scenario.features)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _train(shop, context: Context, state_dir, server_round: int, run: str = "run-a") -> str:
    scenario, tensors = shop
    model = build_model(tensors, scenario.model, scenario.features, seed=server_round)
    source = restore_local_part(model, context, state_dir, server_round=server_round, run=run)
    save_local_part(model, context, state_dir, shop="s", server_round=server_round, run=run)
    return source


def _restore(shop, state_dir, server_round: int, *, run: str = "run-a", training: bool = True) -> str:
    scenario, tensors = shop
    model = build_model(tensors, scenario.model, scenario.features, seed=0)
    return restore_local_part(model, _context(), state_dir, server_round=server_round, run=run, training=training)


def _round_of(path) -> int:
    return int(torch.load(path, weights_only=True)["round"])


def test_a_kill_while_the_new_local_part_is_written_leaves_the_current_file_in_place(shop, tmp_path, monkeypatch):
    context = _context()
    _train(shop, context, tmp_path, 1)
    _train(shop, context, tmp_path, 2)

    def killed(*_args, **_kwargs):
        raise Killed

    monkeypatch.setattr(local_state, "write_state_file", killed)
    with pytest.raises(Killed):  # round 3's save dies after the rotation, before its file lands
        _train(shop, context, tmp_path, 3)
    # the rotation copied the current file rather than renaming it away: round 2's part is still current
    assert (_round_of(tmp_path / STATE_FILE), _round_of(tmp_path / PREVIOUS_FILE)) == (2, 2)
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert _restore(shop, tmp_path, 3) == "disk"  # the checkpoint holds round 2: the current file matches


def test_local_part_rolls_back_to_the_round_of_the_checkpoint_or_is_refused(shop, tmp_path):
    context = _context()
    assert [_train(shop, context, tmp_path, r) for r in (1, 2, 3)] == ["fresh", "context", "context"]
    assert (_round_of(tmp_path / STATE_FILE), _round_of(tmp_path / PREVIOUS_FILE)) == (3, 2)
    assert _restore(shop, tmp_path, 4) == "disk"  # the checkpoint holds round 3: the current file matches
    assert _restore(shop, tmp_path, 3, training=False) == "disk"  # evaluation of round 3 uses round 3's part
    assert _restore(shop, tmp_path, 3) == "disk-previous"  # round 3 redone: start from round 2's part
    assert _restore(shop, tmp_path, 3, run="run-b") == "disk"  # another run carries the newest part over
    with pytest.raises(LocalPartMismatch) as refused:  # round 2 redone: round 1's part is gone
        _restore(shop, tmp_path, 2)
    assert STATE_FILE in str(refused.value) and PREVIOUS_FILE in str(refused.value) and "Fix" in str(refused.value)
    # Redoing round 3 (resumed) keeps round 2's copy as the previous one; the new round-3 file replaces the old.
    assert _train(shop, _context(), tmp_path, 3) == "disk-previous"
    assert (_round_of(tmp_path / STATE_FILE), _round_of(tmp_path / PREVIOUS_FILE)) == (3, 2)
    # Killed between keeping the previous copy and writing the new file: the previous copy is used.
    (tmp_path / STATE_FILE).replace(tmp_path / PREVIOUS_FILE)
    assert _restore(shop, tmp_path, 4) == "disk-previous"


def test_a_local_part_that_started_fresh_in_the_redone_round_starts_fresh_again(shop, tmp_path):
    assert _train(shop, _context(), tmp_path, 2) == "fresh"  # a shop that joined in round 2
    assert _restore(shop, tmp_path, 2) == "fresh"  # round 2 redone: as it did then, not refused
    assert _restore(shop, tmp_path, 3) == "disk"


def test_resume_refuses_when_every_checkpoint_is_corrupt(scenario_file, tmp_path):
    _run(scenario_file, tmp_path, 2)
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["round-0001.pt", "round-0002.pt"]
    for path in paths:
        path.write_bytes(b"truncated")
    before = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(CheckpointError) as refused:
        _run(scenario_file, tmp_path, 3, resume=True)
    text = str(refused.value)
    assert "round-0001.pt" in text and "round-0002.pt" in text and "Fix" in text
    assert (tmp_path / "metrics.csv").read_text() == before  # nothing restarted from round 1


def test_orphaned_temp_files_are_removed_at_the_next_start(scenario_file, tmp_path):
    _run(scenario_file, tmp_path, 1)
    state_dir = next((tmp_path / "shop-state").iterdir())
    orphans = [tmp_path / "checkpoints" / ".round-0002.pt.k1ll3d.tmp", tmp_path / ".metrics.csv.k1ll3d.tmp",
               state_dir / f".{STATE_FILE}.k1ll3d.tmp", state_dir / "cache" / ".key-index.json.k1ll3d.tmp"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")
    _run(scenario_file, tmp_path, 2, resume=True)
    assert [p for p in orphans if p.exists()] == []
    assert latest_checkpoint(tmp_path).server_round == 2


def test_a_resumed_run_still_caps_an_inflated_claim_at_10x_the_shops_first_claim(scenario_file, tmp_path,
                                                                                   monkeypatch):
    """The first-claim memory is in the checkpoint: after `--resume` a shop cannot claim anew."""
    _run(scenario_file, tmp_path, 1)
    first = latest_checkpoint(tmp_path).first_claims
    assert set(first) == {"shop_00", "shop_01", "shop_02"} and all(c > 0 for c in first.values())
    small, middle, _ = sorted(first, key=first.get)
    assert first[small] < first[middle]
    inflated = 10 * first[middle]  # within 10 x the round's median claim: only the first-claim cap bites

    def inflating_app(msg: Message, context: Context) -> Message:
        reply = client_app.app(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            metrics = next(iter(reply.content.metric_records.values()))
            if first[small] == metrics[NUM_EXAMPLES]:  # the small shop claims as much as ten middle ones
                metrics[NUM_EXAMPLES] = inflated
        return reply

    capped: list[tuple[list[float], list[float]]] = []
    real_screen = strategies.screen

    def spy(deltas, claims, *args, **kwargs):
        result = real_screen(deltas, claims, *args, **kwargs)
        capped.append((list(claims), list(result.claims)))
        return result

    monkeypatch.setattr(strategies, "screen", spy)
    _run(scenario_file, tmp_path, 2, grid=LocalGrid(3, inflating_app), resume=True)
    (claims, after), = capped
    assert inflated in claims  # the inflated claim reached the screens in the resumed round
    assert after[claims.index(inflated)] == pytest.approx(10 * first[small])
    assert latest_checkpoint(tmp_path).first_claims == first  # still the first claims, not the inflated one


def test_a_checkpoint_without_first_claims_still_loads(tmp_path):
    """Checkpoints written before first claims were saved resume with none (each shop's next claim counts)."""
    save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2, dtype=np.float32)}, first_claims={"a": 5.0}))
    path = list_checkpoints(tmp_path)[0]
    payload = torch.load(path, weights_only=True)
    assert payload["first_claims"] == {"a": 5.0}
    del payload["first_claims"]
    torch.save(payload, path)
    assert latest_checkpoint(tmp_path).first_claims == {}
    payload["first_claims"] = {"a": "lots"}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="first_claims"):
        load_checkpoint(path)


class RestartingGrid(LocalGrid):
    """Node ``index`` is down in the given rounds: the SuperLink answers its train message for it."""

    def __init__(self, n_nodes: int, down: dict[int, set[int]]) -> None:
        super().__init__(n_nodes, client_app.app)
        self.down = {self.node_ids[i]: rounds for i, rounds in down.items()}

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages, out = list(messages), []
        passed = []
        for msg in messages:
            config = next(iter(msg.content.config_records.values()), {})
            if msg.metadata.message_type == "train" and int(config.get("server-round", 0)) in self.down.get(
                    msg.metadata.dst_node_id, ()):
                msg.metadata.__dict__["_message_id"] = f"ins-{len(self.sent)}-{msg.metadata.dst_node_id}"
                self.sent.append(msg)
                out.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            else:
                passed.append(msg)
        return out + super().send_and_receive(passed, timeout=timeout)


def test_a_round_short_of_min_shops_is_skipped_and_the_restarted_shop_rejoins(scenario_file, tmp_path, caplog):
    grid = RestartingGrid(3, down={0: {2}})
    with caplog.at_level(logging.WARNING, logger="server.strategies"):
        reports = _run(scenario_file, tmp_path, 3, grid=grid, **{"min-shops": 3})
    assert [r.server_round for r in reports] == [1, 2, 3]
    skipped = reports[1]
    assert "min-shops=3" in skipped.skipped and not reports[0].skipped and not reports[2].skipped
    # One label per shop, and the true reason rather than a timeout.
    assert list(skipped.left_out) == ["shop_00"]
    assert "Node Unavailable" in skipped.left_out["shop_00"] and "timeout" not in skipped.left_out["shop_00"]
    assert "node-" not in caplog.text and "round 2 skipped, global model kept" in caplog.text
    assert set(reports[2].train) == {"shop_00", "shop_01", "shop_02"}  # back at the next round
    # The skipped round kept the global model; the others changed it.
    arrays = [r.arrays for r in reports]
    for key in arrays[0]:
        np.testing.assert_array_equal(arrays[1][key].numpy(), arrays[0][key].numpy())
    assert any(not np.array_equal(arrays[2][k].numpy(), arrays[1][k].numpy()) for k in arrays[1])


def test_too_many_short_rounds_in_a_row_stop_the_run_and_resume_continues_it(scenario_file, tmp_path):
    grid = RestartingGrid(3, down={0: {2, 3}})
    with pytest.raises(RuntimeError) as stopped:
        _run(scenario_file, tmp_path, 4, grid=grid, **{"min-shops": 3, "max-short-rounds": 1})
    text = str(stopped.value)
    assert "round 3" in text and "max-short-rounds=1" in text and "shop_00" in text and "Fix" in text
    assert latest_checkpoint(tmp_path).server_round == 2  # round 2 (skipped) checkpointed, round 3 not
    reports = _run(scenario_file, tmp_path, 4, resume=True, **{"min-shops": 3, "max-short-rounds": 1})
    assert [r.server_round for r in reports] == [3, 4] and not any(r.skipped for r in reports)
    assert sorted(pd.read_csv(tmp_path / "metrics.csv")["round"].unique()) == [1, 2, 3, 4]


def _cli(*args: str):
    import typer
    from typer.testing import CliRunner

    from simulations.commands import deploy

    app = typer.Typer()
    deploy.register(app)
    return CliRunner().invoke(app, ["coordinator", "run", *args])


def test_coordinator_resume_config_is_the_saved_one_with_resume_on(tmp_path):
    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, resume_run_config
    from simulations.deploy.loopback import tiny_scenario as deploy_tiny

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(deploy_tiny())
    run_dir = (tmp_path / "run").resolve()
    run_dir.mkdir()
    first = deployment_run_config(load_scenario(str(scenario)), str(scenario), run_dir, rounds=3)
    resumed = resume_run_config(run_dir, rounds=5, extra={"round-timeout": 30.0})
    assert first["resume"] is False and resumed["resume"] is True
    assert resumed["num-server-rounds"] == 5 and resumed["round-timeout"] == 30.0
    assert {k: v for k, v in resumed.items() if k not in ("resume", "num-server-rounds", "round-timeout")} == {
        k: v for k, v in first.items() if k not in ("resume", "num-server-rounds", "round-timeout")}
    with pytest.raises(ValueError, match="num-rounds"):  # a typo fails before anything is submitted
        resume_run_config(run_dir, extra={"num-rounds": 2})


def test_coordinator_resume_refuses_what_it_cannot_continue(tmp_path):
    result = _cli("--resume", str(tmp_path), "--home", str(tmp_path / "coord"))
    assert result.exit_code == 1 and "config.toml" in result.output and "Fix" in result.output
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.toml").write_text('[run]\nrun-dir = "/elsewhere/run"\n')
    result = _cli("--resume", str(moved), "--home", str(tmp_path / "coord"))
    assert result.exit_code == 1 and "/elsewhere/run" in result.output
    for args in ((), ("tiny", "--resume", str(moved))):  # neither, or both, of SCENARIO and --resume
        result = _cli(*args, "--home", str(tmp_path / "coord"))
        assert result.exit_code == 1 and "--resume" in result.output


class LateRegisteringGrid(LocalGrid):
    """Flower's simulation engine registers its virtual nodes beside the running ServerApp: the last node
    shows up only after a few looks, as it did under load."""

    def __init__(self, n_nodes: int, late_looks: int) -> None:
        super().__init__(n_nodes, client_app.app)
        self.looks, self.late_looks = 0, late_looks

    def get_node_ids(self) -> list[int]:
        self.looks += 1
        return list(self.node_ids) if self.looks > self.late_looks else list(self.node_ids[:-1])


@pytest.mark.parametrize("expected_nodes", [0, 3])
def test_round_one_waits_for_every_simulated_shop(scenario_file, tmp_path, expected_nodes):
    """The cause of the flaky resume test: round 1 sampled the 2 of 3 nodes registered so far."""
    reports: list = []
    local_state._SHOPS.clear()
    server = server_app.make_server_app({"scenario": str(scenario_file), "num-server-rounds": 1,
                                         "run-dir": str(tmp_path), "max-steps": 3},
                                        progress=lambda report, _total: reports.append(report),
                                        expected_nodes=expected_nodes)
    server(LateRegisteringGrid(3, late_looks=3), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                         run_config={}))
    trained = set(reports[0].train)
    assert trained == ({"shop_00", "shop_01", "shop_02"} if expected_nodes else {"shop_00", "shop_01"})
