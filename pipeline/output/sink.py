"""Commit stage: a Ray Data Datasink that writes the features and errors tables.

Why a custom sink rather than `write_parquet`: Ray's writer streams files to their final names
(a reader can see a partial file) and a rerun appends copies. Here each write task makes whole
files and the job's committer publishes them, each sample exactly once (see ledger.py): staged on
local disk, their bytes carried in the commit call to an object store (one PUT a file there).
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from .. import faults
from ..timing import block_seconds
from .ledger import STAGING, Staged, error_kinds, parquet_bytes, part_name, write_atomic
from .partitions import partition_folder
from .store import ROW_GROUP_BYTES, filesystem, is_local

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
    staging: str = ""  # under OUT/_staging: "<job fingerprint>/<run id>" (ledger.staging_folder)
    file_bytes: int = 0  # a write call's target: one file per partition of about this size (0: one per block)

    @property
    def row_group_bytes(self) -> int:
        """Row groups of ROW_GROUP_BYTES, or a quarter of a smaller file: readers split a file's work
        by row group (the loader shards and shuffles by them) and hold one or a few at a time."""
        return min(ROW_GROUP_BYTES, max(1, self.file_bytes // 4)) if self.file_bytes else ROW_GROUP_BYTES


# output.file_size "auto": about AUTO_FILES files a run, each within [AUTO_MIN, AUTO_MAX] bytes. A
# small run (a laptop's 10,000 images) still commits every few hundred rows, so its progress line
# moves and a stop loses little; an ImageNet-scale run writes files of AUTO_MAX, as readers and
# object stores want them (bench/README.md, the loader).
AUTO_FILES, AUTO_MIN, AUTO_MAX = 32, 1 << 20, 64 << 20


def target_bytes(setting: Optional[int], rows: int, columns: List[Tuple[str, pa.DataType]], frames: int = 1) -> int:
    """A file's target: the setting's bytes, or for "auto" (None) a 32nd of the run's estimated
    output (`rows` of `columns`, a variable list holding about `frames` items), within the bounds."""
    if setting:
        return setting
    size = rows * (64 + sum(_value_bytes(t, frames) for _, t in columns)) // AUTO_FILES  # 64: ids, uri, label
    return min(AUTO_MAX, max(AUTO_MIN, size))


def _value_bytes(typ: pa.DataType, frames: int) -> int:
    if pa.types.is_fixed_size_list(typ):
        return typ.list_size * _value_bytes(typ.value_type, frames)
    if pa.types.is_list(typ):
        return frames * _value_bytes(typ.value_type, frames)
    try:
        return max(1, typ.bit_width // 8)
    except ValueError:  # strings: a few bytes each
        return 16


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
    """Every file holds the exact split and label, partitioned or not (why: partitions.py)."""
    fields = [("sample_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("split", pa.string())]
    return pa.schema(fields + list(spec.columns), metadata=spec.metadata)


class ParquetCommitSink(Datasink):
    """Stages a write call's tables whole, one file per partition, then has the committer publish
    them (see ledger.py). Ray Data gathers blocks into write calls of `spec.file_bytes` (its
    `min_bytes_per_write`), so a file's size follows the setting, not the read tasks' blocks."""

    def __init__(self, spec: SinkSpec, committer: Any):
        self.spec = spec
        self.committer = committer  # the job's Committer actor
        self.totals: Dict[str, Any] = {"features": 0, "errors": Counter(), "files": 0, "duplicates": 0, "commits": [],
                                       "seconds": Counter()}  # busy seconds per stage (timing.py)

    @property
    def min_bytes_per_write(self) -> Optional[int]:
        return self.spec.file_bytes or None

    def write(self, blocks: Iterable[Any], ctx: Any) -> Dict[str, Any]:
        started, seconds = time.perf_counter(), Counter()
        fs, root = filesystem(self.spec.out_uri, self.spec.storage_options)
        local = is_local(fs)  # object stores: no staged copy (a PUT, then a COPY and a DELETE)
        # recovery publishes only what its own job staged: the folder names the job and the run
        staging = "/".join(p for p in (root.rstrip("/"), STAGING, self.spec.staging, uuid.uuid4().hex) if p)
        staged: List[Staged] = []
        for rel, table, units in self.files(blocks, seconds):
            ids = table["sample_id"].to_pylist()
            rel = f"{rel}/{part_name(ids)}"
            data = parquet_bytes(table, self.spec.row_group_bytes)
            kinds = error_kinds(table) if rel.startswith("errors/") else []
            if local:
                write_atomic(fs, f"{staging}/{rel}", data)
            staged.append(Staged(f"{staging}/{rel}" if local else "", rel, ids, kinds, units, None if local else data,
                                 self.spec.row_group_bytes))
        # the committer tallies the busy seconds too, for the live progress line's bound (progress.py)
        live = {**seconds, "write": seconds["write"] + time.perf_counter() - started}
        result = {"features": 0, "errors": Counter(), "duplicates": 0, "files": 0}
        if staged:
            call = self.committer.commit.remote(staged, live)
            faults.point("commit", lambda: "\n".join(s.rel for s in staged))  # a writer dies mid-publish
            result = ray.get(call)
        result["committed_at"] = time.time()  # for the steady-state throughput
        seconds["write"] += time.perf_counter() - started
        result["seconds"] = dict(seconds)
        return result

    def files(self, blocks: Iterable[Any], seconds: Counter) -> List[Tuple[str, pa.Table, List[Tuple[str, str, int]]]]:
        """(folder relative to OUT, table, its rows of multi-row units) of each file a write call
        makes: all its blocks' rows of one partition (or of the errors) together; `seconds` gets
        the blocks' busy seconds per stage."""
        schema = features_schema(self.spec)
        parts: Dict[str, List[Tuple[pa.Table, List[Tuple[str, str, int]]]]] = {}
        for block in blocks:
            accessor = BlockAccessor.for_block(block)
            if accessor.num_rows() == 0:  # e.g. a resumed tar shard whose members were all committed
                continue
            batch = accessor.to_batch_format("numpy")
            seconds.update(block_seconds(batch))
            ok = batch["error_stage"] == ""
            tables = list(self._feature_tables(batch, ok, schema))
            if (~ok).any():
                tables.append(("errors", _errors_table(batch, ~ok), np.flatnonzero(~ok)))
            for folder, table, rows in tables:
                parts.setdefault(folder, []).append((table, _unit_rows(batch, rows)))
        return [(folder, pa.concat_tables([t for t, _ in pieces]), [u for _, units in pieces for u in units])
                for folder, pieces in sorted(parts.items())]

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.totals["features"] += r["features"]
            self.totals["errors"].update(r["errors"])
            self.totals["files"] += r["files"]
            self.totals["duplicates"] += r["duplicates"]
            self.totals["commits"].append((r["committed_at"], r["features"] + sum(r["errors"].values())))
            self.totals["seconds"].update(r["seconds"])

    def _feature_tables(self, batch: Dict[str, np.ndarray], ok: np.ndarray, schema: pa.Schema):
        """One table per partition: (folder relative to OUT, table, batch rows in it)."""
        keys = self.spec.partition_by
        groups: Dict[tuple, List[int]] = {}
        for i in np.flatnonzero(ok):
            groups.setdefault(tuple(str(batch[k][i]) for k in keys), []).append(i)
        for values, rows in sorted(groups.items()):
            idx = np.asarray(rows)
            folder = partition_folder(keys, values)
            yield "/".join(p for p in ("features", folder) if p), _features_table(batch, idx, schema), idx


def _unit_rows(batch: Dict[str, np.ndarray], rows: np.ndarray) -> List[Tuple[str, str, int]]:
    """(sample_id, unit, rows in the unit) for the rows that are part of a multi-row unit."""
    if "unit" not in batch:
        return []
    out = []
    for i in rows:
        sid, unit, n = str(batch["sample_id"][i]), str(batch["unit"][i]), int(batch["unit_rows"][i])
        if unit != sid or n != 1:
            out.append((sid, unit, n))
    return out


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


def _attempts(batch: Dict[str, np.ndarray], bad: np.ndarray) -> List[int]:
    """This attempt's number: one more than the earlier runs that failed on the sample."""
    if "attempts" not in batch:
        return [1] * int(bad.sum())
    return [int(a) + 1 for a in batch["attempts"][bad]]


def _errors_table(batch: Dict[str, np.ndarray], bad: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "sample_id": batch["sample_id"][bad].tolist(),
            "uri": batch["uri"][bad].tolist(),
            "stage": batch["error_stage"][bad].tolist(),
            "error_type": batch["error_type"][bad].tolist(),
            "message": batch["error_message"][bad].tolist(),
            "attempts": _attempts(batch, bad),
        },
        schema=ERRORS_SCHEMA,
    )
