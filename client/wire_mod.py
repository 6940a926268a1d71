"""Client mod: decode the coordinator's compressed encoder before the handlers, compress train replies after.

It sits outside the leak guard (`ClientApp(mods=[..., wire_mod, leak_guard])`): the guard and the
handlers see the dense request and build the dense reply as without compression; this mod then turns
the guard's cleaned encoder into a delta (`shared.compression`), so only what the guard let out,
re-encoded, leaves. Messages without the `fedshop.wire` ConfigRecord (compression "none", SecAgg+)
pass through untouched.

The shop keeps the last global it decoded (`fedshop.held-global` in `context.state`, with its
digest) so the next message can be a patch against it, or carry no encoder at all when the shop
evaluates its own (personal mix). It is replaced only after the handler replied without error, so the
coordinator, which counts a global as held only after a good reply, and the shop agree.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from shared.compression import CompressionError, decode_patch, digest, encode_delta
from shared.protocol import (
    ARRAYS_RECORD,
    ERROR_CODE_BLOCKED,
    LOCAL_PREFIX,
    WIRE_FULL,
    WIRE_OMITTED,
    WIRE_PATCH,
    WIRE_RECORD,
)

HELD_RECORD = "fedshop.held-global"  # ArrayRecord in context.state: the last global this shop decoded
HELD_META = "fedshop.held-global-meta"  # ConfigRecord in context.state: {"digest": ...}
FULL, PATCH, OMITTED = WIRE_FULL, WIRE_PATCH, WIRE_OMITTED
UNDECODABLE = "shop could not decode the compressed encoder"

logger = logging.getLogger(__name__)


def held_global(context: Context) -> tuple[str, dict[str, np.ndarray]] | None:
    """(digest, arrays) of the global this shop holds, or None."""
    if HELD_RECORD not in context.state.array_records or HELD_META not in context.state.config_records:
        return None
    arrays = {k: a.numpy() for k, a in context.state.array_records[HELD_RECORD].items()}
    return str(context.state.config_records[HELD_META]["digest"]), arrays


def _received(arrays: ArrayRecord, wire: dict, context: Context) -> dict[str, np.ndarray]:
    """The dense global encoder a request stands for (CompressionError when it cannot be rebuilt)."""
    how = str(wire.get("encoder", FULL))
    encoder = {k: a.numpy() for k, a in arrays.items() if not k.startswith(LOCAL_PREFIX)}
    if how == FULL:
        new = encoder
    else:
        held = held_global(context)
        if held is None:
            raise CompressionError(f"the request's encoder is '{how}' but this shop holds no global")
        if how == OMITTED:
            return held[1]
        if how != PATCH:
            raise CompressionError(f"unknown encoder form '{how}'")
        if held[0] != str(wire.get("base", "")):
            raise CompressionError(f"the patch is against global {wire.get('base')}, this shop holds {held[0]}")
        new = decode_patch(encoder, held[1])
    if digest(new) != str(wire.get("target", "")):
        raise CompressionError("the decoded global's digest differs from the coordinator's")
    return new


def wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Rebuild a compressed request's dense encoder, run the handlers, delta-encode a train reply."""
    if not msg.has_content() or WIRE_RECORD not in msg.content.config_records:
        return call_next(msg, context)
    wire = dict(msg.content.config_records[WIRE_RECORD])
    arrays = next(iter(msg.content.array_records.values()), ArrayRecord())
    try:
        encoder = _received(arrays, wire, context)
    except Exception as exc:  # whatever the bytes are, the shop answers with an error, never a crash
        logger.error("cannot decode the coordinator's encoder: %s", exc)
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=f"{UNDECODABLE}: {exc}"), reply_to=msg)
    dense = ArrayRecord({k: a for k, a in arrays.items() if k.startswith(LOCAL_PREFIX)})
    for k, v in encoder.items():
        dense[k] = Array(v)
    content = RecordDict({ARRAYS_RECORD: dense})
    for name, record in msg.content.config_records.items():
        if name != WIRE_RECORD:
            content[name] = record
    msg.content = content
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if str(wire.get("encoder")) != OMITTED:
        context.state[HELD_RECORD] = ArrayRecord({k: Array(v) for k, v in encoder.items()})
        context.state[HELD_META] = ConfigRecord({"digest": str(wire["target"])})
    mode = str(wire.get("mode", "none"))
    if msg.metadata.message_type == MessageType.TRAIN and mode != "none":
        sent = reply.content[ARRAYS_RECORD]
        trained = {k: a.numpy() for k, a in sent.items() if not k.startswith(LOCAL_PREFIX)}
        delta = encode_delta(trained, encoder, sparse=mode.startswith("sparse-"),
                             values="int8" if mode.endswith("int8") else "fp16")
        out = ArrayRecord({k: a for k, a in sent.items() if k.startswith(LOCAL_PREFIX)})
        for k, v in delta.items():
            out[k] = Array(v)
        reply.content = RecordDict({ARRAYS_RECORD: out, **{k: r for k, r in reply.content.items()
                                                           if k != ARRAYS_RECORD}})
    return reply
