"""Files on a store (local disk or an object store, through fsspec): `filesystem()` opens a URI for
every stage, whole-or-nothing writes, publishing that never replaces a file, and listing the
Parquet files a reader sees."""
from __future__ import annotations

import errno
import io
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .. import faults


def filesystem(uri: str, storage_options: Dict[str, Any]) -> Tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path


def with_connections(uri: str, storage_options: Dict[str, Any], n: int) -> Dict[str, Any]:
    """Storage options that let one S3 client keep `n` requests in flight: botocore's connection pool
    holds 10 by default, which would queue a threaded committer's publishes behind each other. A
    value the user set is kept."""
    if not uri.startswith(("s3://", "s3a://")):
        return storage_options
    config = dict(storage_options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", n)
    return {**storage_options, "config_kwargs": config}


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI another process can open with the same storage options."""
    return fs.unstrip_protocol(path)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomic(fs, path: str, data: bytes, exclusive: bool = False) -> None:
    """Make `path` appear whole or not at all; `exclusive`: only if nothing is there yet, else
    FileExistsError (local: a hard link, which cannot replace; object stores: If-None-Match)."""
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")  # readers skip dot files
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            faults.point("write", path)  # the fault-injection tests fail a write half done
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_then_unlink(tmp, path)
        else:
            os.replace(tmp, path)
    else:
        faults.point("write", path)
        # an object store publishes a key only when its PUT completes; "create" sends If-None-Match: *
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")


def put_atomic(fs, local: str, path: str) -> None:
    """write_atomic for a local file, streamed rather than held in memory (an object store
    publishes the key when its upload completes)."""
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")  # readers skip dot files
        shutil.copyfile(local, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.point("write", path)
        os.replace(tmp, path)
    else:
        faults.point("write", path)
        fs.put_file(local, path)


def _link_then_unlink(src: str, dst: str) -> None:
    """Rename src to dst unless dst exists: FileExistsError (a temporary src is removed, a staged
    one kept). A hard link never replaces a file; on a file system without hard links (some FUSE
    and SMB mounts) it is check-then-rename, a small window the committer's lease covers."""
    try:
        try:
            os.link(src, dst)
        except OSError as e:
            if isinstance(e, FileExistsError) or e.errno not in _NO_LINKS:
                raise
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "file exists", dst) from None
            os.replace(src, dst)
            return
    except FileExistsError:
        if os.path.basename(src).startswith(".tmp-"):
            os.unlink(src)
        raise
    os.unlink(src)


_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


ROW_GROUP_BYTES = 4 << 20  # at most: readers split work by row group; the loader read larger ones slower


def parquet_bytes(table: pa.Table, row_group_bytes: Optional[int] = None) -> bytes:
    """A Parquet file of `table`; `row_group_bytes`: row groups of about that many bytes of the
    table (None: pyarrow's, one group up to 1Mi rows)."""
    buf = io.BytesIO()
    # Dictionary encoding only where values repeat (ids, labels, splits): tried on a float feature
    # column it falls back to plain encoding anyway, and leaves pages that every reader decodes
    # about 5x slower (bench/README.md, the loader).
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_binary(f.type)]
    rows = None
    if row_group_bytes and len(table):
        rows = max(1, -(-len(table) * row_group_bytes // max(1, table.nbytes)))
    pq.write_table(table, buf, compression="zstd", use_dictionary=strings, row_group_size=rows)
    return buf.getvalue()


def same_bytes(fs, path: str, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data` (one small request, then one read only when
    the sizes agree): how an exclusive write tells its own retried request from another file."""
    try:
        if int(fs.info(path).get("size") or 0) != len(data):
            return False
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False


def move(fs, src: str, dst: str) -> None:
    if is_local(fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    else:
        fs.copy(src, dst)  # server-side; the new key appears whole
        fs.rm(src)


def publish(fs, src: str, dst: str) -> None:
    """Move a staged file to its published name, never onto a file there (FileExistsError)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _link_then_unlink(src, dst)
    else:  # CopyObject takes no If-None-Match: check, then copy, under the lease's single writer
        fs.invalidate_cache(dst)
        if fs.exists(dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst)
        move(fs, src, dst)


def parquet_files(fs, folder: str) -> List[str]:
    """Published Parquet files under a folder (readers skip names starting with . or _)."""
    return sorted(parquet_sizes(fs, folder))


def parquet_sizes(fs, folder: str) -> Dict[str, int]:
    """{path: bytes} of the published Parquet files under a folder, from one listing."""
    fs.invalidate_cache()  # all of it: s3fs answers for a file from its parent's cached listing
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {p: int(info.get("size") or 0) for p, info in found.items()
            if p.endswith(".parquet") and not _hidden(p[len(folder):])}


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


READERS = 16  # files read at once: on an object store each is a footer's and a column's round trips


def read_column(fs, files: List[str], column: str) -> pa.ChunkedArray:
    """`column` of every file, in the files' order: each file opened once (its footer and the
    column's pages read, nothing else; no read-ahead cache), READERS at a time."""
    if not files:
        return pa.chunked_array([], pa.string())

    def one(path: str) -> pa.ChunkedArray:
        with fs.open(path, "rb", cache_type="none") as f:
            return pq.read_table(f, columns=[column])[column]

    with ThreadPoolExecutor(min(READERS, len(files))) as pool:
        parts = list(pool.map(one, files))
    return pa.chunked_array([c for p in parts for c in p.chunks], parts[0].type)
