"""Read stage: plan rows -> sample rows carrying the encoded bytes.

Loose files are fetched a batch at a time with `fs.cat`, which s3fs runs concurrently; tar shards
are streamed member by member and never extracted to disk (member names are data only, so
absolute paths or `..` cannot escape anywhere). A fetch that fails becomes an error row.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ..output.store import filesystem
from ..redact import FETCH_URI, RedactedError
from ..rows import ERROR_COLUMNS, OK, PLAN_COLUMNS, error_fields
from ..timing import timed
from .fetch import TIMED_OUT, URIRefused, bounded, read_local, read_remote, timeout_error
from .plan import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, VIDEO_EXTENSIONS
from .shards import tar_rows

Batch = Dict[str, np.ndarray]


class StoreError(RedactedError, RuntimeError):
    """The store kept failing (throttling, dropped connections, 5xx) after its client's retries.
    That is no fault of the sample: the task fails, the job stops resumable, and the sample is
    not recorded as an error."""


def _sample_fault(exc: BaseException) -> bool:
    """Errors that belong to the sample (missing, denied, malformed), not to the store."""
    return not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError,
                                                             IsADirectoryError, NotADirectoryError))


DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_BYTES = 256 * 2**20


def _read_error(exc: BaseException) -> Dict[str, str]:
    return error_fields("read", exc)


@timed("read")
def read_batch(
    batch: Batch, storage_options: Dict[str, Any], rows_per_batch: int, media: str = "image",
    read_timeout_s: float = DEFAULT_TIMEOUT_S, max_sample_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Batch]:
    """Ray Data map_batches generator: yields batches of at most `rows_per_batch` samples.

    Local video files are not read here: the decoder opens them itself, so a 10-minute video
    is never held in memory whole. A read that takes longer than `read_timeout_s`, or a file or
    tar member over `max_sample_bytes`, becomes an error row.
    """
    limits = (read_timeout_s, max_sample_bytes)
    refused = [i for i in range(len(batch["container"])) if _refused(batch, i)]
    if refused:
        yield _to_batch([{**_sample(batch, i), "data": b"", **_read_error(URIRefused(batch["refused"][i]))}
                         for i in refused])
    files = [i for i, c in enumerate(batch["container"]) if c == "" and not _refused(batch, i)]
    if files:
        yield from _chunks(_read_files(batch, files, storage_options, media, limits), rows_per_batch)
    extensions = IMAGE_EXTENSIONS if media == "image" else VIDEO_EXTENSIONS
    for i, container in enumerate(batch["container"]):
        if container == "tar" and not _refused(batch, i):
            skip = frozenset(batch["skip"][i]) if "skip" in batch else frozenset()
            rows = _read_tar(_sample(batch, i), _path(batch, i, storage_options), extensions, skip, limits)
            yield from _chunks(rows, rows_per_batch)


def _refused(batch: Batch, i: int) -> bool:
    return "refused" in batch and bool(batch["refused"][i])  # absent, null or "" in older plans


def _path(batch: Batch, i: int, storage_options: Dict[str, Any]):
    """(filesystem, path) of plan row i: a non-UTF-8 local name is opened by its real bytes."""
    real = batch[FETCH_URI][i] if FETCH_URI in batch else None  # uri with its credentials (redact.py)
    fs, path = filesystem(str(real or batch["uri"][i]), storage_options)
    raw = batch["raw_path"][i] if "raw_path" in batch else None
    return (fs, os.fsdecode(raw)) if raw else (fs, path)


def _sample(batch: Batch, i: int) -> Dict[str, Any]:
    """The sample columns of plan row i: a unit of one row until a later stage says otherwise."""
    row = {k: str(batch[k][i]) for k in PLAN_COLUMNS}
    attempts = int(batch["attempts"][i]) if "attempts" in batch else 0
    return {**row, "unit": row["sample_id"], "unit_rows": 1, "attempts": attempts}


def _read_files(
    batch: Batch, indices: List[int], storage_options: Dict[str, Any], media: str, limits
) -> Iterator[Dict[str, Any]]:
    by_fs = defaultdict(list)
    for i in indices:
        fs, path = _path(batch, i, storage_options)
        by_fs[id(fs)].append((fs, path, i))
    for group in by_fs.values():
        local = isinstance(group[0][0], LocalFileSystem)
        yield from _read_group(batch, group, media, limits, chunk=1 if local else len(group))


def _read_group(batch: Batch, group: List, media: str, limits, chunk: int) -> Iterator[Dict[str, Any]]:
    """Rows for `group` in order. A batch fetch that times out is retried file by file, so
    that the one file that hangs is the one that gets the timeout row."""
    timeout_s, _ = limits
    pending = list(group)
    while pending:
        for row in bounded(_fetch_rows(batch, list(pending), media, limits, chunk), timeout_s):  # a copy: popped here
            if row is not TIMED_OUT:
                pending.pop(0)
                yield row
            elif chunk > 1:
                chunk = 1
                break
            else:
                _, _, i = pending.pop(0)
                yield {**_sample(batch, i), "data": b"", **_read_error(timeout_error(str(batch["uri"][i]), timeout_s))}
                break


def _fetch_rows(batch: Batch, group: List, media: str, limits, chunk: int) -> Iterator[Dict[str, Any]]:
    _, cap = limits
    for k in range(0, len(group), chunk):
        part = group[k : k + chunk]
        fs = part[0][0]
        if isinstance(fs, LocalFileSystem):
            contents = [_attempt(read_local, path, cap, _keep(batch, i, media)) for _, path, i in part]
        else:
            contents = read_remote(fs, [path for _, path, _ in part], cap)
        for (_, _, i), data in zip(part, contents):
            yield _file_row(batch, i, data)


def _keep(batch: Batch, i: int, media: str) -> bool:
    """Whether a local file's bytes are read here: a local video is opened by the decoder, unless
    its name is not UTF-8 (the decoder knows only the escaped uri)."""
    return media != "video" or ("raw_path" in batch and bool(batch["raw_path"][i]))


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # judged by _file_row, as fs.cat_ranges returns its errors
        return e


def _file_row(batch: Batch, i: int, data) -> Dict[str, Any]:
    row = _sample(batch, i)
    if isinstance(data, BaseException) and not _sample_fault(data):
        # no cause attached: it quotes the real URI
        raise StoreError(f"{batch['uri'][i]}: {type(data).__name__}: {data}") from None
    if isinstance(data, BaseException):
        return {**row, "data": b"", **_read_error(data)}
    return {**row, "data": data, **OK}


def _read_tar(
    shard: Dict[str, Any], fs_path, extensions: frozenset, skip: frozenset, limits
) -> Iterator[Dict[str, Any]]:
    """Stream a webdataset shard (shards.py); samples in `skip` (committed by an earlier run)
    are passed over unread. A shard that makes no progress for the time limit ends with a
    timeout row under its own id.

    The shard is one unit: its last row, yielded once the stream ends, says how many it has.
    """
    timeout_s, _ = limits
    count, last = 0, None
    for row in bounded(_tar_rows(shard, fs_path, extensions, skip, limits), timeout_s):
        if row is TIMED_OUT:
            error = _read_error(timeout_error(f"{shard['uri']} after {count} samples", timeout_s))
            row = {**shard, "data": b"", **error}
        if last is not None:
            yield last
        count, last = count + 1, row
    if last is not None:
        last["unit_rows"] = count
        yield last


def _tar_rows(
    shard: Dict[str, Any], fs_path, extensions: frozenset, skip: frozenset, limits
) -> Iterator[Dict[str, Any]]:
    fs, path = fs_path
    try:
        with fs.open(path, "rb") as f:
            for group in tar_rows(shard, f, limits[1], skip):
                yield _tar_sample(shard, group, extensions)
    except Exception as e:  # unreadable shard: one error row for what is left
        if not _sample_fault(e):
            raise StoreError(f"{shard['uri']}: {type(e).__name__}: {e}") from None  # no cause: it quotes the real URI
        yield {**shard, "data": b"", **_read_error(e)}


def _tar_sample(shard: Dict[str, Any], group: Dict[str, Any], extensions: frozenset) -> Dict[str, Any]:
    if group["sample_id"] == shard["sample_id"]:  # the shard's own row: where it stopped
        return {**shard, "data": b"", **_read_error(group["error"])}
    members = group["members"]
    row = {
        **shard,
        "sample_id": group["sample_id"],
        "uri": f"{shard['uri']}#{group['key']}",
        "label": _member_label(members),
        "unit_rows": 0,
    }
    if group["error"] is not None:
        return {**row, "data": b"", **_read_error(group["error"])}
    media_ext = next((e for e in members if e.rsplit(".", 1)[-1] in extensions), None)
    if media_ext is None:
        kind = "image" if extensions is IMAGE_EXTENSIONS else "video"
        err = LookupError(f"no {kind} member among {sorted(members)}")
        return {**row, "data": b"", **_read_error(err)}
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
