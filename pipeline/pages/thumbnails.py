"""Small JPEG thumbnails as data URIs, read from a sample's URI: a local path, a file:// or object
store URI (fsspec, as the job read it), a webdataset tar member (`shard.tar#key`, as read.py names
it), or a video (one frame: from the middle, or at a clip's start).

Every read is bounded (bytes read, pixels decoded) and every failure becomes a placeholder (an
inline SVG that says why, credentials masked), never an exception out of a page. Hits are rows the
extraction already decoded, so a video is decoded in-process here (PyAV), not in an isolated child;
it opens no other file or URL a video's bytes may name. `thumbnails(..., roots=)` reads only under
those roots (allowed.py): the pages pass the table's source, so a table's `uri` cannot make a page
read anything else.
"""
from __future__ import annotations

import base64
import functools
import io
import queue
import re
import textwrap
import threading
import time
from html import escape, unescape
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote, unquote

from PIL import Image, ImageOps

from ..extract.decode import open_image, to_rgb
from ..extract.plan import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from ..extract.shards import tar_rows
from ..output.store import filesystem
from ..redact import logger, redact_text
from .allowed import NOT_READ, readable

log = logger(__name__)

MAX_IMAGE_BYTES = 64 << 20  # a larger file is not read for a thumbnail
MAX_VIDEO_BYTES = 256 << 20  # what PyAV may read of one video (it seeks: usually far less)
MAX_SHARD_SCAN_BYTES = 1 << 30  # how far into a tar shard a member is looked for
MAX_MEMBER_BYTES = 64 << 20
WORKERS = 8
TIMEOUT_S = 120.0  # for all the thumbnails of one page
_TAR_MEMBER = re.compile(r"^(?P<shard>.+?\.(?:tar|tar\.gz|tgz|tar\.bz2|tar\.xz))#(?P<key>.+)$", re.I)


class ThumbnailError(Exception):
    """Why a sample has no thumbnail (shown on its placeholder)."""


def thumbnail(uri: str, storage_options: Optional[Dict[str, Any]] = None, size: int = 160,
              start_s: Optional[float] = None) -> str:
    """A `data:image/jpeg;base64,...` thumbnail of the image or video at `uri` (its longer side
    `size` pixels), or a placeholder SVG data URI naming the reason; never raises. `uri` is read
    as given: a URI from a table goes through `thumbnails(..., roots=)`."""
    try:
        member = _TAR_MEMBER.match(uri or "")
        if member:
            found = _from_shard(member["shard"], {member["key"]}, storage_options or {}, size, {member["key"]: start_s})
            return found[member["key"]]
        return _from_file(uri, storage_options or {}, size, start_s)
    except Exception as e:  # a page shows every hit; one unreadable file shows why
        return placeholder(_reason(e), size)


def thumbnails(items: Sequence[Tuple[str, Optional[float]]], storage_options: Optional[Dict[str, Any]] = None,
               size: int = 160, workers: int = WORKERS, timeout_s: float = TIMEOUT_S,
               roots: Optional[Sequence[str]] = None) -> List[str]:
    """Thumbnails of many (uri, start_s) at once, in order, read by a pool of threads; the members
    of one tar shard are all taken in one pass over it. What is not done within `timeout_s` (a
    store that does not answer) gets a placeholder saying so. `roots`: a URI (a tar member's
    shard) outside all of them is not opened, and gets a placeholder saying so; None: read any."""
    options = storage_options or {}
    out: List[Optional[str]] = [None] * len(items)
    shards: Dict[str, Dict[str, List[int]]] = {}  # shard -> key -> positions
    files: List[int] = []
    for i, (uri, _) in enumerate(items):
        m = _TAR_MEMBER.match(uri or "")
        if uri and roots is not None and not readable(m["shard"] if m else uri, roots):
            out[i] = placeholder(NOT_READ, size)
        elif m:
            shards.setdefault(m["shard"], {}).setdefault(m["key"], []).append(i)
        else:
            files.append(i)

    def opts(uri: str) -> Dict[str, Any]:
        return options if roots is None else stay(uri, options)

    def one_file(i: int) -> None:
        out[i] = thumbnail(items[i][0], opts(items[i][0]), size, items[i][1])

    def one_shard(shard: str) -> None:
        keys = shards[shard]
        starts = {k: items[pos[0]][1] for k, pos in keys.items()}
        try:
            found = _from_shard(shard, set(keys), opts(shard), size, starts)
        except Exception as e:
            found = {k: placeholder(_reason(e), size) for k in keys}
        for key, positions in keys.items():
            for i in positions:
                out[i] = found[key]

    tasks = [functools.partial(one_file, i) for i in files] + [functools.partial(one_shard, s) for s in shards]
    _run(tasks, workers, timeout_s)
    return [o or placeholder(f"not read within {timeout_s:g} s", size) for o in list(out)]


def stay(uri: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The options for a confined read: a web server inside the roots may not redirect it elsewhere
    (fsspec's HTTP client follows redirects: to an internal host, a metadata endpoint ...)."""
    if uri.split("://", 1)[0].lower() in ("http", "https"):
        return {**options, "allow_redirects": False}
    return options


def _run(tasks: List[Callable[[], None]], workers: int, timeout_s: float) -> None:
    """Run `tasks` on daemon threads, waiting at most `timeout_s` in all: a read that hangs is left
    behind (a daemon thread holds neither the page nor the process's exit, as a pool's would)."""
    todo: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)

    def work() -> None:
        while True:
            try:
                todo.get_nowait()()
            except queue.Empty:
                return

    threads = [threading.Thread(target=work, name="featurize-thumbnail", daemon=True)
               for _ in range(max(1, min(workers, len(tasks))))] if tasks else []
    for t in threads:
        t.start()
    end = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))


def placeholder(reason: str, size: int = 160) -> str:
    """An SVG data URI: a grey square with the reason written on it (credentials masked)."""
    reason = redact_text(str(reason)) or "no thumbnail"
    lines = textwrap.wrap(reason, width=max(12, int(size / 6.5)))[: max(2, size // 18)]
    text = "".join(f'<tspan x="6" dy="1.3em">{escape(line)}</tspan>' for line in lines)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}">'
           f"<title>{escape(reason)}</title>"
           f'<rect width="100%" height="100%" fill="#e5e5e5" stroke="#b0b0b0"/>'
           f'<text y="4" font-family="sans-serif" font-size="11" fill="#555">{text}</text></svg>')
    return "data:image/svg+xml;charset=utf-8," + quote(svg, safe="")


def is_placeholder(uri: str) -> bool:
    return uri.startswith("data:image/svg+xml")


def placeholder_reason(uri: str) -> str:
    """The reason a placeholder states (for the image's alt text)."""
    found = re.search(r"<title>(.*?)</title>", unquote(uri.split(",", 1)[-1]), re.S)
    return unescape(found.group(1)) if found else ""


def _reason(e: BaseException) -> str:
    text = str(e) if isinstance(e, ThumbnailError) else f"{type(e).__name__}: {e}"
    return redact_text(text)[:300]


def _is_video(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS


def _from_file(uri: str, options: Dict[str, Any], size: int, start_s: Optional[float]) -> str:
    if not uri:
        raise ThumbnailError("no URI")
    fs, path = filesystem(uri, options)
    if _is_video(path):
        with fs.open(path, "rb") as f:
            return _video_thumbnail(_Budget(f, MAX_VIDEO_BYTES), size, start_s)
    with fs.open(path, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ThumbnailError(f"over {MAX_IMAGE_BYTES >> 20} MiB: not read for a thumbnail")
    return _image_thumbnail(data, size)


def _from_shard(shard: str, keys: set, options: Dict[str, Any], size: int,
                starts: Dict[str, Optional[float]]) -> Dict[str, str]:
    """One pass over a tar shard (bounded), stopping once every wanted key is found."""
    fs, path = filesystem(shard, options)
    found: Dict[str, str] = {}
    with fs.open(path, "rb") as f:
        stream = _Budget(f, MAX_SHARD_SCAN_BYTES)
        try:
            for group in tar_rows({"sample_id": shard}, stream, MAX_MEMBER_BYTES, frozenset()):
                key = group.get("key")
                if key not in keys or key in found:
                    continue
                found[key] = _member_thumbnail(group, size, starts.get(key))
                if len(found) == len(keys):
                    break
        except _Budget.Exceeded:
            pass
    why = f"not found in the first {MAX_SHARD_SCAN_BYTES >> 20} MiB of its shard"
    return {k: found.get(k) or placeholder(why, size) for k in keys}


def _member_thumbnail(group: Dict[str, Any], size: int, start_s: Optional[float]) -> str:
    if group.get("error") is not None:
        return placeholder(_reason(group["error"]), size)
    for ext, data in group["members"].items():
        last = ext.rsplit(".", 1)[-1].lower()
        try:
            if last in VIDEO_EXTENSIONS:
                return _video_thumbnail(io.BytesIO(data), size, start_s)
            if last in IMAGE_EXTENSIONS:
                return _image_thumbnail(data, size)
        except Exception as e:
            return placeholder(_reason(e), size)
    return placeholder(f"no image or video among {sorted(group['members'])}", size)


def _image_thumbnail(data: bytes, size: int) -> str:
    with open_image(data) as img:  # refuses a decompression bomb from its header
        img.seek(0)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # libjpeg decodes at 1/2 .. 1/8 scale
        rgb = to_rgb(ImageOps.exif_transpose(img))
        rgb.thumbnail((size, size))
    return _jpeg(rgb)


def _video_thumbnail(source, size: int, start_s: Optional[float]) -> str:
    """A frame at `start_s`, else from the middle of the video (its first when it has no duration)."""
    import av

    # no protocol for what a container names (an HLS or DASH playlist's segments, a concat list):
    # the bytes given are all a thumbnail reads
    with av.open(source, options={"protocol_whitelist": "none"}) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
            container.duration / av.time_base if container.duration else 0.0)
        at = max(0.0, start_s) if start_s is not None else duration / 2
        if at > 0 and stream.time_base:
            container.seek(int(at / stream.time_base), stream=stream, backward=True, any_frame=False)
        frame = None
        for i, frame in enumerate(container.decode(stream)):
            if frame.time is None or frame.time >= at - 1e-3 or i >= 500:
                break
        if frame is None:
            raise ThumbnailError("no frame could be decoded")
        img = frame.to_image()
    img.thumbnail((size, size))
    return _jpeg(img)


def _jpeg(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Budget(io.RawIOBase):
    """A file object that stops reading after `limit` bytes: a hostile or huge file cannot make a
    thumbnail read more."""

    class Exceeded(ThumbnailError):
        pass

    def __init__(self, f, limit: int):
        self.f, self.limit, self.used = f, limit, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.f.seekable() if hasattr(self.f, "seekable") else True

    def read(self, n: int = -1) -> bytes:
        if self.used >= self.limit:
            raise _Budget.Exceeded(f"read over {self.limit >> 20} MiB for one thumbnail")
        n = self.limit - self.used if n is None or n < 0 else min(n, self.limit - self.used)
        data = self.f.read(n)
        self.used += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()
