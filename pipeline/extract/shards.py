"""Streaming a webdataset tar shard into samples, accounting for every member.

webdataset groups CONSECUTIVE members sharing a key (the path up to the first dot of the base
name) into one sample. What a shard may hold besides, and what becomes of it:
- a key that comes back later in the shard (`a.jpg, b.jpg, a.png`), or a member name repeated
  inside a group (`a.jpg, a.jpg`): the later group is a second sample with that key; it becomes
  an error row `duplicate_key` under the id `<shard>/<key>.dup<n>` (n = 2, 3 ...). A key's base
  name never holds a dot, so no real key can take that id.
- links, devices and FIFOs: the group they are in becomes an error row `not_a_file`; folders are
  not samples and are passed over.
- a member larger than source.max_sample_bytes: its group is an error row `too_large`, and the
  member's bytes are skipped unread (tarfile streams past them) whatever the compression ratio.
- a shard that stops without its end-of-archive block (cut inside a header, inside a member's
  data, or right after the last member): the group cut short is an error row `truncated`, and the
  shard's own id gets one more row saying where the stream stopped, for members that may follow.
Non-UTF-8 member names are escaped (listing.utf8) before the key is taken.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import posixpath
import tarfile
import zlib
from typing import Any, Dict, Iterator, Optional

from ..errors import ReadFailure
from .listing import utf8


class DuplicateKey(ReadFailure):
    error_type = "duplicate_key"


class NotAFile(ReadFailure):
    error_type = "not_a_file"


class TooLarge(ReadFailure):
    error_type = "too_large"


class Truncated(ReadFailure):
    error_type = "truncated"


BROKEN = (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)  # a cut or corrupt stream


class _Tracked(tarfile.TarInfo):
    """Records why tarfile stopped: it takes a cut or broken header for the end of the archive."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stopped_by = e
            raise


def split_key(name: str):
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


class _Group:
    """The members of one sample, or why it cannot be one."""

    def __init__(self, sample_id: str, key: str, error: Optional[Exception], skipped: bool):
        self.sample_id, self.key, self.error, self.skipped = sample_id, key, error, skipped
        self.members: Dict[str, bytes] = {}
        self.exts: set = set()  # every member's, read or not: a repeated one starts a new group

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, ext: str, cap: int) -> None:
        self.exts.add(ext)
        if self.skipped or self.error is not None:
            return  # its bytes are never read: tarfile streams past them
        if not info.isfile():
            kind = "symlink" if info.issym() else "hardlink" if info.islnk() else "device or FIFO"
            self.error = NotAFile(f"member {name} is a {kind}, not a regular file")
        elif info.size > cap:
            self.error = TooLarge(f"member {name} holds {info.size} bytes, over source.max_sample_bytes ({cap})")
        else:
            try:
                self.members[ext] = tar.extractfile(info).read(cap)
            except BROKEN as e:
                self.error = Truncated(f"the shard ends inside member {name}, at byte {info.offset_data} "
                                       f"of its tar stream ({e})")
                raise


def tar_rows(shard: Dict[str, Any], fileobj, cap: int, skip: frozenset) -> Iterator[Dict[str, Any]]:
    """{sample_id, key, members, error} for every member group of the shard, in order, then one
    for the shard itself if it did not end cleanly. Groups in `skip` (committed by an earlier run)
    are passed over unread but still counted, so duplicate ids come out the same on every run."""
    name_of_shard = str(shard["sample_id"])
    stream = _Inflated(fileobj)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", tarinfo=_Tracked)
    except tarfile.ReadError as e:  # not even a first header
        if stream.error is None:
            raise
        raise Truncated(f"its compressed stream is cut or corrupt ({stream.error})") from e
    with tar:
        groups: Dict[str, int] = {}  # key -> groups with it so far
        group: Optional[_Group] = None
        last, number, stop = "", 0, None
        members = iter(tar)
        while True:
            try:
                info = next(members, None)
            except BROKEN as e:  # data of the last member cut
                stop = Truncated(f"the shard ends inside member {last}'s data ({e})")
                break
            if info is None:
                break
            number += 1
            if info.isdir():
                continue
            name = utf8(info.name)
            key, ext = split_key(name)
            if group is None or key != group.key or ext in group.exts:
                if group is not None and not group.skipped:
                    yield _group_row(group)
                group = _start(name_of_shard, key, number, name, groups, skip)
            last = name
            try:
                group.add(tar, info, name, ext, cap)
            except BROKEN:
                stop = group.error
                break
        if group is not None and not group.skipped:
            yield _group_row(group)
        end = getattr(tar, "stopped_by", None)
        if stop is None and not isinstance(end, tarfile.EOFHeaderError):
            where = f"after member {last}" if last else "before its first member"
            why = "its end-of-archive block is missing" if isinstance(end, tarfile.EmptyHeaderError) else str(end)
            if stream.error is not None:
                why = f"its compressed stream is cut or corrupt ({stream.error})"
            stop = Truncated(f"the shard stops at byte {tar.offset}, {where}: {why}; "
                             "members after it, if any, are lost")
        if stop is not None:
            yield {"sample_id": name_of_shard, "key": "", "members": {}, "error": stop}


class _Inflated:
    """The shard's tar stream. Not tarfile's "r|*": it inflates a whole read buffer at once, so
    10 KB of a compressed run of zeros became 10 MB in memory; these readers inflate only as much
    as is asked for. A compressed stream that is cut or corrupt ends there, as a cut tar would
    (tarfile then stops at a broken header); `error` keeps why."""

    def __init__(self, f):
        head = f.read(6)
        try:
            f.seek(0)
        except (OSError, ValueError):  # a stream that cannot seek (HTTP without a length)
            f = _Prefixed(head, f)
        self.error: Optional[Exception] = None
        self.f = (gzip.GzipFile(fileobj=f, mode="rb") if head[:2] == b"\x1f\x8b" else bz2.BZ2File(f)
                  if head[:3] == b"BZh" else lzma.LZMAFile(f) if head == b"\xfd7zXZ\x00" else None)
        self.read1 = self.f.read1 if self.f is not None else f.read  # read1: what was inflated before a cut

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            return self.read1(n)
        except BROKEN as e:
            self.error = e
            return b""
        except OSError as e:
            # bz2 says a corrupt stream with a bare OSError; the store's own failures (raised by
            # the file below) keep theirs, so only this exact one is the data's fault
            if not (isinstance(self.f, bz2.BZ2File) and e.errno is None and str(e) == "Invalid data stream"):
                raise
            self.error = e
            return b""


class _Prefixed:
    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
        return out


def _start(shard: str, key: str, number: int, name: str, groups: Dict[str, int], skip: frozenset) -> _Group:
    n = groups[key] = groups.get(key, 0) + 1
    sample_id = f"{shard}/{key}" if n == 1 else f"{shard}/{key}.dup{n}"
    error = None
    if n > 1:
        error = DuplicateKey(f"key {key} appears again at member {number} ({name}), after its first sample: "
                             f"webdataset groups consecutive members, so this is sample {n} with that key")
    return _Group(sample_id, key, error, sample_id in skip)


def _group_row(group: _Group) -> Dict[str, Any]:
    return {"sample_id": group.sample_id, "key": group.key, "members": group.members, "error": group.error}
