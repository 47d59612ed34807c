"""What a listing may plan: regular files only, names as valid UTF-8, nothing outside the source.

Image and video folders on a local disk are walked here rather than by fsspec's `find`, which
returns FIFOs, sockets and symlinked folders as files (a FIFO then blocks its read forever).
Manifest URIs are confined to the manifest's own folder and scheme unless `source.allow_uris`
widens it: a manifest row must not read `/etc/shadow` or fetch `http://127.0.0.1/...` for whoever
wrote it. Refusals are planned as rows that the read stage turns into error rows unread.
"""
from __future__ import annotations

import os
import posixpath
import stat
from typing import Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import unquote, urlsplit

REFUSED_URI = "outside the source's folder and source.allow_uris; not read"
REFUSED_LINK = "a symlink leaving source.uri; not followed (source.follow_symlinks: true reads it)"


class ListingError(RuntimeError):
    """A folder under the source cannot be listed (plan.py makes it a SourceError)."""


class Entry(NamedTuple):
    path: str  # as the OS names it (a str that may hold surrogate escapes of non-UTF-8 bytes)
    refused: str = ""  # why it is planned as an error row and never read; "" to read it


def utf8(name: str) -> str:
    """A valid UTF-8 form of an OS name: bytes that are not UTF-8 become `\\xNN` (a name that
    already spells `\\xNN` could collide; planning refuses such a pair by name)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def raw_path(path: str) -> Optional[bytes]:
    """The path's bytes when its name is not valid UTF-8 (the read stage opens these), else None."""
    return None if utf8(path) == path else path.encode("utf-8", "surrogateescape")


def walk_local(root: str, follow_symlinks: bool) -> Iterator[Entry]:
    """Regular files under `root`, sorted. A symlink whose target leaves the root is an Entry
    refused, unless follow_symlinks; a symlinked folder inside the root is not entered (its files
    are listed under their real path). FIFOs, sockets and devices are not samples: never listed."""
    real_root = os.path.realpath(root)
    yield from _walk(root, real_root, follow_symlinks, {real_root})


def walk_store(fs, root: str) -> Iterator[Entry]:
    """Files under `root` on an object store, a folder's listing at a time (fsspec's `walk`), each
    folder's listing dropped from the filesystem's cache once it is planned: the driver holds the
    largest folder's details (~3 KB an object), not the whole store's as `find(detail=True)` did.
    Object stores have no links, FIFOs or devices; "directory" entries are not files."""
    for folder, _, files in fs.walk(root, detail=True):
        for name in sorted(files):
            if files[name].get("type") == "file":
                yield Entry(files[name]["name"])
        fs.invalidate_cache(folder)


def _walk(folder: str, real_root: str, follow: bool, seen: set) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (NotADirectoryError, FileNotFoundError):  # gone while listing
        return
    except PermissionError:  # its samples would vanish unsaid: the user can fix it, or move it out
        raise ListingError(f"cannot list {utf8(folder)}: permission denied") from None
    for e in entries:
        if not e.is_symlink():
            if e.is_dir(follow_symlinks=False):
                yield from _walk(e.path, real_root, follow, seen)
            elif e.is_file(follow_symlinks=False):
                yield Entry(e.path)
            continue
        target = os.path.realpath(e.path)
        inside = _within(target, real_root)
        if not inside and not follow:
            yield Entry(e.path, REFUSED_LINK)
            continue
        kind = _kind(target)
        if kind == "dir" and follow and target not in seen:  # seen: a link to an ancestor loops
            yield from _walk(e.path, real_root, follow, seen | {target})
        elif kind == "file":
            yield Entry(e.path)
        elif kind == "missing":  # dangling: planned, so its read error names it
            yield Entry(e.path)


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def confine(target: str, roots: List[str]) -> bool:
    """Whether the URI `target` lies under one of `roots` (URIs or local paths): Confinement(roots)
    for one target; a caller with many targets builds the Confinement once."""
    return Confinement(roots).allows(target)


class Confinement:
    """Targets checked against `roots` resolved once (on the local disk a realpath each: planning a
    manifest of a million rows resolved its roots again for every row, 80% of its time).

    A target passes when it lies under a root, compared after normalising `..` and, on the local
    disk, resolving symlinks; scheme and host must match. A URI is also compared percent-decoded (a
    web client, and fsspec for file://, decode `%2e%2e`); fsspec's chained URIs (`a::b`), control
    characters and a web URI's backslashes never pass, and nothing passes without roots."""

    def __init__(self, roots: List[str]):
        try:
            self.roots = [_canonical(r) for r in roots]
        except ValueError:  # a root urlsplit cannot take (a bad IPv6 host): nothing passes
            self.roots = []

    def allows(self, target: str) -> bool:
        if not self.roots or "::" in target or any(ord(c) < 32 for c in target):
            return False
        forms = [target]
        if "://" in target:
            if "\\" in target and not target.lower().startswith(("file://", "local://")):
                return False
            decoded = unquote(target)
            if decoded != target:
                forms.append(decoded)
        try:
            return all(any(t[:2] == r[:2] and _within(t[2], r[2]) for r in self.roots)
                       for t in map(_canonical, forms))
        except ValueError:  # a URI urlsplit cannot take (a bad IPv6 host)
            return False


def _canonical(uri: str) -> Tuple[str, str, str]:
    """(scheme, host[:port], normalised path): user-info, query and fragment play no part."""
    if "://" not in uri:
        return "file", "", os.path.realpath(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("file", "local"):
        return "file", "", os.path.realpath(uri.split("://", 1)[1] or "/")
    host = parts.netloc.rsplit("@", 1)[-1].lower()  # an http host:port, or a bucket
    return scheme, host, posixpath.normpath("/" + parts.path.lstrip("/"))
