"""Open a table's index and answer nearest-neighbour queries with hit dicts.

A hit: {"rank", "sample_id", "score", "label", "uri", "split"} (+ "start_s", "end_s" for clip rows).
Score: cosine similarity (higher is closer) for metric cosine, L2 distance (lower is closer) for l2.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import faiss
import numpy as np

from ..errors import IndexRefused
from ..output.provenance import Provenance, describe
from ..output.table import FeatureTable, open_table
from ..redact import redact_text
from . import generations as store
from .batches import CLIP_COLUMNS, batches, choose_column, file_rows, prepare, relative
from .checks import lineage_change, whole


class Index:
    """A loaded index: `.search(vectors, k)`, `.vector(sample_id)`, `.meta`, and `.pending` (rows the
    table has that the index does not yet) with `.note` saying so (None when up to date)."""

    def __init__(self, table: FeatureTable, meta: Dict[str, Any], index, rows, uri: str):
        self.table, self.meta, self.index, self.rows = table, meta, index, rows
        self.column, self.metric = meta["column"], meta["metric"]
        out = redact_text(uri)
        changed = lineage_change(meta.get("lineage"), table.lineage())
        if changed:  # its hits would be rows of another model's vectors, stated as this table's
            raise IndexRefused(f"the index was built from another table than {out} holds now ({changed}): "
                               f"run featurize index {out}")
        self.center = np.asarray(meta["center"], np.float32) if meta.get("center") else None  # --center
        self._ids = rows.column("sample_id").to_numpy(zero_copy_only=False)
        if meta.get("search"):
            (name, value), = meta["search"].items()
            faiss.ParameterSpace().set_index_parameter(index, name, int(value))
        sizes = {relative(table, f): table.sizes.get(f, -1) for f in table.files}
        known = {f["path"] for f in meta["files"]}
        self.removed = sum(f["path"] not in sizes or f.get("bytes") not in (None, sizes[f["path"]])
                           for f in meta["files"])
        self.pending = sum(file_rows(table, [f for f in sizes if f not in known]))
        self.note = None
        if self.removed:
            self.note = (f"note: {self.removed} indexed files are no longer in the table as indexed (an --overwrite "
                         f"run); run featurize index {out} to rebuild")
        elif self.pending:
            self.note = f"note: {self.pending} rows are not indexed yet; run featurize index {out} to add them"

    def search(self, vectors: np.ndarray, k: int = 10) -> List[List[Dict[str, Any]]]:
        """The k nearest rows of each query vector (n, D), nearest first."""
        k = whole(k, "k", 1)
        try:
            x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        except (TypeError, ValueError):
            raise IndexRefused("a query is not an array of numbers") from None
        if x.ndim != 2 or x.shape[1] != self.meta["dim"]:
            raise IndexRefused(f"a query of shape {x.shape} against an index of dimension {self.meta['dim']}")
        if not np.isfinite(x).all():
            raise IndexRefused("a query vector holds inf or NaN: no distance to it is defined")
        x = prepare(x, self.metric, self.center)
        scores, found = self.index.search(x, min(k, self.index.ntotal))
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))  # faiss answers squared distances
        return [self._hits(s, f) for s, f in zip(scores, found)]

    def _hits(self, scores: np.ndarray, found: np.ndarray) -> List[Dict[str, Any]]:
        keep = found >= 0
        rows = self.rows.take(found[keep]).to_pylist()
        return [{"rank": r + 1, "sample_id": row["sample_id"], "score": float(s), "label": str(row.get("label", "")),
                 "uri": row.get("uri", ""), "split": str(row.get("split", "")),
                 **{c: row[c] for c in CLIP_COLUMNS if c in row}}
                for r, (s, row) in enumerate(zip(scores[keep], rows))]

    def position(self, sample_id: str) -> int:
        """The index row of a sample id; for a video with several clip rows, its first clip, or
        the clip starting at S seconds when written `ID#S`."""
        where = np.flatnonzero(self._ids == sample_id)
        if not len(where) and "#" in sample_id and "start_s" in self.rows.column_names:
            base, _, start = sample_id.rpartition("#")
            try:
                wanted = float(start)
            except ValueError:
                wanted = None
            if wanted is not None:
                starts = self.rows.column("start_s").to_numpy(zero_copy_only=False)
                where = np.flatnonzero((self._ids == base) & np.isclose(starts, wanted, atol=1e-3))
        if not len(where):
            more = f"; {self.pending} rows are not indexed yet: run featurize index first" if self.pending else ""
            raise IndexRefused(f"--id {sample_id!r}: no such sample_id in the index of {self.column!r}{more}")
        return int(where[0])

    def vector(self, sample_id: str) -> np.ndarray:
        """The sample's stored vector (D,) float32, read from its table file (as stored, not normalised)."""
        pos = self.position(sample_id)
        current = set(relative(self.table, f) for f in self.table.files)
        for f in self.meta["files"]:
            if pos < f["rows"]:
                if f["path"] not in current:
                    break
                for x, _ in batches(self.table, [f["path"]], self.column, "raw"):  # indexed rows only
                    if pos < len(x):
                        return x[pos]
                    pos -= len(x)
                break
            pos -= f["rows"]
        raise IndexRefused(f"--id {sample_id!r}: its file is no longer in the table; run featurize index first")

    def provenance(self) -> Provenance:
        """What made the table (model, weights, layer; an apply output's head and source) and how it
        is searched (metric, centring), as the pages and the CLI say it."""
        return describe(self.table.metadata(), metric=self.metric, center=self.center is not None)

    def row(self, sample_id: str) -> Dict[str, Any]:
        return self.rows.slice(self.position(sample_id), 1).to_pylist()[0]


def query(index: Index, uri: str, storage_options: Optional[Dict[str, Any]] = None, *,
          sample_id: Optional[str] = None, image: Optional[str] = None, video: Optional[str] = None,
          text: Optional[str] = None, k: int = 10) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(the query as pages show it, its k nearest hits): exactly one of a sample id of the table, an
    image or video file (embedded with the table's own model) or a text (open_clip tables)."""
    if sum(q is not None for q in (sample_id, image, video, text)) != 1:
        raise IndexRefused("a search takes exactly one query: an id, an image, a video or a text")
    k = whole(k, "k", 1)
    if sample_id is not None:
        vector = index.vector(sample_id)
        asked = {"kind": "id", "value": sample_id, "uri": index.row(sample_id).get("uri")}
    else:
        from .query import query_vector  # imports the model stack: only for file and text queries

        vector, asked = query_vector(uri, storage_options, index.column, image=image, video=video, text=text)
    return asked, index.search(vector[None, :], k)[0]


def open_index(uri: str, storage_options: Optional[Dict[str, Any]] = None, column: Optional[str] = None) -> Index:
    """The index of `column` (default: as `featurize index` picks it) of the table under OUT `uri`."""
    table = open_table(uri, storage_options, key="OUT")
    column, _ = choose_column(table, column)
    loaded = store.load(table.fs, table.root, column, uri)
    if loaded is None:
        raise IndexRefused(f"OUT: {redact_text(uri)} has no index of {column!r}; run featurize index "
                           f"{redact_text(uri)} first")
    return Index(table, *loaded, uri=uri)

