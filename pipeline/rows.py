"""The row contract between stages: the columns every batch carries, and how a failed sample says so.

A batch is `Dict[str, np.ndarray]`. Plan rows carry PLAN_COLUMNS; samples add SAMPLE_COLUMNS' rest;
every stage keeps ERROR_COLUMNS, empty (OK) while the sample is fine: a stage that fails on a sample
fills them (error_fields) and later stages pass it by, so the sink writes it to the errors table.
A feature with a NaN or inf in it, as the output stores it, is such a failure (fail_nonfinite).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy as np

from .errors import SampleError
from .redact import redact_text

PLAN_COLUMNS = ("sample_id", "uri", "label", "split")
# unit: the plan row a sample comes from (a tar shard, a video cut into windows, or itself);
# unit_rows: how many rows that unit yields, 0 while unknown (see output/ledger.py);
# attempts: how many earlier runs failed on the sample (--retry-failed).
SAMPLE_COLUMNS = (*PLAN_COLUMNS, "unit", "unit_rows", "attempts")
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
MAX_MESSAGE = 500
OK = {"error_stage": "", "error_type": "", "error_message": ""}


class NonFiniteFeature(SampleError):
    """A feature with a NaN or inf in it, as the output stores it; its stage is the one that made it."""


def error_fields(stage: str, exc: BaseException) -> Dict[str, str]:
    """ERROR_COLUMNS' values of a sample that failed with `exc`, caught in `stage`: a SampleError names
    its own error_type and stage (the catcher's where it names none); any other exception (a
    decoder's, a model's) is named by its class, in the catcher's stage."""
    message = redact_text(str(exc) or repr(exc))  # exception texts often quote the URL, credentials and all
    if isinstance(exc, SampleError):
        stage, kind = exc.stage or stage, exc.error_type
    else:
        kind = type(exc).__name__
    return {"error_stage": stage, "error_type": kind, "error_message": message[:MAX_MESSAGE]}


def fail_rows(batch: Dict[str, np.ndarray], rows: np.ndarray, fields: Mapping[str, str]) -> None:
    """Mark `rows` (a mask or indices) failed with `fields` (ERROR_COLUMNS' values); copies, as Ray's
    batches may be read-only views."""
    for col in ERROR_COLUMNS:
        batch[col] = batch[col].copy()
        batch[col][rows] = fields[col]


def fail_nonfinite(batch: Dict[str, np.ndarray], columns: Mapping[str, Any], dtype,
                   stage: str) -> Dict[str, np.ndarray]:
    """Rows still OK whose feature in any of `columns` (float32 values, (N, ...) or one array per row)
    holds a NaN or inf once cast to the output `dtype` become `stage` errors: a non-finite feature is
    never published (float16 overflows above 65504, so finite float32 features can become inf).
    Returns the dense columns as stored."""
    stored = {}
    for column, values in columns.items():
        rows = np.flatnonzero(batch["error_stage"] == "")
        if isinstance(values, np.ndarray) and values.dtype != object:  # dense: one vectorised pass first
            stored[column] = as_stored(values, dtype)
            # a row's largest magnitude, in float32 (NaN stays NaN): only rows beyond the dtype's
            # largest finite value are looked at (np.isfinite on float16 is ten times slower)
            peak = np.abs(values).max(axis=tuple(range(1, values.ndim)), initial=0)
            rows = rows[~(peak[rows] <= np.finfo(dtype).max)]
        for i in rows:
            problem = nonfinite(np.asarray(values[i]), dtype)
            if problem:
                fail_rows(batch, np.array([i]), error_fields(stage, NonFiniteFeature(f"{column}: {problem}")))
    return stored


def nonfinite(values: np.ndarray, dtype) -> str:
    """What is wrong with `values` stored as `dtype`, or "" when every value is finite."""
    bad = int(np.count_nonzero(~np.isfinite(as_stored(values, dtype))))
    if not bad:
        return ""
    if np.isfinite(values).all():
        name = np.dtype(dtype).name
        return (f"{bad} of {values.size} values overflow {name} (largest {float(np.finfo(dtype).max):g}): "
                "use output.dtype float32")
    return f"{bad} of {values.size} values are NaN or inf"


def as_stored(values: np.ndarray, dtype) -> np.ndarray:
    """`values` cast to the output dtype; an overflow is no warning here, fail_nonfinite reports it."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype, copy=False)


def ragged(arrays: List[np.ndarray]) -> np.ndarray:
    """A column of arrays of different lengths (one object array), as Ray Data takes them."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # element by element: numpy would stack equal shapes
        out[i] = a
    return out
