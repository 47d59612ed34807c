"""Build (or bring up to date) a faiss index over a features table, streaming its Parquet files.

Memory stays bounded by the index itself: an approximate index trains on a sample of rows, then
every file is read once, batch by batch, and added. `auto` is exact search (flat) up to FLAT_MAX
rows and IVF (fp16 scalar quantizer: the table's own float16 precision) above; an approximate
index's recall@10 is measured at build time against exact search, on a sample of the table's own
rows, and its search parameter (nprobe, efSearch) is the smallest that reaches RECALL_TARGET.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

import faiss
import numpy as np
import pyarrow as pa

from ..errors import IndexDamaged, IndexRefused
from ..output.table import FeatureTable, open_table
from ..redact import redact_strings, redact_text
from . import generations as store
from .batches import batches, choose_column, file_rows, gather, relative
from .checks import check_options, lineage_change

FLAT_MAX = 100_000  # exact search over 100k rows at D=512: ~4 ms a query in batches (bench/README.md)
RECALL_TARGET, RECALL_K, RECALL_QUERIES = 0.95, 10, 1000
CENTER_SAMPLE = 50_000  # rows whose mean is the table's centre (--center)
HNSW_M = 32


def build_index(uri: str, storage_options: Optional[Dict[str, Any]] = None, column: Optional[str] = None,
                kind: str = "auto", metric: str = "cosine", *, center: bool = False, nlist: Optional[int] = None,
                hnsw_m: int = HNSW_M, rebuild: bool = False) -> Dict[str, Any]:
    """Index `column` of the table under OUT `uri`; returns the published meta plus `action` (built,
    rebuilt, added or unchanged), `reason` and `added_rows`. Re-running adds only new files' rows;
    a table whose indexed files were removed or replaced, or that another model made (its lineage),
    is indexed again from scratch, as is a damaged index, or any with `rebuild`. Rows without a
    finite vector (null, inf, NaN) are left out and counted (meta `skipped`).

    `center`: cosine between vectors minus the table's mean (over a sample of its rows). Features of
    one backbone share a large common component (every ReLU output is positive), which squeezes all
    cosines towards 1; without it, distinct images can score 0.99 (random weights) or 0.8 (trained)."""
    check_options(kind=kind, metric=metric, center=center, nlist=nlist, hnsw_m=hnsw_m, rebuild=rebuild, column=column)
    t0 = time.time()
    table = open_table(uri, storage_options, key="OUT")
    column, dim = choose_column(table, column)
    files = [relative(table, f) for f in table.files]
    sizes = {relative(table, f): table.sizes.get(f, -1) for f in table.files}
    lineage = table.lineage()
    try:
        loaded = store.load(table.fs, table.root, column, uri)
        damaged = None
    except IndexDamaged as e:
        loaded, damaged = None, f"the index was damaged: {e.reason}"
    old = loaded[0] if loaded else None
    known = {f["path"] for f in old["files"]} if old else set()
    new = [f for f in files if f not in known]
    counts = file_rows(table, new)
    reason = damaged or ("--rebuild asked" if rebuild and old else None) or \
        _rebuild_reason(old, files, kind, metric, dim, sum(counts), center, sizes, lineage)
    if old and reason is None:
        if not new:
            return {**old, "action": "unchanged", "reason": "no new files", "added_rows": 0}
        _check_nlist(nlist, old["rows"] + sum(counts))
        meta, index, rows = _add(table, column, loaded, new, counts, sizes)
        meta = {**meta, "lineage": lineage, "update_s": round(time.time() - t0, 2)}
        meta = store.save(table.fs, table.root, column, meta, index, rows)
        return {**meta, "action": "added", "reason": f"{len(new)} new files", "added_rows": meta["rows"] - old["rows"]}
    if old or damaged:
        counts = file_rows(table, files)
    if sum(counts) == 0:
        raise IndexRefused(f"OUT: {redact_text(uri)}: the features table has no rows; nothing to index")
    _check_nlist(nlist, sum(counts))
    meta, index, rows = _build(table, column, dim, files, counts, kind, metric, nlist, hnsw_m, center, sizes)
    meta = {**meta, "table": _provenance(table), "lineage": lineage, "uri": redact_text(uri),
            "build_s": round(time.time() - t0, 2)}
    meta = store.save(table.fs, table.root, column, meta, index, rows)
    return {**meta, "action": "rebuilt" if old or damaged else "built", "reason": reason or "no index yet",
            "added_rows": meta["rows"]}


def _check_nlist(nlist: Optional[int], rows: int) -> None:
    if nlist is not None and nlist > rows:
        raise IndexRefused(f"nlist: {nlist} lists for {rows} rows; at most one list per row (about 2 sqrt(rows) "
                           "is usual; leave it out to have it chosen)")


def _rebuild_reason(old: Optional[Dict[str, Any]], files: List[str], kind: str, metric: str, dim: int,
                    added: int, center: bool = False, sizes: Optional[Dict[str, int]] = None,
                    lineage: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why an existing index cannot just be extended (None: it can)."""
    if old is None:
        return None
    changed = lineage_change(old.get("lineage"), lineage) if lineage is not None else None
    if changed:
        return changed
    sizes = sizes if sizes is not None else {f: -1 for f in files}
    if any(f["path"] not in sizes or f.get("bytes") not in (None, sizes[f["path"]]) for f in old["files"]):
        return "indexed files were removed or replaced (an --overwrite run)"
    if old["metric"] != metric or old["dim"] != dim:
        return f"metric or dimension changed ({old['metric']}, {old['dim']} -> {metric}, {dim})"
    if bool(old.get("center")) != center:
        return f"--center {'asked' if center else 'not asked'} (the index was built {'without' if center else 'with'})"
    if kind not in ("auto", old["kind"]):
        return f"kind changed ({old['kind']} -> {kind})"
    if kind == "auto" and old["kind"] == "flat" and old["rows"] + added > FLAT_MAX:
        return f"the table grew past {FLAT_MAX} rows: an approximate index replaces exact search"
    return None


def _add(table: FeatureTable, column: str, loaded, new: List[str], counts: List[int], sizes: Dict[str, int]):
    """The loaded index with the new files' rows added (an approximate index keeps its training)."""
    meta, index, rows = loaded
    parts, skipped = [rows], {}
    center = np.asarray(meta["center"], np.float32) if meta.get("center") else None
    for x, extra in batches(table, new, column, meta["metric"], table.row_columns(), center=center, skipped=skipped):
        index.add(x)
        parts.append(pa.Table.from_batches([extra]))
    rows = pa.concat_tables(parts, promote_options="default")
    files = meta["files"] + _files(new, counts, skipped, sizes)
    return {**meta, "rows": index.ntotal, "files": files, "skipped": meta.get("skipped", 0) + sum(skipped.values()),
            "updated_at": _now()}, index, rows


def _files(files: List[str], counts: List[int], skipped: Dict[str, int], sizes: Dict[str, int]) -> List[Dict]:
    """meta.json's files: each one's indexed rows (its rows less those skipped) and its bytes."""
    return [{"path": f, "rows": c - skipped.get(f, 0), "bytes": sizes.get(f, -1)} for f, c in zip(files, counts)]


def _build(table: FeatureTable, column: str, dim: int, files: List[str], counts: List[int], kind: str,
           metric: str, nlist: Optional[int], hnsw_m: int, center: bool = False,
           sizes: Optional[Dict[str, int]] = None) -> Tuple[Dict[str, Any], Any, pa.Table]:
    n = sum(counts)
    kind = "flat" if kind == "auto" and n <= FLAT_MAX else ("ivf" if kind == "auto" else kind)
    index, params = _empty(kind, dim, metric, n, nlist, hnsw_m)
    mean = _mean(table, files, column, n) if center else None
    probe = _Probe(table, files, column, metric, n, index, params, mean) if kind != "flat" else None
    parts, start, skipped = [], 0, {}
    for x, extra in batches(table, files, column, metric, table.row_columns(), center=mean, skipped=skipped):
        index.add(x)
        if probe and len(x):
            probe.truth(x, start)
        parts.append(pa.Table.from_batches([extra]))
        start += len(x)
    if index.ntotal == 0:
        raise IndexRefused(f"--column {column}: none of its {n} rows has a finite vector (null, inf or NaN); "
                           "nothing to index")
    recall, search = probe.tune(kind) if probe else (None, {})
    meta = {"format": 1, "kind": kind, "metric": metric, "column": column, "dim": dim, "rows": index.ntotal,
            "files": _files(files, counts, skipped, sizes or {}), "params": params, "skipped": sum(skipped.values()),
            "search": search, "recall": recall, "exact": kind == "flat", "built_at": _now(),
            "center": mean.tolist() if mean is not None else None}
    return meta, index, pa.concat_tables(parts, promote_options="default")


def _mean(table: FeatureTable, files: List[str], column: str, n: int) -> np.ndarray:
    """The mean vector of up to CENTER_SAMPLE rows drawn evenly at random (one streaming pass), over
    rows with finite vectors only (an infinity would make every centred vector NaN)."""
    positions = np.sort(np.random.default_rng(1).choice(n, min(n, CENTER_SAMPLE), replace=False))
    sample = gather(table, files, column, "raw", positions)
    if not len(sample):
        raise IndexRefused(f"--center: no row of {column} has a finite vector (null, inf or NaN)")
    return sample.astype(np.float64).mean(axis=0).astype(np.float32)


def _empty(kind: str, dim: int, metric: str, n: int, nlist: Optional[int], hnsw_m: int):
    m = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlat(dim, m), {}
    if kind == "ivf":
        # ~2 sqrt(N) lists, each trained on >= 39 points (faiss's minimum)
        lists = nlist or max(1, min(int(2 * math.sqrt(n)), n // 39))
        return faiss.index_factory(dim, f"IVF{lists},SQfp16", m), {"nlist": lists}
    return faiss.index_factory(dim, f"HNSW{hnsw_m},SQfp16", m), {"M": hnsw_m}


class _Probe:
    """Trains an approximate index on a sample, accumulates exact top-k of RECALL_QUERIES sampled
    rows while the table streams by, then picks the search parameter that reaches the target."""

    def __init__(self, table, files, column, metric, n, index, params, center=None):
        rng = np.random.default_rng(0)
        size = min(n, max(RECALL_QUERIES, 64 * params.get("nlist", 0)))  # faiss uses <= 256 per list
        positions = np.sort(rng.choice(n, size, replace=False))
        sample = gather(table, files, column, metric, positions, center)
        positions = positions[:len(sample)]  # rows skipped as not finite leave the last positions out
        size = len(sample)
        if size < max(1, params.get("nlist", 1)):
            raise IndexRefused(f"nlist: {params.get('nlist', 1)} lists, but only {size} sampled rows have finite "
                               "vectors to train them")
        if not index.is_trained:
            index.train(sample)
        pick = np.sort(rng.choice(size, min(RECALL_QUERIES, size), replace=False))
        self.queries, self.positions, self.index = sample[pick], positions[pick], index
        self.metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self.heap = faiss.ResultHeap(len(pick), RECALL_K + 1, keep_max=metric == "cosine")

    def truth(self, x: np.ndarray, start: int) -> None:
        d, i = faiss.knn(self.queries, x, min(RECALL_K + 1, len(x)), metric=self.metric)
        self.heap.add_result(d, i + start)

    def tune(self, kind: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
        self.heap.finalize()
        name = "nprobe" if kind == "ivf" else "efSearch"
        top = self.index.nlist if kind == "ivf" else 4096
        grid = sorted({v for p in range(13) for v in (2 ** p, 3 * 2 ** p // 2) if v <= top} | {top})
        if kind == "hnsw":
            grid = [v for v in grid if v >= 16]
        # recall grows with the parameter: double it until the target is met, then try the 1.5x step below
        space, tried = faiss.ParameterSpace(), {}

        def reaches(i: int) -> bool:
            space.set_index_parameter(self.index, name, grid[i])
            tried[i] = self.recall()
            return tried[i] >= RECALL_TARGET

        lo, hi = -1, 0
        while hi < len(grid) - 1 and not reaches(hi):
            lo, hi = hi, min(hi + 2, len(grid) - 1)  # two grid steps per doubling
        if hi not in tried:
            reaches(hi)
        while hi - lo > 1 and tried[hi] >= RECALL_TARGET:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
        value, recall = grid[hi], tried[hi]
        space.set_index_parameter(self.index, name, value)
        return ({"at": RECALL_K, "value": round(recall, 4), "queries": len(self.queries), "target": RECALL_TARGET,
                 "rows": self.index.ntotal, "against": "exact search, queries are the table's own rows "
                 "(each query's own row left out)"}, {name: value})

    def recall(self) -> float:
        _, found = self.index.search(self.queries, RECALL_K + 1)
        hits = 0
        total = 0
        for own, truth, got in zip(self.positions, self.heap.I, found):
            truth = [j for j in truth if j != own and j >= 0][:RECALL_K]
            got = [j for j in got if j != own and j >= 0][:RECALL_K]
            hits += len(set(got).intersection(truth))
            total += len(truth)
        return hits / max(total, 1)


def _provenance(table: FeatureTable) -> Dict[str, Any]:
    return redact_strings({"uri": redact_text(table.uri), "job": table.record.get("name"),
                           "status": table.record.get("status"), "metadata": table.metadata()})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
