"""fedshop's Grid wrappers delegate Flower's whole Grid API through one base, `DelegatingGrid`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.serverapp import Grid

from server.delegating_grid import DelegatingGrid
from server.node_identity import IdentityCheckedGrid
from server.polling_grid import PollingGrid


class RecordingGrid(Grid):
    """A Grid that records each call and answers with a value naming it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.node = "the HttpGrid's node"  # an attribute outside the Grid API
        self.pending: list[str] = []

    def set_run(self, run):
        self.calls.append("set_run")

    @property
    def run(self):
        self.calls.append("run")
        return "run"

    def create_message(self, *args, **kwargs):
        self.calls.append("create_message")
        return ("message", args, kwargs)

    def get_node_ids(self):
        self.calls.append("get_node_ids")
        return [1, 2]

    def get_nodes(self):
        self.calls.append("get_nodes")
        return ["n1", "n2"]

    def push_messages(self, messages):
        self.calls.append("push_messages")
        self.pending = [f"id-{i}" for i, _ in enumerate(messages)]
        return list(self.pending)

    def pull_messages(self, message_ids):
        self.calls.append("pull_messages")
        if not self.pending:
            return []
        done = self.pending.pop(0)  # one reply per pull: the poller must keep pulling
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=done, message_type="train",
                                                         group_id="1"), has_error=lambda: False)]

    def send_and_receive(self, messages, *, timeout=None):
        self.calls.append("send_and_receive")
        return []


@pytest.mark.parametrize("wrap", [lambda g: PollingGrid(g, 0.01), lambda g: IdentityCheckedGrid(g, {})],
                         ids=["PollingGrid", "IdentityCheckedGrid"])
def test_every_grid_call_reaches_the_wrapped_grid(wrap) -> None:
    inner = RecordingGrid()
    grid = wrap(inner)
    assert isinstance(grid, DelegatingGrid)
    grid.set_run(7)
    assert grid.run == "run"
    assert grid.create_message("c", "train", 1, "g", ttl=5.0) == ("message", ("c", "train", 1, "g"), {"ttl": 5.0})
    assert list(grid.get_node_ids()) == [1, 2] and list(grid.get_nodes()) == ["n1", "n2"]
    assert grid.push_messages(["a"]) == ["id-0"]
    assert len(list(grid.pull_messages(["id-0"]))) == 1
    assert grid.node == inner.node
    assert inner.calls == ["set_run", "run", "create_message", "get_node_ids", "get_nodes", "push_messages",
                           "pull_messages"]


def test_polling_grid_pulls_until_every_reply_arrived() -> None:
    inner = RecordingGrid()
    replies = list(PollingGrid(inner, 0.01).send_and_receive(["a", "b", "c"], timeout=10.0))
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-0", "id-1", "id-2"]
    assert inner.calls.count("pull_messages") == 3 and "send_and_receive" not in inner.calls
