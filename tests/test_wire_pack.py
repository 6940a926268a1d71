"""Transport packing of messages' Arrays (shared.wire_pack, client.pack_mod, server.polling_grid).

The object-pull back-offs: tests/test_pull_backoff.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata

from client.pack_mod import pack_mod
from server.polling_grid import PACK_ENV, PollingGrid, packing_enabled
from shared.wire_pack import BLOB, LAYOUT, PACKED, PackError, is_packed, pack, unpack


def _linear() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 3).state_dict()


def _content() -> RecordDict:
    return RecordDict({
        "config": ConfigRecord({"server-round": 2, "scenario": "x"}),
        "arrays": ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
                               "empty": Array(np.zeros((0, 5), dtype=np.int8)),
                               "scalar": Array(np.ones((), dtype=np.float16))}),
        "metrics": MetricRecord({"num-examples": 5}),
        "local": ArrayRecord(_linear()),
    })


def _fields(content: RecordDict) -> list[tuple]:
    return [(name, key, a.dtype, tuple(a.shape), a.stype, a.data)
            for name, rec in content.array_records.items() for key, a in rec.items()]


def _message(content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="2", created_at=1.0, ttl=600.0, message_type="train")
    return make_message(metadata=meta, content=content)


def test_pack_puts_the_whole_content_in_one_record_and_unpack_restores_it_byte_for_byte() -> None:
    content = _content()
    packed = pack(content)
    assert is_packed(packed) and list(packed.keys()) == [PACKED]  # Message + RecordDict + 1 record on the wire
    assert len(packed.object_id) == 64 and not packed.array_records
    back = unpack(packed)
    assert back["config"] == content["config"] and back["metrics"] == content["metrics"]
    assert list(back.keys()) == list(content.keys())  # record order kept, array records where they were
    assert _fields(back) == _fields(content)
    assert back.object_id == content.object_id  # Flower sees the very same content
    assert unpack(content) is content  # not packed: untouched


def test_content_that_is_one_record_already_is_not_packed() -> None:
    metrics = RecordDict({"metrics": MetricRecord({"a": 1.0})})
    assert pack(metrics) is metrics
    one = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})})
    assert is_packed(pack(one)) and _fields(unpack(pack(one))) == _fields(one)  # 3 objects become 1


def test_a_blob_over_the_inline_limit_travels_as_one_chunked_array() -> None:
    content = _content()
    packed = pack(content, inline_limit=16)
    assert list(packed.array_records) == [BLOB] and "blob" not in packed[PACKED]
    assert unpack(packed).object_id == content.object_id


def test_malformed_serialised_records_are_refused() -> None:
    packed = pack(_content())
    packed[LAYOUT]["deflated"] = [b"\xff\xfe not a record", b"x"]
    with pytest.raises(PackError, match="unreadable record"):
        unpack(packed)
    packed = pack(_content())
    packed[LAYOUT]["kinds"] = ["config", "script", "metric", "array"]
    with pytest.raises(PackError, match="does not match kinds"):
        unpack(packed)


def test_a_layout_that_does_not_match_the_blob_is_refused() -> None:
    packed = pack(_content())
    layout = packed[LAYOUT]
    layout["lengths"] = [n + 1 for n in layout["lengths"]]
    with pytest.raises(PackError, match="does not match"):
        unpack(packed)


def test_the_client_mod_unpacks_the_request_and_packs_the_reply_only_when_asked() -> None:
    seen: list[RecordDict] = []

    def app(msg: Message, _context: Context) -> Message:
        seen.append(msg.content)
        return Message(_content(), reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = pack_mod(_message(pack(_content())), context, app)
    assert not is_packed(seen[0]) and _fields(seen[0]) == _fields(_content())
    assert is_packed(reply.content) and _fields(unpack(reply.content)) == _fields(_content())
    plain = pack_mod(_message(_content()), context, app)
    assert not is_packed(plain.content)  # an unpacked request (simulation, packing off) gets a plain reply
    broken = pack(_content())
    broken[LAYOUT]["lengths"] = [1]
    refused = pack_mod(_message(broken), context, app)
    assert refused.has_error() and len(seen) == 2  # the app never saw it


class _FakeGrid:
    """Records what is pushed (as the transport sees it) and answers with one reply per message."""

    def __init__(self) -> None:
        self.pushed: list[RecordDict] = []
        self.replies: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            self.pushed.append(msg.content)
            msg.metadata.__dict__["_message_id"] = f"id{i}"
            self.replies.append(Message(pack(_content()), reply_to=msg))
            ids.append(f"id{i}")
        return ids

    def pull_messages(self, _ids):
        out, self.replies = self.replies, []
        return out


def test_the_polling_grid_packs_what_it_pushes_and_unpacks_replies() -> None:
    inner = _FakeGrid()
    msg = _message(_content())
    original = msg.content
    replies = list(PollingGrid(inner, 0.01, packed=True).send_and_receive([msg], timeout=5))
    assert is_packed(inner.pushed[0]) and _fields(unpack(inner.pushed[0])) == _fields(original)
    assert msg.content is original  # the caller's message is left as it was
    assert len(replies) == 1 and not is_packed(replies[0].content)
    assert _fields(replies[0].content) == _fields(_content())
    inner = _FakeGrid()
    list(PollingGrid(inner, 0.01, packed=False).send_and_receive([_message(_content())], timeout=5))
    assert not is_packed(inner.pushed[0])


def test_packing_setting_is_validated() -> None:
    assert packing_enabled({}) and not packing_enabled({PACK_ENV: "0"})
    with pytest.raises(ValueError, match=PACK_ENV):
        packing_enabled({PACK_ENV: "yes"})
