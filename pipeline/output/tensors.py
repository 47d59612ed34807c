"""Feature columns of a `featurize run` table as arrays: Arrow in, float32 numpy (or tensors) out.

A fixed-size column (`feature`, `clip_<name>`) is a fixed_size_list<float16|float32, D>: one
(N, D) array. `frame_features` is a list of them, one (T, D) sequence per clip: one (N, T, D)
array zero-padded to `frames`, with each clip's real length. Arrow's buffers are read whole, so no
Python loop ever runs over rows (the loader's speed depends on it).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VECTOR, SEQUENCE = "vector", "sequence"


class ColumnError(ValueError):
    """A column that is not a feature column."""


def column_shape(name: str, typ: pa.DataType) -> Tuple[str, int]:
    """(VECTOR or SEQUENCE, D) of a feature column's type; anything else is refused, naming it."""
    if _is_vector(typ):
        return VECTOR, typ.list_size
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and _is_vector(typ.value_type):
        return SEQUENCE, typ.value_type.list_size
    raise ColumnError(f"column {name!r} has type {typ}: expected a fixed-size list of floats "
                      "(feature, clip_<name>) or a list of them (frame_features)")


def default_vector(vectors: List[str]) -> str:
    """The vector column a table is read by when none is named (index, search, dedup, report, API):
    `feature`, else the first clip_<head> (the job's temporal order), else the first (code, probs)."""
    if "feature" in vectors:
        return "feature"
    return next((c for c in vectors if c.startswith("clip_")), vectors[0])


def _is_vector(typ: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(typ) and pa.types.is_floating(typ.value_type)


def _array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def vectors(column, missing: str = "refuse") -> np.ndarray:
    """fixed_size_list<float, D> (N rows) -> float32 (N, D). A null row or a null value in a row is
    refused (ColumnError, with the count of such rows), or NaN with missing="nan" (the index skips
    rows that are not finite)."""
    arr = _array(column)
    flat = arr.flatten()  # honours a slice's offset; leaves out the values of null rows
    if not arr.null_count and not flat.null_count:
        return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), arr.type.list_size)
    out = np.full((len(arr), arr.type.list_size), np.nan, dtype=np.float32)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    out[valid] = flat.fill_null(float("nan")).to_numpy(zero_copy_only=False).reshape(-1, arr.type.list_size)
    if missing != "nan":
        holes = flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, arr.type.list_size).any(axis=1)
        bad = arr.null_count + int(holes.sum())
        raise ColumnError(f"{bad} rows have no vector (null{' or null values' if flat.null_count else ''})")
    return out


def sequences(column, frames: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<float, D>> -> (float32 (N, T, D) zero-padded, lengths (N,) int64).
    T is `frames` (longer clips keep their first `frames`), else the longest clip of these rows."""
    arr = _array(column)
    if arr.null_count:
        raise ColumnError(f"{arr.null_count} rows have no frames (null)")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ColumnError("a clip has no frames")
    inner = vectors(arr.flatten())  # (sum of lengths, D)
    dim = arr.type.value_type.list_size
    t = int(frames if frames is not None else (lengths.max() if len(lengths) else 0))
    if len(lengths) and (lengths == lengths[0]).all() and lengths[0] == t:
        return inner.reshape(len(arr), t, dim), lengths  # every clip has T frames: no copy
    out = np.zeros((len(arr), t, dim), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, (s, n) in enumerate(zip(starts, lengths)):  # a loop over clips, not frames or values
        n = min(int(n), t)
        out[i, :n] = inner[s:s + n]
    return out, np.minimum(lengths, t)


def label_codes(column, classes) -> np.ndarray:
    """Class index of each label in `classes`; -1 where a label is not among them."""
    codes = pc.index_in(_array(column).cast(pa.string()), value_set=pa.array(list(classes), pa.string()))
    return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
