"""Checks of what the index is asked and what it reads back, before faiss sees any of it: faiss
aborts the process on some values (HNSW M 0; M 1 crashes it), and an index of another table (its
lineage) would answer with another model's neighbours as this table's."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional

from ..errors import IndexRefused
from .options import KINDS, METRICS

HNSW_M_MAX, NLIST_MAX = 256, 1 << 20


def check_options(**given: Any) -> None:
    """Every option, checked before faiss sees it (a bad one can abort the process inside faiss)."""
    if given["kind"] not in KINDS:
        raise IndexRefused(f"--kind {given['kind']!r}: expected one of {', '.join(KINDS)}")
    if given["metric"] not in METRICS:
        raise IndexRefused(f"--metric {given['metric']!r}: expected one of {', '.join(METRICS)}")
    for key in ("center", "rebuild"):
        if not isinstance(given[key], bool):
            raise IndexRefused(f"{key}: {given[key]!r} is not True or False")
    if given["center"] and given["metric"] != "cosine":
        raise IndexRefused("--center: only for --metric cosine (L2 distances do not change when every vector moves)")
    if given["column"] is not None and not isinstance(given["column"], str):
        raise IndexRefused(f"column: {given['column']!r} is not a column name")
    if given["nlist"] is not None:
        whole(given["nlist"], "nlist", 1, NLIST_MAX)
    whole(given["hnsw_m"], "hnsw_m", 2, HNSW_M_MAX)


def number(value: Any) -> bool:
    """A finite real number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def whole(value: Any, key: str, low: int, high: Optional[int] = None) -> int:
    """`value` when it is an integer in [low, high] (high None: no bound); else a one-line refusal naming `key`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low or \
            (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise IndexRefused(f"{key}: {value!r} is not a whole number {span}")
    return int(value)


def lineage_change(recorded: Any, now: Dict[str, Any]) -> Optional[str]:
    """How the table's provenance (model, weights, layer ...) differs from the one an index or a list
    of duplicates recorded; None when the same."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("provenance"), dict):
        return "the index records no lineage of its table (made before featurize recorded it)"
    was, is_ = recorded["provenance"], now["provenance"]
    keys = sorted(k for k in set(was) | set(is_) if was.get(k) != is_.get(k))
    if not keys:
        return None
    said = "; ".join(f"{k} {_short(was.get(k))} -> {_short(is_.get(k))}" for k in keys[:2])
    return f"the table was made by another model ({said}{'; ...' if len(keys) > 2 else ''})"


def _short(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
