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


def test_polling_grid_pulls_again_soon_after_a_reply_and_relaxes_to_its_interval(monkeypatch) -> None:
    from server import polling_grid

    inner = RecordingGrid()
    answers = [[], [], "reply", [], [], [], [], "reply", [], "reply"]  # what each pull brings

    def pull_messages(message_ids):
        got = answers.pop(0)
        return RecordingGrid.pull_messages(inner, message_ids)[:1] if got else []

    monkeypatch.setattr(inner, "pull_messages", pull_messages)
    sleeps: list[float] = []
    monkeypatch.setattr(polling_grid.time, "sleep", sleeps.append)
    replies = list(PollingGrid(inner, 0.1, after_reply=0.02).send_and_receive(["a", "b", "c"], timeout=10.0))
    assert len(replies) == 3 and answers == []  # 10 pulls
    # before any reply the interval; after one 0.02 s, doubling back to the interval while none arrives
    assert sleeps == pytest.approx([0.1, 0.1, 0.02, 0.04, 0.08, 0.1, 0.1, 0.02, 0.04])


def test_polling_grid_with_after_reply_at_the_interval_polls_flat(monkeypatch) -> None:
    from server import polling_grid

    sleeps: list[float] = []
    monkeypatch.setattr(polling_grid.time, "sleep", sleeps.append)
    list(PollingGrid(RecordingGrid(), 0.1, after_reply=0.1).send_and_receive(["a", "b", "c"], timeout=10.0))
    assert sleeps == [0.1, 0.1]
    assert PollingGrid(RecordingGrid(), 0.1).after_reply == 0.1  # not given: the interval (Flower-like flat polls)
    assert PollingGrid(RecordingGrid(), 0.05, after_reply=0.5).after_reply == 0.05  # never slower than the interval


@pytest.mark.parametrize(("raw", "expected"), [(None, 0.02), ("", 0.02), ("0.05", 0.05), (" 0.1 ", 0.1)])
def test_after_reply_poll_is_read_from_the_environment(raw, expected) -> None:
    from server.polling_grid import AFTER_REPLY_ENV, after_reply_poll

    assert after_reply_poll({} if raw is None else {AFTER_REPLY_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["soon", "0", "0.001", "61", "nan", "inf", "-1"])
def test_a_bad_after_reply_poll_names_the_variable_and_the_fix(raw) -> None:
    from server.polling_grid import AFTER_REPLY_ENV, after_reply_poll

    with pytest.raises(ValueError, match=r"^FEDSHOP_GRID_AFTER_REPLY_POLL=.*between 0.005 and 60\. Fix: unset it"):
        after_reply_poll({AFTER_REPLY_ENV: raw})
