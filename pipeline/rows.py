"""The row contract between stages: the columns every batch carries, and how a failed sample says so.

A batch is `Dict[str, np.ndarray]`. Plan rows carry PLAN_COLUMNS; samples add SAMPLE_COLUMNS' rest;
every stage keeps ERROR_COLUMNS, empty (OK) while the sample is fine: a stage that fails on a sample
fills them (error_fields) and later stages pass it by, so the sink writes it to the errors table.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .redact import redact_text

PLAN_COLUMNS = ("sample_id", "uri", "label", "split")
# unit: the plan row a sample comes from (a tar shard, a video cut into windows, or itself);
# unit_rows: how many rows that unit yields, 0 while unknown (see commit.py);
# attempts: how many earlier runs failed on the sample (--retry-failed).
SAMPLE_COLUMNS = (*PLAN_COLUMNS, "unit", "unit_rows", "attempts")
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
MAX_MESSAGE = 500
OK = {"error_stage": "", "error_type": "", "error_message": ""}


def error_fields(stage: str, exc: BaseException) -> Dict[str, str]:
    message = redact_text(str(exc) or repr(exc))  # exception texts often quote the URL, credentials and all
    return {"error_stage": stage, "error_type": type(exc).__name__, "error_message": message[:MAX_MESSAGE]}


def ragged(arrays: List[np.ndarray]) -> np.ndarray:
    """A column of arrays of different lengths (one object array), as Ray Data takes them."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # element by element: numpy would stack equal shapes
        out[i] = a
    return out
