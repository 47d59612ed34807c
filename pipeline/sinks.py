"""Commit stage: a Ray Data Datasink that writes the features and errors tables.

Why a custom sink rather than `write_parquet`: Ray's writer streams files to their final names
(a reader can see a partial file) and a rerun appends copies. Here every file is made visible
only when complete, by an atomic rename on local disk or by a single completed PUT (or multipart
upload) on object stores, and its name is derived from the sample ids it holds, so a retried
write task replaces its own file instead of adding a duplicate.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from .sources import filesystem

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
ERRORS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int32()),
    ]
)


@dataclass
class SinkSpec:
    out_uri: str
    storage_options: Dict[str, Any]
    partition_by: List[str]
    columns: List[Tuple[str, pa.DataType]]  # after sample_id, uri, label, split
    metadata: Dict[str, str] = field(default_factory=dict)  # provenance, in every file


def feature_type(dtype: str, dim: int) -> pa.DataType:
    return pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)


def image_columns(dtype: str, dim: int) -> List[Tuple[str, pa.DataType]]:
    return [("feature", feature_type(dtype, dim)), ("width", pa.int32()), ("height", pa.int32())]


def video_columns(dtype: str, heads: List[Tuple[str, int]], frame_dim: Optional[int]) -> List[Tuple[str, pa.DataType]]:
    """Clip rows: timing, decoder, one clip_<name> per head, and frame_features when asked."""
    cols = [("start_s", pa.float64()), ("end_s", pa.float64()), ("num_frames", pa.int32()), ("fps", pa.float32()),
            ("frame_timestamps_s", pa.list_(pa.float32())), ("decoder", pa.string())]
    cols += [(name, feature_type(dtype, dim)) for name, dim in heads]
    if frame_dim:
        cols.append(("frame_features", pa.list_(feature_type(dtype, frame_dim))))
    return cols


def features_schema(spec: SinkSpec) -> pa.Schema:
    fields = [("sample_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("split", pa.string())]
    fields = [f for f in fields if f[0] not in spec.partition_by]
    return pa.schema(fields + list(spec.columns), metadata=spec.metadata)


class ParquetCommitSink(Datasink):
    def __init__(self, spec: SinkSpec):
        self.spec = spec
        self.totals: Dict[str, Any] = {"features": 0, "errors": Counter(), "files": 0, "commits": []}

    def write(self, blocks: Iterable[Any], ctx: Any) -> Dict[str, Any]:
        fs, root = filesystem(self.spec.out_uri, self.spec.storage_options)
        schema = features_schema(self.spec)
        result = {"features": 0, "errors": Counter(), "files": 0}
        for block in blocks:
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            ok = batch["error_stage"] == ""
            for path, table in self._feature_tables(batch, ok, schema):
                _write_parquet_atomic(fs, f"{root}/{path}", table)
                result["features"] += table.num_rows
                result["files"] += 1
            if (~ok).any():
                errors = _errors_table(batch, ~ok)
                _write_parquet_atomic(fs, f"{root}/errors/{_part_name(errors)}", errors)
                result["errors"].update(zip(errors["stage"].to_pylist(), errors["error_type"].to_pylist()))
                result["files"] += 1
        result["committed_at"] = time.time()  # for the steady-state throughput
        return result

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.totals["features"] += r["features"]
            self.totals["errors"].update(r["errors"])
            self.totals["files"] += r["files"]
            self.totals["commits"].append((r["committed_at"], r["features"] + sum(r["errors"].values())))

    def _feature_tables(self, batch: Dict[str, np.ndarray], ok: np.ndarray, schema: pa.Schema):
        """One table per partition, with the path it is written to."""
        keys = self.spec.partition_by
        groups: Dict[tuple, List[int]] = {}
        for i in np.flatnonzero(ok):
            groups.setdefault(tuple(str(batch[k][i]) for k in keys), []).append(i)
        for values, rows in sorted(groups.items()):
            idx = np.asarray(rows)
            table = _features_table(batch, idx, schema)
            folder = "/".join(f"{k}={quote(v, safe='') if v else HIVE_NULL}" for k, v in zip(keys, values))
            yield "/".join(p for p in ("features", folder, _part_name(table)) if p), table


def _features_table(batch: Dict[str, np.ndarray], idx: np.ndarray, schema: pa.Schema) -> pa.Table:
    return pa.table({f.name: _arrow(batch[f.name][idx], f.type) for f in schema}, schema=schema)


def _arrow(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """numpy column (dense, or one array per row) -> Arrow, without a Python loop over values."""
    if pa.types.is_fixed_size_list(typ):  # (N, D)
        flat = np.ascontiguousarray(np.stack(list(values)) if values.dtype == object else values)
        flat = flat.astype(typ.value_type.to_pandas_dtype(), copy=False).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), typ.list_size)
    if pa.types.is_list(typ):  # one (T, ...) array per row
        rows = list(values)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        inner = np.concatenate(rows) if rows else np.zeros((0,))
        return pa.ListArray.from_arrays(pa.array(offsets), _arrow(inner, typ.value_type))
    if pa.types.is_floating(typ) or pa.types.is_integer(typ):
        return pa.array(values.astype(typ.to_pandas_dtype()))
    return pa.array(values.tolist(), type=typ)


def _errors_table(batch: Dict[str, np.ndarray], bad: np.ndarray) -> pa.Table:
    n = int(bad.sum())
    return pa.table(
        {
            "sample_id": batch["sample_id"][bad].tolist(),
            "uri": batch["uri"][bad].tolist(),
            "stage": batch["error_stage"][bad].tolist(),
            "error_type": batch["error_type"][bad].tolist(),
            "message": batch["error_message"][bad].tolist(),
            "attempts": [1] * n,
        },
        schema=ERRORS_SCHEMA,
    )


def _part_name(table: pa.Table) -> str:
    """Named by the sample ids it holds: a retried write lands on the same name."""
    digest = hashlib.sha1("\n".join(table["sample_id"].to_pylist()).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def _write_parquet_atomic(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")  # readers skip dot files
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # Object stores publish a key only when its PUT (or multipart upload) completes.
        fs.pipe_file(path, data)
