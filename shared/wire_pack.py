"""Lossless transport packing: every Array of a message's RecordDict in one byte blob, and back.

In deployment flwr 1.42 moves each `Array` (and each of its chunks) as its own object, one HTTPS request
per object per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back): the tiny scenario's
23-array encoder is ~50 requests per hop, ~1.5 s per hop on 2 cores (docs/deployment.md, "Latency").
Packing puts the arrays' serialised bytes, unchanged, into one uint8 `Array` plus a ConfigRecord layout,
so a message is a handful of objects. Unpacking rebuilds every Array byte for byte (dtype, shape, stype,
data) in the original record and key order, so everything above the transport sees what was sent.
Flower has no option to batch objects per request; this uses only its public record API.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED = "fedshop.packed"  # ArrayRecord holding the blob under the same key
LAYOUT = "fedshop.packed-layout"  # ConfigRecord: where each Array's bytes sit in the blob


class PackError(ValueError):
    """A packed RecordDict whose layout does not match its blob."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` was made by `pack`."""
    return PACKED in content and LAYOUT in content


def pack(content: RecordDict) -> RecordDict:
    """``content`` with all its ArrayRecords in one blob; unchanged if it holds fewer than two Arrays."""
    arrays = [(name, key, arr) for name, rec in content.array_records.items() for key, arr in rec.items()]
    if len(arrays) < 2 or is_packed(content):
        return content
    shapes: list[int] = []
    for _, _, arr in arrays:
        shapes += [len(arr.shape), *arr.shape]
    layout = ConfigRecord({
        "order": list(content.keys()),
        "records": [name for name, _, _ in arrays], "keys": [key for _, key, _ in arrays],
        "dtypes": [arr.dtype for _, _, arr in arrays], "stypes": [arr.stype for _, _, arr in arrays],
        "shapes": shapes, "lengths": [len(arr.data) for _, _, arr in arrays],
    })
    blob = np.frombuffer(b"".join(arr.data for _, _, arr in arrays), dtype=np.uint8)
    packed = RecordDict({name: rec for name, rec in content.items() if not isinstance(rec, ArrayRecord)})
    packed[PACKED] = ArrayRecord({PACKED: Array(blob)})
    packed[LAYOUT] = layout
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """Invert `pack` (content not packed is returned as is); PackError when layout and blob disagree."""
    if not is_packed(content):
        return content
    layout = content[LAYOUT]
    try:
        blob = content[PACKED][PACKED].numpy().tobytes()
        records, keys, lengths = list(layout["records"]), list(layout["keys"]), list(layout["lengths"])
        dtypes, stypes, shapes = list(layout["dtypes"]), list(layout["stypes"]), list(layout["shapes"])
        order = list(layout["order"])
    except (KeyError, TypeError, ValueError) as err:
        raise PackError(f"packed message: unreadable layout ({err})") from err
    if not len(records) == len(keys) == len(lengths) == len(dtypes) == len(stypes) or sum(lengths) != len(blob):
        raise PackError(f"packed message: layout of {len(records)} arrays, {sum(lengths)} bytes does not match "
                        f"the {len(blob)}-byte blob")
    rebuilt: dict[str, ArrayRecord] = {}
    offset = position = 0
    for name, key, length, dtype, stype in zip(records, keys, lengths, dtypes, stypes, strict=True):
        ndim = shapes[position]
        shape = tuple(int(s) for s in shapes[position + 1: position + 1 + ndim])
        position += 1 + ndim
        rebuilt.setdefault(name, ArrayRecord())[key] = Array(dtype=dtype, shape=shape, stype=stype,
                                                             data=blob[offset: offset + length])
        offset += length
    out = RecordDict()
    for name in order:
        out[name] = rebuilt[name] if name in rebuilt else content[name]
    return out
