"""Read stage: plan rows -> sample rows carrying the encoded bytes.

Loose files are fetched a batch at a time with `fs.cat`, which s3fs runs concurrently; tar shards
are streamed member by member and never extracted to disk (member names are data only, so
absolute paths or `..` cannot escape anywhere). A fetch that fails becomes an error row.
"""
from __future__ import annotations

import json
import posixpath
import tarfile
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .sources import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, VIDEO_EXTENSIONS, filesystem
from .timing import timed

Batch = Dict[str, np.ndarray]
PLAN_COLUMNS = ("sample_id", "uri", "label", "split")
# unit: the plan row a sample comes from (a tar shard, a video cut into windows, or itself);
# unit_rows: how many rows that unit yields, 0 while unknown (see commit.py);
# attempts: how many earlier runs failed on the sample (--retry-failed).
SAMPLE_COLUMNS = (*PLAN_COLUMNS, "unit", "unit_rows", "attempts")
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
MAX_MESSAGE = 500


class StoreError(RuntimeError):
    """The store kept failing (throttling, dropped connections, 5xx) after its client's retries.
    That is no fault of the sample: the task fails, the job stops resumable, and the sample is
    not recorded as an error."""


def _sample_fault(exc: BaseException) -> bool:
    """Errors that belong to the sample (missing, denied, malformed), not to the store."""
    return not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError,
                                                             IsADirectoryError, NotADirectoryError))


def error_fields(stage: str, exc: BaseException) -> Dict[str, str]:
    message = str(exc) or repr(exc)
    return {"error_stage": stage, "error_type": type(exc).__name__, "error_message": message[:MAX_MESSAGE]}


OK = {"error_stage": "", "error_type": "", "error_message": ""}


def ragged(arrays: List[np.ndarray]) -> np.ndarray:
    """A column of arrays of different lengths (one object array), as Ray Data takes them."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # element by element: numpy would stack equal shapes
        out[i] = a
    return out


@timed("read")
def read_batch(
    batch: Batch, storage_options: Dict[str, Any], rows_per_batch: int, media: str = "image"
) -> Iterator[Batch]:
    """Ray Data map_batches generator: yields batches of at most `rows_per_batch` samples.

    Local video files are not read here: the decoder opens them itself, so a 10-minute video
    is never held in memory whole.
    """
    files = [i for i, c in enumerate(batch["container"]) if c == ""]
    if files:
        yield from _chunks(_read_files(batch, files, storage_options, media), rows_per_batch)
    extensions = IMAGE_EXTENSIONS if media == "image" else VIDEO_EXTENSIONS
    for i, container in enumerate(batch["container"]):
        if container == "tar":
            skip = frozenset(batch["skip"][i]) if "skip" in batch else frozenset()
            yield from _chunks(_read_tar(_sample(batch, i), storage_options, extensions, skip), rows_per_batch)


def _sample(batch: Batch, i: int) -> Dict[str, Any]:
    """The sample columns of plan row i: a unit of one row until a later stage says otherwise."""
    row = {k: str(batch[k][i]) for k in PLAN_COLUMNS}
    attempts = int(batch["attempts"][i]) if "attempts" in batch else 0
    return {**row, "unit": row["sample_id"], "unit_rows": 1, "attempts": attempts}


def _read_files(
    batch: Batch, indices: List[int], storage_options: Dict[str, Any], media: str
) -> Iterator[Dict[str, Any]]:
    by_fs = defaultdict(list)
    for i in indices:
        fs, path = filesystem(str(batch["uri"][i]), storage_options)
        by_fs[id(fs)].append((fs, path, i))
    for group in by_fs.values():
        fs = group[0][0]
        if media == "video" and isinstance(fs, LocalFileSystem):
            for _, path, i in group:  # opened by the decoder
                yield {**_sample(batch, i), "data": b"", **OK}
            continue
        contents = fs.cat([path for _, path, _ in group], on_error="return")
        for _, path, i in group:
            row = _sample(batch, i)
            data = contents.get(path, FileNotFoundError(path))
            if isinstance(data, BaseException) and not _sample_fault(data):
                raise StoreError(f"{batch['uri'][i]}: {type(data).__name__}: {data}") from data
            if isinstance(data, BaseException):
                yield {**row, "data": b"", **error_fields("read", data)}
            else:
                yield {**row, "data": data, **OK}


def _read_tar(
    shard: Dict[str, Any], storage_options: Dict[str, Any], extensions: frozenset, skip: frozenset = frozenset()
) -> Iterator[Dict[str, Any]]:
    """Stream a webdataset shard: consecutive members sharing a key form one sample; samples in
    `skip` (committed by an earlier run) are passed over unread.

    The shard is one unit: its last row, yielded once the stream ends, says how many it has.
    """
    count, last = 0, None
    for row in _tar_rows(shard, storage_options, extensions, skip):
        if last is not None:
            yield last
        count, last = count + 1, row
    if last is not None:
        last["unit_rows"] = count
        yield last


def _tar_rows(
    shard: Dict[str, Any], storage_options: Dict[str, Any], extensions: frozenset, skip: frozenset
) -> Iterator[Dict[str, Any]]:
    shard_name = str(shard["sample_id"])
    fs, path = filesystem(str(shard["uri"]), storage_options)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _split_key(info.name)
                if f"{shard_name}/{member_key}" in skip:
                    continue
                if member_key != key and key is not None:
                    yield _tar_sample(shard, shard_name, key, members, extensions)
                    members = {}
                key = member_key
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield _tar_sample(shard, shard_name, key, members, extensions)
    except Exception as e:  # unreadable or truncated shard: one error row for what is left
        if not _sample_fault(e):
            raise StoreError(f"{shard['uri']}: {type(e).__name__}: {e}") from e
        yield {**shard, "data": b"", **error_fields("read", e)}


def _split_key(name: str):
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _tar_sample(
    shard: Dict[str, Any], shard_name: str, key: str, members: Dict[str, bytes], extensions: frozenset
) -> Dict[str, Any]:
    row = {
        **shard,
        "sample_id": f"{shard_name}/{key}",
        "uri": f"{shard['uri']}#{key}",
        "label": _member_label(members),
        "unit_rows": 0,
    }
    media_ext = next((e for e in members if e.rsplit(".", 1)[-1] in extensions), None)
    if media_ext is None:
        kind = "image" if extensions is IMAGE_EXTENSIONS else "video"
        err = LookupError(f"no {kind} member among {sorted(members)}")
        return {**row, "data": b"", **error_fields("read", err)}
    return {**row, "data": members[media_ext], **OK}


def _member_label(members: Dict[str, bytes]) -> str:
    for ext in LABEL_EXTENSIONS:
        if ext in members:
            text = members[ext].decode("utf-8", errors="replace").strip()
            if ext == "json":
                return _json_label(text)
            return text
    return ""


def _json_label(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return ""
    label: Optional[Any] = value.get("label") if isinstance(value, dict) else None
    return "" if label is None else str(label)


def _chunks(rows: Iterator[Dict[str, Any]], size: int) -> Iterator[Batch]:
    chunk: List[Dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield _to_batch(chunk)
            chunk = []
    if chunk:
        yield _to_batch(chunk)


def _to_batch(rows: List[Dict[str, Any]]) -> Batch:
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in (*PLAN_COLUMNS, "unit", *ERROR_COLUMNS)}
    batch["unit_rows"] = np.array([r["unit_rows"] for r in rows], dtype=np.int64)
    batch["attempts"] = np.array([r["attempts"] for r in rows], dtype=np.int64)
    data = np.empty(len(rows), dtype=object)
    data[:] = [r["data"] for r in rows]
    batch["data"] = data
    return batch
