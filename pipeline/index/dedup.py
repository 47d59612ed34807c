"""Near-duplicate groups: every row searched against the table's index, pairs closer than the
threshold, connected into groups.

Near duplicates are far closer than a typical 10th neighbour, so the search runs with a smaller
nprobe / efSearch than the one tuned for recall@10 (bench/index.py measures what that misses).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa

from ..errors import IndexDamaged, IndexRefused
from ..names import plain_name
from ..output.store import parquet_bytes, write_atomic
from ..output.table import CLIP_COLUMNS, open_table
from ..redact import redact_strings, redact_text
from . import generations as store
from .batches import batches, choose_column, gather
from .build import build_index
from .checks import number, whole
from .options import KINDS
from .search import open_index

DEDUP_K = 16  # neighbours looked at per row: a group larger than this still connects through its members
DEDUP_NPROBE, DEDUP_EF = 16, 64
DEDUP_K_MAX, SEARCH_MAX = 1024, 1 << 16
GROUP_COLUMNS = ("group", "sample_id", "uri", "label", "split", "score")


def find_duplicates(uri: str, storage_options: Optional[Dict[str, Any]] = None, column: Optional[str] = None,
                    threshold: float = 0.95, *, k: int = DEDUP_K, search: Optional[Dict[str, int]] = None,
                    center: Optional[bool] = None) -> pa.Table:
    """Groups of rows whose pairwise score passes `threshold` (cosine: similarity >= threshold; l2:
    distance <= threshold), connected transitively. Builds or updates the index first. Columns:
    group (0.., largest first), sample_id, uri, label, split, score (float32: to the group's first
    member, 1.0 for it; cosine similarity or L2 distance), sorted by group, then closest first.
    `center` (build_index's): None keeps what the table's index has (none: not centred)."""
    k, search = whole(k, "k", 1, DEDUP_K_MAX), _check_search(search)
    if center is not None and not isinstance(center, bool):
        raise IndexRefused(f"center: {center!r} is not True, False or None")
    table = open_table(uri, storage_options, key="OUT")
    column, _ = choose_column(table, column)
    try:
        old = store.read_meta(table.fs, table.root, column, uri)
    except IndexDamaged:  # build_index rebuilds it, saying why
        old = None
    metric = old["metric"] if old else "cosine"
    if not number(threshold) or (metric == "cosine" and not -1.0 <= threshold <= 1.0):
        raise IndexRefused(f"--threshold {threshold!r}: a cosine similarity, between -1 and 1 (e.g. 0.95)")
    if metric == "l2" and threshold < 0:
        raise IndexRefused(f"--threshold {threshold!r}: an L2 distance, at least 0")
    center = bool(old and old.get("center")) if center is None else center
    # an index of another table (its lineage) or a damaged one is rebuilt here: the groups are this table's
    built = build_index(uri, storage_options, column, kind=old["kind"] if old and old.get("kind") in KINDS else "auto",
                        metric=metric, center=center)
    idx = open_index(uri, storage_options, column)
    _set_search(idx, search)
    files = [f["path"] for f in idx.meta["files"]]
    parent = _Components()
    start = 0
    for x, _ in batches(idx.table, files, column, metric, center=idx.center):
        scores, found = idx.index.search(x, min(k, idx.index.ntotal))
        own = np.arange(start, start + len(x))[:, None]
        close = (scores >= threshold) if metric == "cosine" else (np.sqrt(np.maximum(scores, 0)) <= threshold)
        close &= (found >= 0) & (found != own)
        a, b = np.nonzero(close)
        parent.union(own[a, 0], found[a, b])
        start += len(x)
    groups = _groups(idx, files, parent.groups())
    made = redact_strings({"lineage": idx.meta.get("lineage"), "index_generation": idx.meta["generation"],
                           "threshold": threshold, "metric": metric, "center": center, "column": column,
                           "metadata": idx.table.metadata(),  # what made the table: the page says it
                           "index": {"action": built["action"], "reason": built["reason"]}})
    return groups.replace_schema_metadata({b"featurize.duplicates": json.dumps(made, allow_nan=False).encode()})


def _check_search(search: Optional[Dict[str, int]]) -> Optional[Dict[str, int]]:
    """search={"nprobe": N} or {"efSearch": N}, N a whole number from 1 (None: dedup's own)."""
    if search is None:
        return None
    if not isinstance(search, dict) or not all(name in ("nprobe", "efSearch") for name in search):
        raise IndexRefused(f"search: {search!r}: expected {{'nprobe': N}} or {{'efSearch': N}}")
    return {name: whole(value, name, 1, SEARCH_MAX) for name, value in search.items()}


def _set_search(idx, search: Optional[Dict[str, int]]) -> None:
    import faiss

    stated = idx.meta.get("search") or {}
    if search is None and stated:
        name, value = next(iter(stated.items()))
        search = {name: min(int(value), DEDUP_NPROBE if name == "nprobe" else max(DEDUP_EF, DEDUP_K))}
    for name, value in (search or {}).items():
        faiss.ParameterSpace().set_index_parameter(idx.index, name, int(value))


class _Components:
    """Union-find over row positions (only those in some pair)."""

    def __init__(self):
        self.up: Dict[int, int] = {}

    def find(self, i: int) -> int:
        up = self.up
        while up.setdefault(i, i) != i:
            up[i] = up[up[i]]  # path halving
            i = up[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist()):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self.up[max(ri, rj)] = min(ri, rj)

    def groups(self) -> list:
        """Lists of positions, each sorted; largest group first, then by first position."""
        out: Dict[int, list] = {}
        for i in self.up:
            out.setdefault(self.find(i), []).append(i)
        return sorted((sorted(g) for g in out.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def _groups(idx, files, groups) -> pa.Table:
    members = np.array(sorted(p for g in groups for p in g), dtype=np.int64)
    vecs = gather(idx.table, files, idx.column, idx.metric, members, idx.center) if len(members) else None
    extra = [c for c in CLIP_COLUMNS if c in idx.rows.column_names]
    order, group_ids, scores = [], [], []
    for gid, g in enumerate(groups):
        v = vecs[np.searchsorted(members, g)]
        s = v @ v[0] if idx.metric == "cosine" else np.linalg.norm(v - v[0], axis=1)
        s[0] = 1.0 if idx.metric == "cosine" else 0.0
        rank = np.argsort(-s if idx.metric == "cosine" else s, kind="stable")
        rank = np.concatenate([[0], rank[rank != 0]])  # the first member stays first
        order.extend(np.asarray(g)[rank].tolist())
        group_ids.extend([gid] * len(g))
        scores.extend(s[rank].tolist())
    rows = idx.rows.take(pa.array(order, pa.int64()))
    cols = {"group": pa.array(group_ids, pa.int64())}
    for c in ("sample_id", "uri", "label", "split", *extra):
        cols[c] = rows.column(c) if c in rows.column_names else pa.array([""] * len(order))
    cols["score"] = pa.array(scores, pa.float32())
    return pa.table({c: cols[c] for c in (*GROUP_COLUMNS, *extra)})


def write_groups(uri: str, storage_options: Optional[Dict[str, Any]], column: str, groups: pa.Table,
                 out: Optional[str] = None) -> str:
    """Write the groups table (default OUT/_duplicates/<column>.parquet); returns where, redacted."""
    from ..output.store import filesystem

    if out is None:
        table = open_table(uri, storage_options, key="OUT")
        name = plain_name(column, "column (the duplicates file is named after it)")
        fs, path = table.fs, f"{table.root}/_duplicates/{name}.parquet"
        shown = f"{uri.rstrip('/')}/_duplicates/{column}.parquet"
    else:
        fs, path = filesystem(out, storage_options or {})
        shown = out
    write_atomic(fs, path, parquet_bytes(groups))
    return redact_text(shown)
