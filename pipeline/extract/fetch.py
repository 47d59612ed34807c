"""Bounded reads: a time limit on every read, a size limit on every sample's bytes.

A read can block for good: a FIFO opened for reading, a hung NFS mount, an HTTP server that
never answers. `bounded` runs the reading generator in a daemon thread and gives up on it when no
item comes within the limit. Python cannot interrupt a thread blocked in open() or read(), so a
stuck thread is abandoned: as a daemon it never keeps the worker process alive, and it holds
nothing but its own file handle.
"""
from __future__ import annotations

import os
import queue
import stat
import threading
from typing import Any, Iterator, List, Union

from .. import faults
from ..errors import ReadFailure
from .shards import NotAFile, TooLarge


class URIRefused(ReadFailure):
    """A planned URI outside what the job may read (a manifest's row): one error row, no request."""

    error_type = "refused"


class ReadTimeout(ReadFailure):
    error_type = "timeout"


TIMED_OUT = object()
_END = object()


def bounded(items: Iterator[Any], timeout_s: float) -> Iterator[Any]:
    """Yield what `items` yields, produced in a daemon thread; TIMED_OUT, then stop, if the next
    item takes longer than timeout_s. The producer reads ahead by one item at most."""
    q: "queue.Queue" = queue.Queue(maxsize=1)
    gone = threading.Event()  # the consumer stopped listening

    def put(item) -> bool:
        while not gone.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # raised in the consumer's thread
            put((None, e))

    threading.Thread(target=produce, name="featurize-read", daemon=True).start()
    try:
        while True:
            try:
                item, exc = q.get(timeout=timeout_s)
            except queue.Empty:
                yield TIMED_OUT
                return
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        gone.set()


def read_local(path: str, cap: int, keep: bool = True) -> bytes:
    """A local file's bytes (b"" when not `keep`: the decoder opens it), refusing what is not a
    regular file (a FIFO would block) and what is over `cap`, before reading a byte of it."""
    faults.point("read", path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(f"{path} is not a regular file")
    if not keep:
        return b""
    if st.st_size > cap:
        raise TooLarge(f"{st.st_size} bytes, over source.max_sample_bytes ({cap})")
    with open(path, "rb") as f:
        data = f.read(cap + 1)  # it may have grown since the stat
    if len(data) > cap:
        raise TooLarge(f"over source.max_sample_bytes ({cap})")
    return data


def read_remote(fs, paths: List[str], cap: int) -> List[Union[bytes, BaseException]]:
    """At most cap + 1 bytes of each file, fetched concurrently where the store allows (s3fs)."""
    for p in paths:
        faults.point("read", p)
    out = fs.cat_ranges(list(paths), 0, cap + 1, on_error="return")
    gone = (FileNotFoundError, PermissionError)
    out = [_unranged(fs, p, cap) if isinstance(d, BaseException) and not isinstance(d, gone) else d
           for p, d in zip(paths, out)]
    return [TooLarge(f"over source.max_sample_bytes ({cap})") if isinstance(d, bytes) and len(d) > cap else d
            for d in out]


def _unranged(fs, path: str, cap: int) -> Union[bytes, BaseException]:
    """A ranged read that failed, tried once more whole: S3 answers a range on an empty object
    with 416 InvalidRange. Its size is checked first, so the cap still holds."""
    try:
        size = fs.size(path)
        if size is not None and size > cap:
            return TooLarge(f"{size} bytes, over source.max_sample_bytes ({cap})")
        return fs.cat_file(path)
    except Exception as e:  # judged by the caller, as cat_ranges' errors are
        return e


def timeout_error(what: str, timeout_s: float) -> ReadTimeout:
    return ReadTimeout(f"{what}: no data within source.read_timeout_s ({timeout_s:g} s)")


