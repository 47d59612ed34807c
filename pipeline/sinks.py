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
from typing import Any, Dict, Iterable, List
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
    dim: int
    dtype: str  # float16 | float32
    metadata: Dict[str, str] = field(default_factory=dict)  # provenance, in every file


def features_schema(spec: SinkSpec) -> pa.Schema:
    value = pa.float16() if spec.dtype == "float16" else pa.float32()
    fields = [("sample_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("split", pa.string())]
    fields = [f for f in fields if f[0] not in spec.partition_by]
    fields += [("feature", pa.list_(value, spec.dim)), ("width", pa.int32()), ("height", pa.int32())]
    return pa.schema(fields, metadata=spec.metadata)


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
    columns = {}
    for f in schema:
        values = batch[f.name][idx]
        if f.name == "feature":
            dim = f.type.list_size
            flat = np.ascontiguousarray(values, dtype=f.type.value_type.to_pandas_dtype()).reshape(-1)
            columns[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
        else:
            columns[f.name] = pa.array(values.tolist(), type=f.type)
    return pa.table(columns, schema=schema)


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
