"""`DecodedArray`: a Flower `Array` that keeps its decoded ndarray, so a reply is parsed once per round.

A Flower `Array` holds npy bytes and `Array.numpy()` parses them (`np.load`) on every call. The
coordinator reads each reply's arrays several times (checks, screens, the Flower strategy's own
aggregation), so `ShopStrategy` decodes each array once and puts a `DecodedArray` in its place: its
`numpy()` returns the kept ndarray (read-only: nobody may change a reply in place), and its npy bytes
are the original ones, or made only if something asks for them (an array the coordinator computed).
Subclassing is what lets Flower's strategies, which call `Array.numpy()`, reuse the decoded value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


class DecodedArray(Array):
    """An `Array` whose `numpy()` is the ndarray it was built from, not a fresh parse of its bytes."""

    def __init__(self, ndarray: np.ndarray, source: Array | None = None) -> None:
        """``ndarray`` decoded from ``source`` (whose bytes are kept), or computed (bytes made on demand)."""
        if source is not None:
            super().__init__(dtype=source.dtype, shape=tuple(source.shape), stype=source.stype, data=source.data)
        else:  # `data` stays unset: `__getattr__` serialises only if something reads it
            self.__dict__.update(dtype=str(ndarray.dtype), shape=tuple(ndarray.shape), stype=SType.NUMPY)
        view = ndarray.view()
        view.flags.writeable = False
        self.__dict__["_ndarray"] = view

    def __getattr__(self, name: str) -> Any:
        """The npy bytes, serialised the first time they are read (only `data` is ever missing)."""
        if name != "data":
            raise AttributeError(name)
        data = Array.from_numpy_ndarray(np.ascontiguousarray(self.__dict__["_ndarray"])).data
        self.__dict__["data"] = data
        return data

    def numpy(self) -> np.ndarray:
        """The kept ndarray (read-only), without parsing bytes."""
        return self.__dict__["_ndarray"]


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these very Array objects (`ArrayRecord(dict)` would copy each into a plain
    `Array`, dropping the decoded value and serialising any bytes not made yet)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record
