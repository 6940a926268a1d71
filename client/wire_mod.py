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
A patch whose base is not the held global may be against the run's initial encoder, which the shop
rebuilds from its scenario (`initial_global`): a shop that holds nothing yet (round 1, a new node)
downloads only what changed since. Another base is refused (error reply; the next message is full).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.local_state import resolve_shop
from client.message_settings import settings_for
from shared.compression import CompressionError, decode_patch, digest, encode_delta
from shared.model import initial_encoder_state
from shared.npy_check import checked_numpy
from shared.protocol import (
    ARRAYS_RECORD,
    ERROR_CODE_BLOCKED,
    LOCAL_PREFIX,
    UNDECODABLE_TEXT,
    WIRE_FULL,
    WIRE_OMITTED,
    WIRE_PATCH,
    WIRE_RECORD,
)
from shared.settings import ShopRoundSettings

HELD_RECORD = "fedshop.held-global"  # ArrayRecord in context.state: the last global this shop decoded
HELD_META = "fedshop.held-global-meta"  # ConfigRecord in context.state: {"digest": ...}
FULL, PATCH, OMITTED = WIRE_FULL, WIRE_PATCH, WIRE_OMITTED
UNDECODABLE = UNDECODABLE_TEXT

logger = logging.getLogger(__name__)

_INITIAL: dict[str, tuple[str, dict[str, np.ndarray]]] = {}  # configs + seed -> (digest, arrays), last one


def initial_global(context: Context, settings: ShopRoundSettings) -> tuple[str, dict[str, np.ndarray]]:
    """(digest, arrays) of the run's initial encoder, rebuilt from this shop's scenario and seed.

    The same function the coordinator starts from (`shared.model.initial_encoder_state`); built under
    `fork_rng` so the shop's torch RNG stream is the same as without compression, and kept per process.
    """
    scenario = resolve_shop(context, settings).scenario
    key = repr((scenario.model, scenario.features, scenario.seed))
    if key not in _INITIAL:
        with torch.random.fork_rng(devices=[]):
            state = initial_encoder_state(scenario.model, scenario.features, scenario.seed)
        arrays = {k: v.numpy() for k, v in state.items()}
        for a in arrays.values():
            a.flags.writeable = False  # shared by every message of this process: nothing may patch in place
        _INITIAL.clear()
        _INITIAL[key] = (digest(arrays), arrays)
    return _INITIAL[key]


def held_global(context: Context) -> tuple[str, dict[str, np.ndarray]] | None:
    """(digest, arrays) of the global this shop holds, or None."""
    if HELD_RECORD not in context.state.array_records or HELD_META not in context.state.config_records:
        return None
    arrays = {k: a.numpy() for k, a in context.state.array_records[HELD_RECORD].items()}
    return str(context.state.config_records[HELD_META]["digest"]), arrays


def _received(arrays: ArrayRecord, wire: dict, context: Context, settings: ShopRoundSettings) -> dict[str, np.ndarray]:
    """The dense global encoder a request stands for (CompressionError when it cannot be rebuilt)."""
    how = str(wire.get("encoder", FULL))
    encoder = {k: checked_numpy(k, a) for k, a in arrays.items() if not k.startswith(LOCAL_PREFIX)}
    if how == FULL:
        new = encoder
    else:
        held = held_global(context)
        if how == OMITTED:
            if held is None:
                raise CompressionError(f"the request's encoder is '{how}' but this shop holds no global")
            return held[1]
        if how != PATCH:
            raise CompressionError(f"unknown encoder form '{how}'")
        base = str(wire.get("base", ""))
        if held is None or held[0] != base:
            start = initial_global(context, settings)
            if start[0] != base:
                raise CompressionError(f"the patch is against global {base}; this shop holds "
                                       f"{held[0] if held else 'none'} and its initial encoder is {start[0]} "
                                       "(another scenario, seed or code version?)")
            held = start
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
        encoder = _received(arrays, wire, context, settings_for(msg, context))
    except Exception as exc:  # whatever the bytes are, the shop answers with an error, never a crash
        logger.error("cannot decode the coordinator's encoder: %s", exc)
        # A CompressionError's text names only the coordinator's arrays, shapes and digests (the operator's
        # diagnostic); any other exception (a scenario or shop file the shop failed to load) may quote host
        # paths or file contents: its text stays in the log.
        reason = f"{UNDECODABLE}: {exc}" if isinstance(exc, CompressionError) else UNDECODABLE
        return Message(Error(code=ERROR_CODE_BLOCKED, reason=reason), reply_to=msg)
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
