"""A shop parses its round settings once per message (`client.message_settings`), on every path.

The count is taken by wrapping the schema's one parse, `ShopRoundSettings.from_message`, so it would also
count a reader that bypassed `settings_for`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flower_harness import tiny_scenario, write_scenario
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from pydantic import ValidationError

from client import client_app
from client.message_settings import settings_for, settings_for_config
from server.server_app import make_server_app
from shared.settings import ShopRoundSettings
from simulations.privacy.in_process_grid import InProcessGrid, nodes


@pytest.fixture(scope="module")
def scenario_path(tmp_path_factory) -> Path:
    return write_scenario(tiny_scenario(), tmp_path_factory.mktemp("once") / "scenario.toml")


@pytest.fixture
def parses(monkeypatch) -> list[dict]:
    """Every parse of a shop's settings (the message config it parsed), in order."""
    calls: list[dict] = []
    original = ShopRoundSettings.from_message.__func__

    def counting(cls, run_config, sent):
        calls.append(dict(sent))
        return original(cls, run_config, sent)

    monkeypatch.setattr(ShopRoundSettings, "from_message", classmethod(counting))
    return calls


def _run(path: Path, run_dir: Path, **config: object) -> InProcessGrid:
    grid = InProcessGrid(client_app.app, nodes(3))
    server = make_server_app({"scenario": str(path), "num-server-rounds": 2, "run-dir": str(run_dir),
                              "min-shops": 2, "eval-split": "val", "final-split": "val", "max-steps": 2, **config})
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return grid


@pytest.mark.parametrize("config", [{}, {"compression": "sparse-fp16"}, {"secure-aggregation": True}],
                         ids=["plain", "compressed", "secagg"])
def test_each_message_is_parsed_once(scenario_path: Path, tmp_path: Path, parses: list[dict], config: dict) -> None:
    grid = _run(scenario_path, tmp_path, **config)
    messages = len(grid.received)
    print(f"{config or 'plain'}: {len(parses)} parses for {messages} messages")
    assert messages >= 12 and all(r.error is None for r in grid.received)
    assert len(parses) == messages


def _message(config: dict) -> Message:
    return Message(RecordDict({"config": ConfigRecord(config)}), 1, MessageType.TRAIN)


def test_settings_for_returns_one_frozen_object_per_message(parses: list[dict]) -> None:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"local-epochs": 2})
    first = _message({"server-round": 3})
    settings = settings_for(first, ctx)
    assert settings_for(first, ctx) is settings and len(parses) == 1
    assert (settings.server_round, settings.local_epochs) == (3, 2)
    assert settings_for_config(ctx, {"server-round": 3}) is settings  # the legacy client's view of this message
    with pytest.raises(ValidationError, match="frozen"):
        settings.local_epochs = 5
    second = _message({"server-round": 4})
    assert settings_for(second, ctx).server_round == 4 and len(parses) == 2  # a new message: parsed again
    assert settings_for_config(ctx, {"server-round": 5}).server_round == 5 and len(parses) == 3
