"""Check an `Array`'s npy header against its metadata and byte count before numpy parses it.

`np.load` allocates the whole array its header declares before reading a byte of data (for an in-memory
buffer it reads into a preallocated array), so a reply of a few bytes whose header claims shape (2**29,)
makes the reader reserve 2 GiB, and a header unlike the `Array`'s stated shape and dtype is parsed as is.
`checked_numpy` reads only the header first: the format version, a numeric dtype without objects, the
declared shape's byte count equal to the bytes that follow, and shape and dtype equal to the `Array`'s own
metadata. Anything else is an `ArrayFormatError` naming the array; pickles are never loaded (Flower's
`Array.numpy` uses `allow_pickle=False`, and object dtypes are refused here before it is called).
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType
from numpy.lib import format as npy_format

NUMERIC_KINDS = "fiub"  # float, signed, unsigned, bool: what model arrays are made of


class ArrayFormatError(ValueError):
    """An array whose serialised bytes are not the numeric npy array its metadata states."""


def npy_header(name: str, array: Array) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) declared by ``array``'s npy header, checked against its bytes and metadata."""
    if array.stype != SType.NUMPY:
        raise ArrayFormatError(f"array '{name}': storage type '{array.stype}' is not '{SType.NUMPY}'")
    data = array.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArrayFormatError(f"array '{name}': data is {type(data).__name__}, not bytes")
    buf = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except Exception as err:  # noqa: BLE001 - any malformed header (ValueError, SyntaxError, TypeError) is one refusal
        raise ArrayFormatError(f"array '{name}': npy header unreadable ({type(err).__name__}: {err})") from err
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ArrayFormatError(f"array '{name}': dtype {dtype} is not numeric (want one of kinds '{NUMERIC_KINDS}')")
    declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    carried = len(data) - buf.tell()
    if declared != carried:
        raise ArrayFormatError(f"array '{name}': header declares shape {tuple(shape)} {dtype} ({declared} bytes) but "
                               f"{carried} bytes follow")
    try:
        stated = np.dtype(array.dtype)
    except Exception as err:  # noqa: BLE001 - a dtype string numpy does not know
        raise ArrayFormatError(f"array '{name}': stated dtype '{array.dtype}' is not a numpy dtype") from err
    if tuple(shape) != tuple(array.shape) or stated != dtype:
        raise ArrayFormatError(f"array '{name}': bytes hold {dtype} {tuple(shape)}, its metadata states "
                               f"{stated} {tuple(array.shape)}")
    return tuple(shape), dtype, buf.tell()


def checked_numpy(name: str, array: Array) -> np.ndarray:
    """``array.numpy()`` once its header passed `npy_header` (an already decoded array is returned as is)."""
    if type(array).numpy is Array.numpy:  # a subclass that keeps its ndarray (server.decoded_array) parsed already
        npy_header(name, array)
    return array.numpy()
