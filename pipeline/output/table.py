"""A `featurize run` output root read as a training table: its files, columns, labels and provenance.

Reads the output contract only: OUT/features/**.parquet (every file holds the exact `split` and
`label` strings), OUT/_job.json and the files' `featurize.*` metadata.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import TableError
from ..redact import redact_strings, redact_text
from .store import filesystem, parquet_sizes
from .tensors import SEQUENCE, VECTOR, ColumnError, column_shape, default_vector

ROW_COLUMNS = ("sample_id", "uri", "label", "split")  # every features table's
CLIP_COLUMNS = ("start_s", "end_s")  # the clip rows of video tables (a window's bounds)


@dataclass
class FeatureTable:
    uri: str
    fs: Any
    root: str
    files: List[str]
    schema: pa.Schema
    record: Dict[str, Any] = field(default_factory=dict)  # _job.json, {} if none
    sizes: Dict[str, int] = field(default_factory=dict)  # bytes of each file, from the listing

    def dataset(self) -> pads.Dataset:
        """The features files; no hive partitioning: the exact split and label are in every file."""
        return pads.dataset(self.files, filesystem=self.fs, format="parquet")

    def shape(self, column: str, key: str = "data.column") -> Tuple[str, int]:
        """(VECTOR or SEQUENCE, D) of a feature column, or a refusal naming it."""
        if column not in self.schema.names:
            raise TableError(f"{key}: {self.uri} has no column {column!r} "
                             f"(feature columns: {', '.join(self.feature_columns()) or 'none'})")
        try:
            return column_shape(column, self.schema.field(column).type)
        except ColumnError as e:
            raise TableError(f"{key}: {e}") from None

    def feature_columns(self) -> Dict[str, str]:
        """column -> VECTOR or SEQUENCE, for every feature column, in the table's order."""
        out = {}
        for f in self.schema:
            try:
                out[f.name] = column_shape(f.name, f.type)[0]
            except ColumnError:
                continue
        return out

    def choose(self, column: Optional[str], key: str, error=TableError, what: str = "to read") -> Tuple[str, str]:
        """(column, VECTOR or SEQUENCE): `column`, else the vector column a table is read by when none
        is named (default_vector: the rule of index, search, dedup, the report and the API); a
        refusal (`error`, `what` the reader does) that names the feature columns there are."""
        kinds = self.feature_columns()
        named = ", ".join(f"{c} ({k})" for c, k in kinds.items()) or "none"
        where = redact_text(self.uri)
        if column is None:
            found = [c for c, k in kinds.items() if k == VECTOR]
            if not found:
                raise error(f"{where} has no vector column {what} (feature columns: {named})")
            column = default_vector(found)
        if column not in kinds:
            raise error(f"{key}: {where} has no feature column {column!r} (feature columns: {named})")
        return column, kinds[column]

    def row_columns(self) -> List[str]:
        """The columns that say which row is which (ROW_COLUMNS, and a video table's CLIP_COLUMNS)."""
        return [c for c in (*ROW_COLUMNS, *CLIP_COLUMNS) if c in self.schema.names]

    def labels(self, label: str = "label", key: str = "data.label") -> Dict[str, Counter]:
        """split -> Counter of labels, read from the two string columns only."""
        for name in ("split", label):
            if name not in self.schema.names:
                raise TableError(f"{key}: {self.uri} has no column {name!r}")
        t = self.dataset().to_table(columns=["split", label])
        counts = t.group_by(["split", label]).aggregate([([], "count_all")])
        out: Dict[str, Counter] = {}
        for split, value, n in zip(*(counts[c].to_pylist() for c in ("split", label, "count_all"))):
            out.setdefault(split, Counter())[str(value)] += n
        return out

    def frames(self, column: str) -> int:
        """The longest clip of a frame_features column: the extraction's num_frames when sampling
        was uniform (every clip has exactly that many), else a scan of the list lengths."""
        video = self.record.get("settings", {})
        if video.get("video.sampling") == "uniform" and video.get("video.num_frames"):
            return int(video["video.num_frames"])
        longest = 0
        for batch in self.dataset().to_batches(columns=[column]):
            if len(batch):
                longest = max(longest, pc.max(pc.list_value_length(batch.column(0))).as_py() or 0)
        return longest

    def metadata(self) -> Dict[str, str]:
        """The `featurize.*` provenance of the first file (every file of a run has the same)."""
        return featurize_metadata(pq.read_schema(self.files[0], filesystem=self.fs))

    def provenance(self) -> Dict[str, Any]:
        """What a head trained on (or applied to) this table records of it; no credentials."""
        return redact_strings({"uri": redact_text(self.uri), "job": self.record.get("name"),
                               "status": self.record.get("status"), "rows": self.rows(),
                               "metadata": self.metadata()})

    def lineage(self) -> Dict[str, Any]:
        """What the table's content is, for what is derived from it (an index, a head, a list of
        duplicates) to tell a changed table from the one it was made of: the model, weights, layer
        and preprocessing of its provenance, and a digest of its files' names and sizes (a run that
        adds, removes or rewrites files changes it; an --overwrite with another model changes both)."""
        meta = self.metadata()
        keep = ("model", "model_family", "weights_id", "weights_sha256", "layer", "pool", "preprocess", "dim",
                "dtype", "video_sampling", "temporal", "kind", "columns", "head")
        files = hashlib.sha256()
        for path in self.files:
            files.update(f"{path[len(self.root):]}\0{self.sizes.get(path, -1)}\n".encode())
        return {"provenance": {k: meta[f"featurize.{k}"] for k in keep if f"featurize.{k}" in meta},
                "files": len(self.files), "digest": files.hexdigest()[:32]}

    def rows(self) -> int:
        return sum(pq.read_metadata(f, filesystem=self.fs).num_rows for f in self.files)


def featurize_metadata(schema: pa.Schema) -> Dict[str, str]:
    """A features file's `featurize.*` key-value metadata (its provenance), as strings."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"featurize.")}


def open_table(uri: str, storage_options: Optional[Dict[str, Any]] = None, key: str = "data.uri") -> FeatureTable:
    """The features table under a `featurize run` output root (or a folder of its Parquet files)."""
    try:
        fs, root = filesystem(uri, storage_options or {})
        root = root.rstrip("/")
        folder = f"{root}/features" if fs.isdir(f"{root}/features") else root
        sizes = parquet_sizes(fs, folder)
        files = sorted(sizes)
        record = json.loads(fs.cat_file(f"{root}/_job.json")) if fs.exists(f"{root}/_job.json") else {}
    except Exception as e:  # no endpoint, denied, bad options
        raise TableError(f"{key}: {uri}: cannot be read ({type(e).__name__}: {e})") from None
    if not files:
        raise TableError(f"{key}: {uri} holds no features table (no Parquet files under {uri}/features)")
    try:
        schema = pq.read_schema(files[0], filesystem=fs)
    except Exception as e:
        raise TableError(f"{key}: {files[0]} is not a Parquet file ({type(e).__name__}: {e})") from None
    return FeatureTable(uri, fs, root, files, schema, record, sizes)


def is_sequence(table: FeatureTable, column: str) -> bool:
    return table.shape(column)[0] == SEQUENCE
