"""Feature tables into anyone's training loop: a PyTorch IterableDataset and a Ray Data recipe.

    ds = FeatureDataset("s3://bucket/out", "feature", split="train", shuffle=True)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in DataLoader(ds, batch_size=None, num_workers=4):
            loss = F.cross_entropy(head(batch["x"]), batch["y"])

Reads the output contract only (pipeline.output.table); Arrow columns become float32 through
pipeline.output.tensors, a whole read at a time, never a Python loop over rows or values.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import TableError
from ..output.store import filesystem, is_local
from ..output.table import FeatureTable, open_table
from ..output.tensors import SEQUENCE, ColumnError, label_codes, sequences, vectors
from ..redact import redact_text

READ_BYTES = 32 << 20  # float32 bytes converted per read: big enough to amortise, small enough to bound memory
HERE_ROWS = 8192  # rows per block of a table ray_dataset(here=True) converts in this process

Rows = Dict[str, np.ndarray]  # "x", "lengths", "y", "sample_id": arrays of the same length


class FeatureDataset(IterableDataset):
    """Batches of a features table: {"x": float32 (B, D) or (B, T, D), "lengths": int64 (B,) for
    sequences only, "y": int64 (B,) index in `classes` (unless label=None), "sample_id": list (ids=True)}.

    It yields whole batches: use `DataLoader(ds, batch_size=None, num_workers=...)`.

    - column: "feature", "clip_<name>" or "frame_features" (sequences, zero-padded or cut to `frames`,
      default the table's longest clip).
    - split / labels: only rows of this split / whose label is in `labels`.
    - classes: the class order of "y"; default the sorted labels of the whole table (of `labels`
      when given), so that every split of a table gets the same codes. A row whose label is not
      among `classes` is refused.
    - Work is split by Parquet row group: the (file, row group) pairs, sorted, go round-robin to
      rank * num_workers + worker_id, so each row is read exactly once per epoch across DataLoader
      workers and distributed ranks. rank/world_size default to torch.distributed when it is
      initialised, else to the RANK/WORLD_SIZE environment, else 0/1. Ranks may get unequal
      numbers of rows and batches (whole row groups each, and filters): with DDP, use
      drop_last=True and stop at the shortest rank, or wrap the loop in `model.join()`.
    - shuffle: the row-group order is permuted per epoch (seed + epoch; call `set_epoch(n)` before
      each epoch, as with DistributedSampler; with persistent_workers the workers keep the epoch
      they started with), and rows are shuffled within windows of at least `shuffle_buffer` rows.
    - drop_last: drop each worker's last, short batch.
    - ids: add each row's "sample_id" (a list of str) to its batch.
    - read_threads: row groups read and converted at once in each process (in every DataLoader worker).
    Memory stays bounded by (read_threads + 1) row groups and the shuffle buffer, whatever the
    table's size (a run writes row groups of 4 MiB at most, output.file_size).
    """

    def __init__(self, uri: str, column: str, label: Optional[str] = "label", split: Optional[str] = None,
                 labels: Optional[Sequence[str]] = None, classes: Optional[Sequence[str]] = None,
                 batch_size: int = 256, shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 8192,
                 frames: Optional[int] = None, storage_options: Optional[Dict[str, Any]] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 ids: bool = False, read_threads: int = 2):
        if batch_size < 1:
            raise TableError(f"batch_size: must be at least 1, not {batch_size}")
        table = open_table(uri, storage_options, key="uri")
        self.uri, self.storage_options, self.column = uri, storage_options or {}, column
        self.kind, self.dim = table.shape(column, key="column")
        self.frames = _frames(table, column, self.kind, frames)
        self.label, self.split, self.labels = label, split, (None if labels is None else [str(x) for x in labels])
        self.classes = _classes(table, label, split, self.labels, classes)
        self.columns = _columns(table, column, label, split, self.labels, ids)
        self.batch_size, self.drop_last, self.ids, self.read_threads = batch_size, drop_last, ids, max(1, read_threads)
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size = _world(rank, world_size)
        wanted = {"split": [split]} if split is not None else {}
        if self.labels is not None:
            wanted[label] = self.labels
        self.pieces = _row_groups(table, wanted)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        me, every = self.rank * workers + worker, self.world_size * workers
        order = np.arange(len(self.pieces))
        if self.shuffle:  # the same permutation in every worker and rank, so the shards still partition it
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        rows = self._read([self.pieces[i] for i in order[me::every]], self._filesystem())
        if self.shuffle:
            rows = _shuffled(rows, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, me]))
        for part in _batches(rows, self.batch_size, self.drop_last):
            yield self._tensors(part)

    def _filesystem(self):
        """This process's own: an s3fs made before the DataLoader forked its workers is not fork-safe
        (fsspec keeps one instance per process)."""
        return filesystem(self.uri, self.storage_options)[0]

    def _read(self, pieces: List[Tuple[str, int]], fs) -> Iterator[Rows]:
        """The pieces' rows in order, `read_threads` row groups decoded at once (Parquet decoding
        and the float32 cast release the GIL) and one more ahead, so memory stays a few row groups."""
        pool = ThreadPoolExecutor(self.read_threads)
        pending: Deque[Future] = deque()
        try:
            for piece in pieces:
                pending.append(pool.submit(self._piece, fs, *piece))
                if len(pending) > self.read_threads:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _piece(self, fs, path: str, group: int) -> List[Rows]:
        per_row = 4 * self.dim * (self.frames or 1)
        size = max(self.batch_size, READ_BYTES // per_row)  # decoded a part at a time: bounded peak
        with _parquet(fs, path) as f:
            batches = (self._filter(b) for b in f.iter_batches(size, row_groups=[group], columns=self.columns))
            return [self._convert(b, path) for b in batches if len(b)]

    def _filter(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        masks = []
        if self.split is not None:
            masks.append(pc.equal(batch.column("split"), self.split))
        if self.labels is not None:
            masks.append(pc.is_in(batch.column(self.label).cast(pa.string()), pa.array(self.labels, pa.string())))
        if not masks:
            return batch
        mask = masks[0] if len(masks) == 1 else pc.and_(*masks)
        return batch if pc.all(mask).as_py() else batch.filter(mask)

    def _convert(self, batch: pa.RecordBatch, path: str) -> Rows:
        out: Rows = _features(batch.column(self.column), self.kind, self.frames, self.column, self.uri, path)
        if not out["x"].flags.writeable:  # a float32 column is a read-only view of Arrow's buffer
            out["x"] = out["x"].copy()
        if self.label is not None:
            out["y"] = _codes(batch.column(self.label), self.classes, path)
        if self.ids:
            out["sample_id"] = batch.column("sample_id").to_numpy(zero_copy_only=False)
        return out

    def _tensors(self, rows: Rows) -> Dict[str, Any]:
        return {k: (v.tolist() if k == "sample_id" else torch.from_numpy(v)) for k, v in rows.items()}


def ray_dataset(uri: str, column: str, label: Optional[str] = "label", split: Optional[str] = None,
                classes: Optional[Sequence[str]] = None, frames: Optional[int] = None,
                storage_options: Optional[Dict[str, Any]] = None,
                keep: Optional[Callable[[pa.Table], pa.Array]] = None, here: bool = False):
    """A ray.data.Dataset of the table with columns "x" (float32 (D,) or (T, D) tensors), "y" (int64
    index in `classes`, unless label=None) and "lengths" (sequences), ready for
    `ds.iter_torch_batches(batch_size=...)`. `keep(table) -> boolean array` drops rows inside the
    map (e.g. a hash-based validation fraction); it sees the read columns, sample_id included.
    `here`: read and convert the table in this process and hand Ray the blocks (a small table:
    Ray Data would start read and map tasks, and their workers, for a few rows)."""
    import pyarrow.fs as pafs
    import ray.data

    table = open_table(uri, storage_options, key="uri")
    kind, _ = table.shape(column, key="column")
    frames = _frames(table, column, kind, frames)
    classes = _classes(table, label, split, None, classes)
    columns = _columns(table, column, label, split, None, ids=keep is not None)
    convert = _RayConvert(column, kind, label, split, classes, frames, keep, table.uri)
    if here:
        from ray.data.block import BlockAccessor

        rows = table.dataset().to_table(columns=columns)
        blocks = [BlockAccessor.batch_to_block(convert(rows.slice(i, HERE_ROWS)))
                  for i in range(0, max(len(rows), 1), HERE_ROWS)]
        return ray.data.from_blocks(blocks)
    fs = None if is_local(table.fs) else pafs.PyFileSystem(pafs.FSSpecHandler(table.fs))
    ds = ray.data.read_parquet(table.files, partitioning=None, filesystem=fs).select_columns(columns)
    return ds.map_batches(convert, batch_format="pyarrow")


class _RayConvert:
    """Arrow batch -> numpy dict; a plain picklable callable (Ray ships it to its workers)."""

    def __init__(self, column, kind, label, split, classes, frames, keep, uri=""):
        self.column, self.kind, self.label, self.split = column, kind, label, split
        self.classes, self.frames, self.keep, self.uri = classes, frames, keep, uri

    def __call__(self, t: pa.Table) -> Dict[str, np.ndarray]:
        if self.split is not None:
            t = t.filter(pc.equal(t.column("split"), self.split))
        if self.keep is not None:
            t = t.filter(self.keep(t))
        out: Rows = _features(t.column(self.column), self.kind, self.frames, self.column, self.uri, "a Ray block")
        if self.label is not None:
            out["y"] = _codes(t.column(self.label), self.classes, "a Ray block")
        return out


# -- planning ---------------------------------------------------------------------------------------

def _frames(table: FeatureTable, column: str, kind: str, frames: Optional[int]) -> Optional[int]:
    if kind != SEQUENCE:
        return None
    if frames is not None and frames < 1:
        raise TableError(f"frames: must be at least 1, not {frames}")
    return frames or table.frames(column)


def _classes(table: FeatureTable, label: Optional[str], split: Optional[str],
             labels: Optional[List[str]], classes: Optional[Sequence[str]]) -> Optional[List[str]]:
    if label is None:
        return None
    counts = table.labels(label, key="label")  # also checks the label and split columns exist
    if split is not None and split not in counts:
        raise TableError(f"split: {split!r} is not in {table.uri} (splits: {', '.join(sorted(counts))})")
    if classes is not None:
        return [str(c) for c in classes]
    if labels is not None:
        return sorted(set(labels))
    return sorted(set().union(*counts.values()))


def _columns(table: FeatureTable, column: str, label: Optional[str], split: Optional[str],
             labels: Optional[List[str]], ids: bool) -> List[str]:
    if labels is not None and label is None:
        raise TableError("labels: filtering by label needs label= (the label column)")
    needed = {column: "column", label: "label", "split": "split" if split is not None else None,
              "sample_id": "ids" if ids else None}
    for name, key in needed.items():
        if name is not None and key is not None and name not in table.schema.names:
            raise TableError(f"{key}: {table.uri} has no column {name!r}")
    return [name for name, key in needed.items() if name is not None and key is not None]


def _row_groups(table: FeatureTable, wanted: Dict[str, List[str]]) -> List[Tuple[str, int]]:
    """Every (file, row group) with rows, sorted, less those whose statistics show none of the
    `wanted` values of a column (a run's files each hold one split and often one label), so the
    shards share only row groups that count."""
    def groups(path: str) -> List[Tuple[str, int]]:
        meta = pq.read_metadata(path, filesystem=table.fs)
        where = {meta.schema.names.index(c): v for c, v in wanted.items() if c in meta.schema.names}
        return [(path, i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows
                and all(_may_hold(meta.row_group(i).column(c).statistics, v) for c, v in where.items())]

    with ThreadPoolExecutor(8) as pool:  # one footer read each: concurrent on an object store
        return sorted(p for found in pool.map(groups, table.files) for p in found)


def _may_hold(stats, values: List[str]) -> bool:
    if stats is None or not stats.has_min_max:
        return True
    low, high = (x.decode() if isinstance(x, bytes) else x for x in (stats.min, stats.max))
    if not isinstance(low, str):  # a label column of another type: left to the filter after its cast
        return True
    return any(low <= v <= high for v in values)


def _world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        default = dist.get_rank(), dist.get_world_size()
    else:
        default = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank = default[0] if rank is None else rank
    world_size = default[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise TableError(f"rank: {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    return rank, world_size


@contextmanager
def _parquet(fs, path: str) -> Iterator[pq.ParquetFile]:
    if is_local(fs):  # pyarrow's own reader: no Python file object in the way
        with pq.ParquetFile(path) as f:
            yield f
    else:
        with fs.open(path, "rb") as raw, pq.ParquetFile(raw) as f:
            yield f


def _features(col, kind: str, frames: Optional[int], column: str, uri: str, where: str) -> Rows:
    """{"x"} (and "lengths" for sequences) of a batch; a null vector or clip is a refusal naming
    the table, the file and how many rows, not a raw error from inside a DataLoader."""
    try:
        if kind == SEQUENCE:
            x, lengths = sequences(col, frames)
            return {"x": x, "lengths": lengths}
        return {"x": vectors(col)}
    except ColumnError as e:
        raise TableError(f"column {column!r} of {redact_text(uri)} ({redact_text(where)}): {e}") from None


def _codes(column, classes: List[str], where: str) -> np.ndarray:
    codes = label_codes(column, classes)
    if (codes < 0).any():
        bad = pc.filter(column, pa.array(codes < 0))[0].as_py()
        raise TableError(f"label: {bad!r} in {where} is not among the classes ({len(classes)} given)")
    return codes


# -- batching ---------------------------------------------------------------------------------------

def _len(rows: Rows) -> int:
    return len(rows["x"])


def _cut(rows: Rows, start: int, stop: int) -> Rows:
    return {k: v[start:stop] for k, v in rows.items()}


def _join(parts: List[Rows]) -> Rows:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _batches(rows: Iterator[Rows], size: int, drop_last: bool) -> Iterator[Rows]:
    """Batches of `size` rows: views into each read, a copy only for a batch spanning two reads."""
    carry: List[Rows] = []
    held = 0
    for part in rows:
        n, start = _len(part), 0
        if held:
            start = min(size - held, n)
            carry.append(_cut(part, 0, start))
            held += start
            if held < size:
                continue
            yield _join(carry)
            carry, held = [], 0
        end = start + (n - start) // size * size
        for s in range(start, end, size):
            yield _cut(part, s, s + size)
        if end < n:
            carry, held = [_cut(part, end, n)], n - end
    if held and not drop_last:
        yield _join(carry)


def _shuffled(rows: Iterator[Rows], buffer: int, rng: np.random.Generator) -> Iterator[Rows]:
    """Rows permuted within windows of at least `buffer` rows (whole reads gathered, then mixed)."""
    pool: List[Rows] = []
    held = 0
    for part in rows:
        pool.append(part)
        held += _len(part)
        if held >= buffer:
            yield _permute(_join(pool), rng)
            pool, held = [], 0
    if pool:
        yield _permute(_join(pool), rng)


def _permute(rows: Rows, rng: np.random.Generator) -> Rows:
    order = rng.permutation(_len(rows))
    return {k: v[order] for k, v in rows.items()}
