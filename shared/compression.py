"""Wire compression of encoder messages: row-sparse deltas, fp16 / int8 values, exact row patches.

Up (shop -> coordinator): the trained encoder as a DELTA against the global the shop received. Tables
whose changed rows are few go row-sparse (`<key>@rows` int32 indices + `<key>@values`), the rest as one
dense delta (`<key>@dense`); values are float16, or int8 with a float32 scale (`<key>@scale`, one per
row, or one per tensor for a dense delta). An unchanged tensor is left out.
Down (coordinator -> shop): the new global as an EXACT patch of a global the shop holds: changed rows
with their new values in the model's dtype (`@rows` + `@values`) or the whole tensor (`@full`), so the
decoded global equals the dense one bit for bit (checked against `digest`).

Every name is `<encoder key>@<part>`; decoding checks names, shapes, dtypes, index ranges and
finiteness and raises `CompressionError` naming the array and what is wrong. Only numpy and the
ArrayRecord names are used: no torch here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

MODES = ("none", "fp16", "sparse-fp16", "sparse-int8")  # federation.compression
SEP = "@"
ROWS, VALUES, SCALE, DENSE, FULL = "rows", "values", "scale", "dense", "full"
PARTS = (ROWS, VALUES, SCALE, DENSE, FULL)
INT8_MAX = 127


class CompressionError(ValueError):
    """A compressed message that cannot be decoded (the message names the array and the problem)."""


def check_mode(mode: str) -> str:
    """``mode`` if it is a known compression mode, else a ValueError naming the known ones."""
    if mode not in MODES:
        raise ValueError(f"compression='{mode}' is unknown. Fix: use one of {list(MODES)}")
    return mode


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes, bytes): proves two globals are identical."""
    h = hashlib.blake2b(digest_size=16)
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()


def _changed_rows(diff: np.ndarray) -> np.ndarray:
    """Indices (int32) of the rows of ``diff`` (a boolean array) holding any True."""
    flat = diff.reshape(diff.shape[0], -1) if diff.ndim > 1 else diff.reshape(-1, 1)
    return np.flatnonzero(flat.any(axis=1)).astype(np.int32)


def _sparse_pays(n_changed: int, shape: tuple[int, ...], value_bytes: int) -> bool:
    """Whether indices + changed rows take fewer bytes than the whole tensor."""
    if len(shape) < 2:
        return False
    row = int(np.prod(shape[1:]))
    return n_changed * (4 + row * value_bytes) < shape[0] * row * value_bytes


def _quantise_int8(values: np.ndarray, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with a float32 scale per row (or per tensor): (q, scale)."""
    flat = values.reshape(values.shape[0], -1) if per_row else values.reshape(1, -1)
    scale = (np.abs(flat).max(axis=1) / INT8_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(flat / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(values.shape), scale


def encode_delta(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], *, sparse: bool = True,
                 values: str = "fp16") -> dict[str, np.ndarray]:
    """``new - base`` per key, row-sparse where that pays (``sparse``), as float16 or int8 (``values``)."""
    if values not in ("fp16", "int8"):
        raise ValueError(f"delta values must be 'fp16' or 'int8', not '{values}'")
    out: dict[str, np.ndarray] = {}
    vbytes = 2 if values == "fp16" else 1
    for key, b in base.items():
        if not np.issubdtype(b.dtype, np.floating):  # counters and the like: exact, never a float delta
            if not np.array_equal(new[key], b):
                out[f"{key}{SEP}{FULL}"] = np.asarray(new[key], dtype=b.dtype)
            continue
        delta = np.asarray(new[key], dtype=np.float32) - np.asarray(b, dtype=np.float32)
        rows = _changed_rows(delta != 0) if delta.ndim else np.flatnonzero(delta.reshape(1) != 0)
        if rows.size == 0:
            continue
        if sparse and _sparse_pays(rows.size, delta.shape, vbytes):
            out[f"{key}{SEP}{ROWS}"] = rows
            part, data, per_row = VALUES, delta[rows], True
        else:
            part, data, per_row = DENSE, delta, False
        if values == "fp16":
            out[f"{key}{SEP}{part}"] = data.astype(np.float16)
        else:
            q, scale = _quantise_int8(data, per_row)
            out[f"{key}{SEP}{part}"], out[f"{key}{SEP}{SCALE}"] = q, scale
    return out


def encode_patch(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact patch turning ``base`` into ``new``: changed rows with their new values, or whole tensors."""
    out: dict[str, np.ndarray] = {}
    for key, b in base.items():
        n = np.asarray(new[key])
        if n.shape != b.shape or n.dtype != b.dtype:
            out[f"{key}{SEP}{FULL}"] = n
            continue
        # Compare bit patterns, so -0.0 vs 0.0 (and any NaN) count as changes and decoding is exact.
        diff = _bitdiff(n.reshape(-1), b.reshape(-1)).reshape(n.shape)
        if not diff.any():
            continue
        rows = _changed_rows(diff) if n.ndim >= 2 else np.zeros(0, np.int32)
        if _sparse_pays(rows.size, n.shape, n.dtype.itemsize):
            out[f"{key}{SEP}{ROWS}"], out[f"{key}{SEP}{VALUES}"] = rows, n[rows]
        else:
            out[f"{key}{SEP}{FULL}"] = n
    return out


def _bitdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise 'bits differ' of two same-shape, same-dtype arrays (shape of ``a``)."""
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.ascontiguousarray(a).view(width) != np.ascontiguousarray(b).view(width)


def _group(arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Wire arrays grouped by encoder key; unknown keys or parts are an error."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, a in arrays.items():
        key, sep, part = name.rpartition(SEP)
        if not sep or part not in PARTS:
            raise CompressionError(f"array '{name}' is not '<encoder key>@<part>' with a part in {list(PARTS)}")
        if key not in base:
            raise CompressionError(f"array '{name}' names no encoder tensor")
        if not isinstance(a, np.ndarray):
            raise CompressionError(f"array '{name}' is not a numpy array")
        groups.setdefault(key, {})[part] = a
    return groups


def _check_rows(name: str, rows: np.ndarray, n_rows: int) -> None:
    """Row indices must be a 1-D int32 array, strictly increasing, within [0, n_rows)."""
    if rows.dtype != np.int32 or rows.ndim != 1:
        raise CompressionError(f"'{name}@{ROWS}' must be a 1-D int32 array, got {rows.dtype} {rows.shape}")
    if rows.size and (rows[0] < 0 or rows[-1] >= n_rows or (np.diff(rows) <= 0).any()):
        raise CompressionError(f"'{name}@{ROWS}' holds indices out of range [0, {n_rows}) or not strictly "
                               "increasing")


def _values(key: str, parts: Mapping[str, np.ndarray], part: str, shape: tuple[int, ...],
            per_row: bool) -> np.ndarray:
    """float32 delta values of ``part``: float16 as is, int8 times its scale; checked against ``shape``."""
    v = parts[part]
    if tuple(v.shape) != shape:
        raise CompressionError(f"'{key}@{part}' has shape {tuple(v.shape)}, expected {shape}")
    if v.dtype == np.float16:
        if SCALE in parts:
            raise CompressionError(f"'{key}@{SCALE}' given with float16 values")
        out = v.astype(np.float32)
    elif v.dtype == np.int8:
        scale = parts.get(SCALE)
        want = (shape[0],) if per_row else (1,)
        if scale is None or scale.dtype != np.float32 or tuple(scale.shape) != want:
            raise CompressionError(f"'{key}@{SCALE}' must be float32 of shape {want} for int8 values")
        if not np.isfinite(scale).all():
            raise CompressionError(f"'{key}@{SCALE}' holds NaN/Inf values")
        per = v.size // want[0] if want[0] else 0  # explicit: reshape(0, -1) of no rows is ambiguous for numpy
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, not warned
            flat = v.reshape(want[0], per).astype(np.float32) * scale[:, None]
        out = flat.reshape(shape)
    else:
        raise CompressionError(f"'{key}@{part}' has dtype {v.dtype}; a delta must be float16 or int8")
    if not np.isfinite(out).all():
        raise CompressionError(f"'{key}@{part}': update holds NaN/Inf values")
    return out


def decode_delta(arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base`` plus the delta `encode_delta` made, in each base tensor's dtype (CompressionError if malformed)."""
    out = {k: np.array(b, copy=True) for k, b in base.items()}
    for key, parts in _group(arrays, base).items():
        b = out[key]
        if set(parts) == {FULL}:
            if parts[FULL].shape != b.shape or parts[FULL].dtype != b.dtype or np.issubdtype(b.dtype, np.floating):
                raise CompressionError(f"'{key}@{FULL}' is only for non-float tensors of the base's shape and dtype")
            out[key] = parts[FULL]
        elif not np.issubdtype(b.dtype, np.floating):  # `encode_delta` sends integer tensors exactly, as '@full'
            raise CompressionError(f"'{key}' is a {b.dtype} tensor: only '@{FULL}' may change it, got {sorted(parts)}")
        elif ROWS in parts:
            if set(parts) - {ROWS, VALUES, SCALE} or VALUES not in parts or b.ndim < 1:
                raise CompressionError(f"'{key}': row-sparse delta needs exactly '@{ROWS}' and '@{VALUES}' "
                                       f"(+ '@{SCALE}' for int8), got {sorted(parts)}")
            rows = parts[ROWS]
            _check_rows(key, rows, b.shape[0])
            delta = _values(key, parts, VALUES, (rows.size, *b.shape[1:]), per_row=True)
            b[rows] = (b[rows].astype(np.float32) + delta).astype(b.dtype)
        elif DENSE in parts and not set(parts) - {DENSE, SCALE}:
            delta = _values(key, parts, DENSE, tuple(b.shape), per_row=False)
            out[key] = (b.astype(np.float32) + delta).astype(b.dtype)
        else:
            raise CompressionError(f"'{key}': parts {sorted(parts)} are not a delta ('@{ROWS}'+'@{VALUES}' "
                                   f"or '@{DENSE}', with '@{SCALE}' for int8)")
    return out


def decode_patch(arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base`` with the rows/tensors of an `encode_patch` patch replaced (CompressionError if malformed)."""
    out = dict(base)  # unchanged tensors are shared, changed ones copied
    for key, parts in _group(arrays, base).items():
        b = out[key]
        if set(parts) == {FULL}:
            out[key] = parts[FULL]
        elif set(parts) == {ROWS, VALUES} and b.ndim >= 1:
            rows, values = parts[ROWS], parts[VALUES]
            _check_rows(key, rows, b.shape[0] if b.ndim else 0)
            if tuple(values.shape) != (rows.size, *b.shape[1:]) or values.dtype != b.dtype:
                raise CompressionError(f"'{key}@{VALUES}' is {values.dtype} {tuple(values.shape)}, expected "
                                       f"{b.dtype} {(rows.size, *b.shape[1:])}")
            patched = np.array(b, copy=True)
            patched[rows] = values
            out[key] = patched
        else:
            raise CompressionError(f"'{key}': parts {sorted(parts)} are not a patch ('@{FULL}', or "
                                   f"'@{ROWS}'+'@{VALUES}' for a tensor of at least one dimension)")
    return out

