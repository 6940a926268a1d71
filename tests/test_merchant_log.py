"""The merchant's round line: written by the ClientApp's handlers to Flower's logger (the SuperNode's log)."""

from __future__ import annotations

import logging
import re

import pytest
from flower_harness import LocalGrid, one_shop, tiny_scenario, write_scenario
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.local_state import resolve_shop
from client.merchant_log import HEADLINE
from server.server_app import initial_encoder
from shared.settings import ShopRoundSettings


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flower_log():
    """What reaches the logger Flower's console handler sits on (its handler writes the SuperNode's log)."""
    handler = _Lines()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    yield handler.lines
    flwr_logger.removeHandler(handler)


def test_one_line_per_round_with_rows_validation_metrics_and_rounds_trained(tmp_path, flower_log) -> None:
    scenario = tiny_scenario()
    path = write_scenario(scenario, tmp_path / "scenario.toml")
    shop_name = scenario.training_shops()[0].name

    def message(kind: str, server_round: int) -> Message:
        config = ConfigRecord({"scenario": str(path), "seed": scenario.seed, "server-round": server_round,
                               "share": "encoder", "eval-split": "val+test", "personal-mix": 0.0})
        msg = Message(RecordDict({"arrays": initial_encoder(scenario), "config": config}), 1, kind)
        msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}"
        return msg

    LocalGrid(1, client_app.app)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    train_reply = client_app.train(message(MessageType.TRAIN, 1), ctx)
    assert not [line for line in flower_log if line.startswith("fedshop ")]  # the line comes with the evaluation
    metrics = client_app.evaluate(message(MessageType.EVALUATE, 1), ctx).content["metrics"]
    lines = [line for line in flower_log if line.startswith("fedshop ")]
    assert len(lines) == 1, flower_log
    rows = int(resolve_shop(ctx, ShopRoundSettings.from_message({}, {"scenario": str(path), "seed": scenario.seed}))
               .tensors.rows["train"]["user"].shape[0])  # the shop's training rows, not the per-task sum
    assert 0 < rows < train_reply.content["metrics"]["num-examples"]
    assert lines[0].startswith(f"fedshop {shop_name} round 1: trained {rows:,} rows, rounds_trained 1; validation ")
    shown = dict(re.findall(r"(\S+)=([0-9.]+)", lines[0]))
    assert float(shown["ctr.auc"]) == pytest.approx(metrics["val/ctr.auc"], abs=1e-4)
    assert not any(key.startswith("test") for key in shown)  # only the shop's validation split
    assert "ctr.f1" not in shown and set(shown) <= set(HEADLINE)  # a readable line; all metrics go to metrics.csv

    client_app.train(message(MessageType.TRAIN, 2), ctx)
    client_app.evaluate(message(MessageType.EVALUATE, 2), ctx)
    client_app.evaluate(message(MessageType.EVALUATE, 3), ctx)  # e.g. not sampled for training in round 3
    lines = [line for line in flower_log if line.startswith("fedshop ")]
    assert "round 2: trained" in lines[1] and "rounds_trained 2;" in lines[1]
    assert "round 3: not trained this round, rounds_trained 2;" in lines[2]



def test_a_round_evaluated_twice_logs_one_line(tmp_path, flower_log) -> None:
    # Fused evaluation computed (and logged) with the train reply; the reply is lost, so the coordinator sends
    # the round's evaluate message too: the merchant's log still has one line for the round.
    message, ctx = one_shop(tmp_path)
    reply = client_app.train(message(MessageType.TRAIN, 1, **{"evaluate-after-train": True}), ctx)
    assert "evaluate-metrics" in reply.content.metric_records  # the fused evaluation ran (and logged)
    fused = reply.content["evaluate-metrics"]
    again = client_app.evaluate(message(MessageType.EVALUATE, 1), ctx).content["metrics"]
    assert dict(again) == dict(fused)  # the same evaluation
    lines = [line for line in flower_log if line.startswith("fedshop ")]
    assert len(lines) == 1 and "round 1: trained" in lines[0], flower_log
    client_app.train(message(MessageType.TRAIN, 2, **{"evaluate-after-train": True}), ctx)
    client_app.evaluate(message(MessageType.EVALUATE, 2), ctx)
    lines = [line for line in flower_log if line.startswith("fedshop ")]
    assert len(lines) == 2 and "round 2: trained" in lines[1] and "rounds_trained 2;" in lines[1]
