"""Fused evaluation (#15): with the personal mix, the train reply carries the round's evaluation.

Fused and unfused runs must write the same metrics.csv bit for bit, with one message per shop per round
instead of two; shops whose fused evaluation is missing (train error, failed evaluation, waiting late
joiner) still get an evaluate message, so no evaluation row is lost.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from flower_harness import TEST_FAULTS, LocalGrid, tiny_scenario, write_scenario
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client import client_app, shop_round
from client.leak_guard import LeakBlocked, clean_reply
from server import server_app
from server.server_app import FederationSettings, run_federation
from shared.protocol import EVAL_METRICS_RECORD, EVALUATE_AFTER_TRAIN, METRICS_RECORD

MIX = {"personal-mix": 20000.0, "eval-split": "val+test"}
ROUNDS = 3


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("fuse") / "scenario.toml")


def _run(scenario_file: Path, run_dir: Path, *, fuse: bool, n_nodes: int = 3, rounds: int = ROUNDS,
         **config: object) -> tuple[pd.DataFrame, LocalGrid, list]:
    grid = LocalGrid(n_nodes, client_app.app, node_config=TEST_FAULTS)
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": rounds,
                                               "run-dir": str(run_dir), "fuse-evaluate": fuse, **MIX, **config})
    reports: list = []
    run_federation(grid, settings, lambda report, total: reports.append(report))
    return pd.read_csv(run_dir / "metrics.csv"), grid, reports


def _per_round(grid: LocalGrid) -> Counter:
    """(round, message type) -> messages the coordinator sent."""
    out: Counter = Counter()
    for msg in grid.sent:
        config = next(iter(msg.content.config_records.values()))
        out[int(config["server-round"]), msg.metadata.message_type] += 1
    return out


def test_fused_run_writes_the_same_metrics_with_one_message_per_shop_per_round(scenario_file, tmp_path):
    fused, fgrid, freports = _run(scenario_file, tmp_path / "fused", fuse=True)
    plain, pgrid, _ = _run(scenario_file, tmp_path / "plain", fuse=False)
    pd.testing.assert_frame_equal(fused, plain)  # every row, value and order
    assert (fused["split"] == "test").any() and (fused["split"] == "val").any()
    for rnd in range(1, ROUNDS + 1):
        assert _per_round(fgrid)[rnd, MessageType.TRAIN] == 3 and _per_round(fgrid)[rnd, MessageType.EVALUATE] == 0
        assert _per_round(pgrid)[rnd, MessageType.TRAIN] == 3 and _per_round(pgrid)[rnd, MessageType.EVALUATE] == 3
    assert all(len(r.evaluate) == 3 for r in freports)  # on_round_end once per round, with every shop
    assert len(freports) == ROUNDS
    train_msg = next(m for m in fgrid.sent if m.metadata.message_type == MessageType.TRAIN)
    config = next(iter(train_msg.content.config_records.values()))
    assert config[EVALUATE_AFTER_TRAIN] is True and config["eval-split"] == "val+test"
    # The strategy took the evaluation out of each reply before the screens and FedAvg saw it.
    assert all(set(m.content.metric_records) == {METRICS_RECORD} for m in fgrid.replies)


def test_without_the_personal_mix_nothing_is_fused(scenario_file, tmp_path):
    _, grid, _ = _run(scenario_file, tmp_path / "nomix", fuse=True, rounds=1, **{"personal-mix": 0.0})
    assert _per_round(grid)[1, MessageType.EVALUATE] == 3
    assert all(EVAL_METRICS_RECORD not in m.content.metric_records for m in grid.replies)


@pytest.mark.parametrize("config", [
    {"fault-inject": "error:1@2"},  # shop_01's train fails in round 2: its evaluation comes by evaluate message
    {"fault-inject": "nan:1"},  # left out of the aggregate, still evaluated
    {"compression": "sparse-fp16"},
    {"strategy": "fedprox", "proximal-mu": 0.1},
    {"test-every-round": True, "eval-split": "val"},
    {"fraction-train": 0.6},  # 2 of 3 shops train each round: the third is evaluated by evaluate message
], ids=["train-error", "nan", "compression", "fedprox", "val-only", "sampled"])
def test_fused_equals_unfused_under(scenario_file, tmp_path, config):
    fused, fgrid, _ = _run(scenario_file, tmp_path / "fused", fuse=True, **config)
    plain, _, _ = _run(scenario_file, tmp_path / "plain", fuse=False, **config)
    pd.testing.assert_frame_equal(fused, plain)
    if "fraction-train" in config:
        assert all(_per_round(fgrid)[r, MessageType.EVALUATE] == 1 for r in range(1, ROUNDS + 1))
    if "error" in config.get("fault-inject", ""):
        assert _per_round(fgrid)[2, MessageType.EVALUATE] == 1  # the fallback, to the failed shop only
        assert ((fused["round"] == 2) & (fused["shop"] == "shop_01") & (fused["split"] == "val")).any()


def test_central_dp_and_dpsgd_fused_equal_unfused(scenario_file, tmp_path):
    config = {"dp-noise-multiplier": 0.1, "dp-clipping-norm": 5.0, "rounds": 2}
    rounds = int(config.pop("rounds"))
    fused, _, _ = _run(scenario_file, tmp_path / "dp-fused", fuse=True, rounds=rounds, **config)
    plain, _, _ = _run(scenario_file, tmp_path / "dp-plain", fuse=False, rounds=rounds, **config)
    pd.testing.assert_frame_equal(fused, plain)
    sgd = {"dpsgd-noise-multiplier": 1.0, "dpsgd-steps": 3}
    fused, _, _ = _run(scenario_file, tmp_path / "sgd-fused", fuse=True, rounds=2, **sgd)
    plain, _, _ = _run(scenario_file, tmp_path / "sgd-plain", fuse=False, rounds=2, **sgd)
    pd.testing.assert_frame_equal(fused, plain)


def test_late_joiner_waits_warms_up_and_is_evaluated_the_same(tmp_path):
    scenario = tiny_scenario(**{"data.synthetic.n_late_joiners": 1, "data.synthetic.late_joiner_impressions": 1500,
                                "federation.join_round": 2, "federation.warmup_rounds": 1})
    path = write_scenario(scenario, tmp_path / "join.toml")
    n = len(scenario.federation_shops())
    config = {"join-round": 2, "warmup-rounds": 1}
    fused, grid, _ = _run(path, tmp_path / "fused", fuse=True, n_nodes=n, rounds=4, **config)
    plain, _, _ = _run(path, tmp_path / "plain", fuse=False, n_nodes=n, rounds=4, **config)
    pd.testing.assert_frame_equal(fused, plain)
    assert _per_round(grid)[1, MessageType.EVALUATE] == 1  # the waiting joiner: asked by evaluate message
    assert _per_round(grid)[2, MessageType.EVALUATE] == 0  # warm-up evaluates with its train reply
    joiner = scenario.late_joiners[0]
    assert set(fused[fused["shop"] == joiner]["round"]) == {1, 2, 3, 4}


def test_a_failed_evaluation_after_training_keeps_the_train_reply_and_falls_back(scenario_file, tmp_path,
                                                                                 monkeypatch):
    real = shop_round.evaluate_round
    calls = Counter()

    def flaky(shop, model, settings, context, **kwargs):
        calls[settings.server_round, shop.name, settings.evaluate_after_train] += 1
        if settings.evaluate_after_train and shop.name == "shop_02" and settings.server_round == 2:
            raise RuntimeError("disk full")
        return real(shop, model, settings, context, **kwargs)

    plain, _, _ = _run(scenario_file, tmp_path / "plain", fuse=False)
    monkeypatch.setattr(shop_round, "evaluate_round", flaky)  # the fused call
    monkeypatch.setattr(client_app, "evaluate_round", flaky)  # the evaluate handler's
    fused, grid, reports = _run(scenario_file, tmp_path / "fused", fuse=True)
    pd.testing.assert_frame_equal(fused, plain)
    assert "shop_02" in reports[1].train  # its update counted
    assert _per_round(grid)[2, MessageType.EVALUATE] == 1
    assert calls[2, "shop_02", False] == 1  # the fallback evaluate message


class Killed(Exception):
    """The coordinator dies before checkpointing a round (its shops already trained and evaluated it)."""


def _cut_and_resume(scenario_file: Path, run_dir: Path, monkeypatch, *, fuse: bool) -> pd.DataFrame:
    real = server_app.save_checkpoint

    def save(path, ckpt, **kwargs):
        if ckpt.server_round == 3:
            raise Killed
        return real(path, ckpt, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(server_app, "save_checkpoint", save)
        with pytest.raises(Killed):
            _run(scenario_file, run_dir, fuse=fuse, rounds=4)
    return _run(scenario_file, run_dir, fuse=fuse, rounds=4, resume=True)[0]


def test_resume_mid_run_gives_the_same_metrics(scenario_file, tmp_path, monkeypatch):
    fused = _cut_and_resume(scenario_file, tmp_path / "fused", monkeypatch, fuse=True)
    plain = _cut_and_resume(scenario_file, tmp_path / "plain", monkeypatch, fuse=False)
    pd.testing.assert_frame_equal(fused, plain)
    straight, _, _ = _run(scenario_file, tmp_path / "straight", fuse=True, rounds=4)
    assert set(fused["round"]) == {1, 2, 3, 4}
    pd.testing.assert_frame_equal(fused, straight, check_exact=False, atol=1e-6, rtol=0)  # as tests/test_resume.py


def _fused_request_and_reply(scenario_file, tmp_path) -> tuple[Message, Message, object]:
    """A real fused train request, its handler reply before the leak guard, and the node's context."""
    grid = LocalGrid(3, client_app.app)
    settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 1,
                                               "run-dir": str(tmp_path / "run"), **MIX})
    run_federation(grid, settings)
    request = next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    context = grid.contexts[request.metadata.dst_node_id]
    return request, client_app.train(request, context), context


def test_leak_guard_lets_the_fused_evaluation_out_but_refuses_anything_extra(scenario_file, tmp_path):
    import time

    request, reply, context = _fused_request_and_reply(scenario_file, tmp_path)
    started = time.time() - 60
    assert set(reply.content.metric_records) == {METRICS_RECORD, EVAL_METRICS_RECORD}
    assert not any(k.startswith(("val/", "test/")) for k in reply.content.metric_records[METRICS_RECORD])
    assert any(k.startswith("test/") for k in reply.content.metric_records[EVAL_METRICS_RECORD])
    assert set(clean_reply(request, reply, context, started).content.metric_records) == {METRICS_RECORD,
                                                                                          EVAL_METRICS_RECORD}
    evaluation = dict(reply.content.metric_records[EVAL_METRICS_RECORD])
    extra = Message(RecordDict({**reply.content, EVAL_METRICS_RECORD: MetricRecord({**evaluation, "secret": 1.0})}),
                    reply_to=request)
    with pytest.raises(LeakBlocked):
        clean_reply(request, extra, context, started)
    train_key = Message(RecordDict({**reply.content, EVAL_METRICS_RECORD: MetricRecord({**evaluation, "loss": 1.0})}),
                        reply_to=request)
    with pytest.raises(LeakBlocked):  # train metrics never pass as evaluation keys
        clean_reply(request, train_key, context, started)
    third = Message(RecordDict({**reply.content, "other": MetricRecord({"num-examples": 1.0})}), reply_to=request)
    with pytest.raises(LeakBlocked):
        clean_reply(request, third, context, started)
    # A train request that did not ask for the evaluation never lets one out.
    config = dict(next(iter(request.content.config_records.values())))
    config[EVALUATE_AFTER_TRAIN] = False
    unasked = Message(RecordDict({**request.content, "config": ConfigRecord(config)}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
    with pytest.raises(LeakBlocked):
        clean_reply(unasked, Message(reply.content, reply_to=unasked), context, started)


def _engine_run(tmp_path: Path, engine: str, *, fuse: bool, monkeypatch) -> tuple[pd.DataFrame, Counter]:
    """A tiny default-scenario run (personal mix on) on a real engine; messages counted at its grid."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from simulations.federated import run_federated
    from simulations.pool_grid import PoolGrid

    sent: Counter = Counter()
    grid_class = PoolGrid if engine == "pool" else InMemoryGrid
    real = grid_class.send_and_receive

    def counting(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            sent[msg.metadata.message_type] += 1
        sent["phases"] += 1
        return real(self, messages, timeout=timeout)

    with monkeypatch.context() as patch:
        patch.setattr(grid_class, "send_and_receive", counting)
        run_dir = run_federated(tiny_scenario(), tmp_path / f"{engine}-{fuse}", rounds=2, engine=engine,
                                **({"workers": 2} if engine == "pool" else {}),
                                extra_config={"fuse-evaluate": fuse})
    return pd.read_csv(run_dir / "metrics.csv"), sent


def _check_engine(tmp_path: Path, engine: str, monkeypatch) -> None:
    from simulations.best_rounds import final_table

    fused, fsent = _engine_run(tmp_path, engine, fuse=True, monkeypatch=monkeypatch)
    plain, psent = _engine_run(tmp_path, engine, fuse=False, monkeypatch=monkeypatch)
    pd.testing.assert_frame_equal(fused, plain)
    pd.testing.assert_frame_equal(final_table(fused), final_table(plain))
    assert fsent[MessageType.TRAIN] == psent[MessageType.TRAIN] == 6  # 3 shops x 2 rounds
    assert fsent[MessageType.EVALUATE] == 0 and psent[MessageType.EVALUATE] == 6
    assert fsent["phases"] == psent["phases"] == 4  # Flower still runs an (empty) evaluate phase per round


def test_pool_engine_fused_and_unfused_runs_are_identical(tmp_path, monkeypatch):
    _check_engine(tmp_path, "pool", monkeypatch)


@pytest.mark.slow
def test_ray_engine_fused_and_unfused_runs_are_identical(tmp_path, monkeypatch):
    _check_engine(tmp_path, "ray", monkeypatch)


def test_a_shop_the_screens_leave_out_is_still_evaluated_the_same(scenario_file, tmp_path):
    """shop_00 sends its update x100: the norm screen leaves it out; its evaluation (own encoder) stays."""
    from flwr.app import Array

    def attacker(msg, context):
        reply = client_app.app(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 0
                and not reply.has_error()):
            record, sent = reply.content["arrays"], next(iter(msg.content.array_records.values()))
            for key in list(record):
                base = sent[key].numpy()
                record[key] = Array((base + 100 * (record[key].numpy() - base)).astype(base.dtype))
        return reply

    frames, grids, reports = {}, {}, {}
    for fuse in (True, False):
        grid = LocalGrid(3, attacker)
        settings = FederationSettings.from_config({"scenario": str(scenario_file), "num-server-rounds": 2,
                                                   "run-dir": str(tmp_path / str(fuse)), "fuse-evaluate": fuse,
                                                   **MIX})
        reports[fuse] = []
        run_federation(grid, settings, lambda report, total, out=reports[fuse]: out.append(report))
        frames[fuse], grids[fuse] = pd.read_csv(tmp_path / str(fuse) / "metrics.csv"), grid
    pd.testing.assert_frame_equal(frames[True], frames[False])
    assert all("shop_00" in r.left_out and "shop_00" in r.evaluate for r in reports[True])
    assert _per_round(grids[True])[2, MessageType.EVALUATE] == 0


def _deployed(root: Path, shops: list[str], scenario: Path, label: str, extra: dict) -> tuple[pd.DataFrame, Counter]:
    """A 3-round loopback deployment (TLS SuperLink, one SuperNode per shop) of fresh shop state dirs."""
    import io
    import json

    from shared.scenario import load_scenario
    from simulations.deploy.coordinator import deployment_run_config, submit_run
    from simulations.deploy.loopback import fresh_federation_root, loopback_federation

    fed_root, run_dir = fresh_federation_root(root, label, shops)
    timing = fed_root / "timing.jsonl"
    config = deployment_run_config(load_scenario(str(scenario)), str(scenario), run_dir, rounds=3, extra=extra)
    with loopback_federation(fed_root, shops, env={"FEDSHOP_TIMING_LOG": str(timing)}, scenario=scenario) as fed:
        outcome = submit_run(fed.coordinator.home, config, out=io.StringIO(), timeout=900)
    assert outcome.ok, outcome
    pushed: Counter = Counter()
    for line in timing.read_text().splitlines():
        event = json.loads(line) if line.strip() else {}
        if event.get("where") == "serverapp" and event.get("event") == "push":
            pushed["messages"] += event["n"]
            pushed["pushes"] += 1
    return pd.read_csv(run_dir / "metrics.csv"), pushed


@pytest.mark.slow
def test_deployment_fused_and_unfused_runs_are_identical(tmp_path):
    """The deployment path (same ClientApp, SuperNodes on loopback): same metrics, 3 messages a round, not 6."""
    from simulations.deploy.loopback import tiny_scenario as deploy_scenario
    from simulations.deploy.loopback import write_tiny_shops

    shops = write_tiny_shops(tmp_path)
    scenario = tmp_path / "mix.toml"
    scenario.write_text(deploy_scenario() + "personal_mix = 20000.0\n")  # [federation] is its last table
    fused, fpushed = _deployed(tmp_path, shops, scenario, "fused", {})
    plain, ppushed = _deployed(tmp_path, shops, scenario, "plain", {"fuse-evaluate": False})
    pd.testing.assert_frame_equal(fused, plain)
    assert set(fused["round"]) == {1, 2, 3} and (fused["split"] == "val").any()
    assert fpushed == Counter(messages=9, pushes=3) and ppushed == Counter(messages=18, pushes=6)
