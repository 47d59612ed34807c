"""Open a table's index and answer nearest-neighbour queries with hit dicts.

A hit: {"rank", "sample_id", "score", "label", "uri", "split"} (+ "start_s", "end_s" for clip rows).
Score: cosine similarity (higher is closer) for metric cosine, L2 distance (lower is closer) for l2.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import faiss
import numpy as np
import pyarrow.compute as pc

from ..errors import IndexRefused
from ..output.provenance import Provenance, describe
from ..output.table import CLIP_COLUMNS, FeatureTable, open_table
from ..redact import redact_text
from . import generations as store
from .batches import batches, choose_column, file_rows, prepare, relative
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
        """The index row of a sample id. An id no row has may name a video's clip (a windowed video's
        rows are `VIDEO#w<k>`): `VIDEO` is its first clip, `VIDEO#S` the clip starting at S seconds."""
        where = np.flatnonzero(self._ids == sample_id)
        if len(where):
            return int(where[0])
        clip = self._clip(sample_id) if "start_s" in self.rows.column_names else None
        if clip is None:
            more = f"; {self.pending} rows are not indexed yet: run featurize index first" if self.pending else ""
            raise IndexRefused(f"--id {sample_id!r}: no such sample_id in the index of {self.column!r}{more}")
        return clip

    def _clip(self, sample_id: str) -> Optional[int]:
        """The row `VIDEO` or `VIDEO#S` names, None when it names no video; a start no clip of the
        video has is refused, naming the nearest."""
        clips = self._clips_of(sample_id)
        if len(clips):
            return int(clips[np.argmin(self._starts[clips])])
        video, _, start = sample_id.rpartition("#")
        at = float(start) if re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", start) else None
        clips = self._clips_of(video) if video and at is not None else clips
        if not len(clips):
            return None
        starts = self._starts[clips]
        found = np.flatnonzero(np.abs(starts - at) < 5e-4)
        if len(found):
            return int(clips[found[0]])
        nearest = sorted(np.argsort(np.abs(starts - at), kind="stable")[:3], key=lambda i: starts[i])
        named = ", ".join(f"{starts[i]:g} s ({self._ids[clips[i]]})" for i in nearest)
        raise IndexRefused(f"--id {sample_id!r}: no clip of {video!r} starts at {at:g} s; its nearest clips "
                           f"start at {named}")

    def _clips_of(self, video: str) -> np.ndarray:
        """Rows of the video's clips: itself (one clip) or its windows `VIDEO#w<k>`, in index order."""
        prefixed = pc.starts_with(self.rows.column("sample_id"), pattern=video).to_numpy(zero_copy_only=False)
        return np.array([i for i in np.flatnonzero(prefixed)
                         if re.fullmatch(r"(#w[0-9]+)?", self._ids[i][len(video):])], np.int64)

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return self.rows.column("start_s").to_numpy(zero_copy_only=False)

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
        row = index.row(sample_id)  # the real id of what `sample_id` names (VIDEO#S: a clip)
        vector = index.vector(row["sample_id"])
        asked = {"kind": "id", "value": row["sample_id"], "uri": row.get("uri"),
                 **({"asked": sample_id} if sample_id != row["sample_id"] else {})}
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

