"""A features table as the index reads it: which vector column, its files in a fixed order, and its
rows streamed as float32 batches (bounded memory: one Parquet batch at a time)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import IndexRefused
from ..output.table import FeatureTable
from ..output.tensors import SEQUENCE, VECTOR, vectors

BATCH_ROWS = 16384


def choose_column(table: FeatureTable, column: Optional[str] = None) -> Tuple[str, int]:
    """(column, D): `column`, else `feature`, else the table's first vector column (clip_<head>)."""
    column, kind = table.choose(column, "--column", IndexRefused, "to index")
    if kind == SEQUENCE:
        vec = [c for c, k in table.feature_columns().items() if k == VECTOR]
        raise IndexRefused(f"--column: {column!r} is a sequence of frame vectors, not one vector per row; "
                          f"index a vector column ({', '.join(vec) or 'none in this table'})")
    return column, table.shape(column, "--column")[1]


def relative(table: FeatureTable, path: str) -> str:
    return path[len(table.root) + 1:] if path.startswith(table.root + "/") else path


def file_rows(table: FeatureTable, rel_files: Sequence[str]) -> List[int]:
    """Row count of each file, from its Parquet footer."""
    return [pq.read_metadata(f"{table.root}/{f}", filesystem=table.fs).num_rows for f in rel_files]


def batches(table: FeatureTable, rel_files: Sequence[str], column: str, metric: str,
            extra: Sequence[str] = (), batch_rows: int = BATCH_ROWS, center: Optional[np.ndarray] = None,
            skipped: Optional[Dict[str, int]] = None) -> Iterator[Tuple[np.ndarray, pa.RecordBatch]]:
    """(float32 (n, D) vectors, the batch's `extra` columns), file after file in the given order;
    `center` subtracted when given, then unit length for cosine. Rows without a finite vector (null,
    a null value, inf or NaN) are left out of both, so positions count indexed rows only; `skipped`
    gets how many per file."""
    for rel in rel_files:
        with table.fs.open(f"{table.root}/{rel}", "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=[column, *extra]):
                x = vectors(batch.column(column), missing="nan")
                keep = np.isfinite(x).all(axis=1)
                rows = batch.select(list(extra))
                if not keep.all():
                    x, rows = x[keep], rows.filter(pa.array(keep))
                    if skipped is not None:
                        skipped[rel] = skipped.get(rel, 0) + int((~keep).sum())
                yield prepare(x, metric, center), rows


def prepare(x: np.ndarray, metric: str, center: Optional[np.ndarray] = None) -> np.ndarray:
    """Vectors as the index holds them: minus `center` (the table's mean, `--center`), unit length
    for cosine. A new array: the caller's stays as it was."""
    x = np.array(x, dtype=np.float32, order="C")
    if center is not None:
        x -= center
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def gather(table: FeatureTable, rel_files: Sequence[str], column: str, metric: str,
           positions: np.ndarray, center: Optional[np.ndarray] = None) -> np.ndarray:
    """The vectors at sorted global `positions` (over the indexed rows of rel_files in order), in one
    streaming pass; positions past the last indexed row are left out (rows skipped as not finite)."""
    out = np.empty((len(positions), table.shape(column)[1]), dtype=np.float32)
    start, taken = 0, 0
    for x, _ in batches(table, rel_files, column, metric, center=center):
        lo, hi = np.searchsorted(positions, [start, start + len(x)])
        out[taken:taken + hi - lo] = x[positions[lo:hi] - start]
        taken += hi - lo
        start += len(x)
    return out[:taken]
