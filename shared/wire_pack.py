"""Lossless transport packing: a message's whole RecordDict in one ConfigRecord, and back.

In deployment flwr 1.42 moves a message as a tree of objects (Message, RecordDict, each record, each
`Array` and each of its chunks), one HTTPS request per object per hop (ServerApp -> SuperLink -> SuperNode
-> ClientApp and back): the tiny scenario's 23-array encoder is ~50 requests per hop. Packing puts every
record into one ConfigRecord: the ConfigRecords and MetricRecords deflated by Flower's own `deflate()`
(their exact bytes), the Arrays' serialised bytes, unchanged, in one blob plus a layout. A message is then
3 objects (Message, RecordDict, this ConfigRecord) instead of ~8 (50 unpacked). A blob larger than one of
Flower's Array chunks (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MB) goes in a uint8 `Array` instead, which
Flower chunks as usual, so no single request grows past what Flower sends anyway.
Unpacking rebuilds every record byte for byte in the original order (the RecordDict's Flower object ID is
the same), so everything above the transport sees what was sent. Flower has no option to batch objects per
request; this uses only its public record API.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

PACKED = "fedshop.packed"  # the ConfigRecord holding the whole RecordDict
LAYOUT = PACKED  # the layout lives in the same ConfigRecord
BLOB = "fedshop.packed-blob"  # ArrayRecord (one uint8 Array, same key) for a blob over INLINE_LIMIT
INLINE_LIMIT = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # larger blobs travel as a chunked Array
_KINDS = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


class PackError(ValueError):
    """A packed RecordDict whose layout does not match its blob or records."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` was made by `pack`."""
    return PACKED in content.config_records


def _objects(content: RecordDict) -> int:
    """How many Flower objects ``content``'s records are (records, Arrays, at least one chunk each)."""
    return len(content) + sum(2 * len(rec) for rec in content.array_records.values())


def pack(content: RecordDict, inline_limit: int = INLINE_LIMIT) -> RecordDict:
    """``content`` as one ConfigRecord (plus a blob Array if over ``inline_limit`` bytes); unchanged if no smaller."""
    if is_packed(content) or _objects(content) <= 1:
        return content
    arrays = [(name, key, arr) for name, rec in content.array_records.items() for key, arr in rec.items()]
    kinds = [next(kind for kind, cls in _KINDS.items() if isinstance(rec, cls)) for rec in content.values()]
    shapes: list[int] = []
    for _, _, arr in arrays:
        shapes += [len(arr.shape), *arr.shape]
    blob = b"".join(arr.data for _, _, arr in arrays)
    layout = ConfigRecord({
        "order": list(content.keys()), "kinds": kinds,
        "deflated": [rec.deflate() for rec in content.values() if not isinstance(rec, ArrayRecord)],
        "records": [name for name, _, _ in arrays], "keys": [key for _, key, _ in arrays],
        "dtypes": [arr.dtype for _, _, arr in arrays], "stypes": [arr.stype for _, _, arr in arrays],
        "shapes": shapes, "lengths": [len(arr.data) for _, _, arr in arrays],
    })
    packed = RecordDict({PACKED: layout})
    if len(blob) <= inline_limit:
        layout["blob"] = blob
    else:
        packed[BLOB] = ArrayRecord({BLOB: Array(np.frombuffer(blob, dtype=np.uint8))})
    return packed


def _check_types(fields: dict[str, list], kind: type) -> None:
    """PackError unless every element of every layout list is a ``kind`` (bool is no int here)."""
    for name, values in fields.items():
        bad = next((v for v in values if not isinstance(v, kind) or isinstance(v, bool)), None)
        if bad is not None or any(isinstance(v, bool) for v in values):
            raise PackError(f"packed message: layout '{name}' holds {type(bad).__name__} {bad!r}, not {kind.__name__}")


def unpack(content: RecordDict) -> RecordDict:
    """Invert `pack` (content not packed is returned as is); PackError when layout, blob or records disagree."""
    if not is_packed(content):
        return content
    layout = content.config_records[PACKED]
    try:
        if "blob" in layout:
            blob = layout["blob"]  # bytes only: bytes(n) of an int would allocate n bytes
            if not isinstance(blob, bytes):
                raise TypeError(f"blob is {type(blob).__name__}, not bytes")
        else:
            blob = content.array_records[BLOB][BLOB].numpy().tobytes()
        records, keys, lengths = list(layout["records"]), list(layout["keys"]), list(layout["lengths"])
        dtypes, stypes, shapes = list(layout["dtypes"]), list(layout["stypes"]), list(layout["shapes"])
        order, kinds, deflated = list(layout["order"]), list(layout["kinds"]), list(layout["deflated"])
    except (KeyError, TypeError, ValueError) as err:
        raise PackError(f"packed message: unreadable layout ({err})") from err
    _check_types({"records": records, "keys": keys, "dtypes": dtypes, "stypes": stypes, "order": order,
                  "kinds": kinds}, str)
    _check_types({"lengths": lengths, "shapes": shapes}, int)
    _check_types({"deflated": deflated}, bytes)
    if any(n < 0 for n in [*lengths, *shapes]):
        raise PackError("packed message: negative lengths or shapes in the layout")
    if not len(records) == len(keys) == len(lengths) == len(dtypes) == len(stypes) or sum(lengths) != len(blob):
        raise PackError(f"packed message: layout of {len(records)} arrays, {sum(lengths)} bytes does not match "
                        f"the {len(blob)}-byte blob")
    if len(order) != len(kinds) or any(k not in _KINDS for k in kinds) or \
            len(deflated) != sum(k != "array" for k in kinds) or set(records) - set(order):
        raise PackError(f"packed message: record list {order} does not match kinds {kinds} and "
                        f"{len(deflated)} serialised records")
    rebuilt: dict[str, ArrayRecord] = {}
    offset = position = 0
    try:
        for name, key, length, dtype, stype in zip(records, keys, lengths, dtypes, stypes, strict=True):
            ndim = shapes[position]
            shape = tuple(int(s) for s in shapes[position + 1: position + 1 + ndim])
            position += 1 + ndim
            rebuilt.setdefault(name, ArrayRecord())[key] = Array(dtype=dtype, shape=shape, stype=stype,
                                                                 data=blob[offset: offset + length])
            offset += length
        out = RecordDict()
        serialised = iter(deflated)
        for name, kind in zip(order, kinds, strict=True):
            out[name] = rebuilt.get(name, ArrayRecord()) if kind == "array" else \
                _KINDS[kind].inflate(bytes(next(serialised)))
    except PackError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed part (protobuf, shapes) is one refusal
        raise PackError(f"packed message: unreadable record ({type(err).__name__}: {err})") from err
    return out
