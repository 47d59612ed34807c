"""Where an index lives and how it is saved and loaded, on local disk or an object store (fsspec).

    OUT/_index/<column>/meta.json          the pointer: the current generation and what it holds
    OUT/_index/<column>/<generation>/      _featurize_generation (the marker), index.faiss,
                                           rows.parquet, meta.json (a copy)

A build writes a new generation folder whole, then replaces meta.json in one atomic write
(write_atomic: a rename on disk, one PUT on an object store). A reader reads meta.json first and
then the files it names, so it never sees half of one build and half of another, and two builds
running at once each publish a whole index (the last one wins) without a lock. A build killed
midway leaves an unnamed folder and the previous index in place; later builds remove folders no
meta.json names once they are older than GRACE_S (a reader may still be loading one), and only
folders holding the marker a build writes first: never a folder by its name alone.

The column and the generation named by meta.json become parts of paths: both must be plain names
(pipeline.names), so that neither a table's column nor a crafted meta.json reaches outside OUT.
A meta.json or generation that cannot be read back is `IndexDamaged`: `featurize index` rebuilds it.
"""
from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any, Dict, Optional, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import IndexDamaged
from ..names import is_plain, plain_name
from ..output.store import parquet_bytes, write_atomic
from ..redact import logger, redact_strings, redact_text
from .checks import number
from .options import METRICS

INDEX_DIR, META, INDEX_FILE, ROWS_FILE = "_index", "meta.json", "index.faiss", "rows.parquet"
MARKER = "_featurize_generation"  # written first into every generation folder: what _clean may remove
GRACE_S = 600.0
log = logger(__name__)


def index_dir(root: str, column: str) -> str:
    return f"{root}/{INDEX_DIR}/{plain_name(column, 'column (the index folder is named after it)')}"


def _shown(root: str, column: str, uri: Optional[str]) -> str:
    return redact_text(f"{(uri or root).rstrip('/')}/{INDEX_DIR}/{column}")


def read_meta(fs, root: str, column: str, uri: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The published meta.json (None: no index), checked; IndexDamaged when it cannot be used."""
    path = f"{index_dir(root, column)}/{META}"
    fs.invalidate_cache()
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder where the file should be, no permission
        raise IndexDamaged(_shown(root, column, uri), f"meta.json cannot be read: {_first_line(e)}") from None
    try:
        return check_meta(json.loads(raw), column)
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or not what a build writes
        raise IndexDamaged(_shown(root, column, uri), f"meta.json: {_first_line(e)}") from None


def check_meta(meta: Any, column: str) -> Dict[str, Any]:
    """meta.json as a build writes it, or ValueError saying what is not."""
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    if not is_plain(meta.get("generation")):
        raise ValueError(f"generation {str(meta.get('generation'))[:80]!r} is not a plain name")
    if meta.get("column") != column or meta.get("metric") not in METRICS:
        raise ValueError("column or metric missing or not this index's")
    for key in ("dim", "rows"):
        if not _count(meta.get(key)):
            raise ValueError(f"{key} is not a count")
    files = meta.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                              and _count(f.get("rows")) for f in files):
        raise ValueError("files is not a list of {path, rows}")
    if not all(_inside(f["path"]) for f in files):
        raise ValueError("a file path leaves the table's folder")
    center = meta.get("center")
    if center is not None and not (isinstance(center, list) and len(center) == meta["dim"]
                                   and all(number(v) for v in center)):
        raise ValueError("center is not a vector of the index's dimension")
    search = meta.get("search") or {}
    if not (isinstance(search, dict) and len(search) <= 1
            and all(k in ("nprobe", "efSearch") and _count(v) and v >= 1 for k, v in search.items())):
        raise ValueError("search is not one of nprobe, efSearch")
    return meta


def _inside(rel: str) -> bool:
    """A path relative to OUT that stays inside it (the table's own files are such paths)."""
    parts = rel.split("/")
    return bool(rel) and "://" not in rel and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load(fs, root: str, column: str, uri: Optional[str] = None) -> Optional[Tuple[Dict[str, Any], Any, pa.Table]]:
    """(meta, faiss index, rows) of the current generation, or None when there is no index;
    IndexDamaged when what meta.json names cannot be read back whole. A generation removed between
    reading meta.json and its files (a build cleaning up right then) is retried once with the newer meta.json."""
    for attempt in range(2):
        meta = read_meta(fs, root, column, uri)
        if meta is None:
            return None
        folder = f"{index_dir(root, column)}/{meta['generation']}"
        try:
            raw = fs.cat_file(f"{folder}/{INDEX_FILE}")
            rows_raw = fs.cat_file(f"{folder}/{ROWS_FILE}")
        except FileNotFoundError as e:
            if attempt:
                raise IndexDamaged(_shown(root, column, uri), f"{meta['generation']}: a file is missing "
                                   f"({_first_line(e).rsplit('/', 1)[-1]})") from None
            continue
        except OSError as e:  # a folder where a file should be, no permission
            raise IndexDamaged(_shown(root, column, uri), f"{meta['generation']}: {_first_line(e)}") from None
        return (meta, *_decode(meta, raw, rows_raw, _shown(root, column, uri)))
    return None  # pragma: no cover - the loop returns or raises


def _decode(meta: Dict[str, Any], raw: bytes, rows_raw: bytes, shown: str) -> Tuple[Any, pa.Table]:
    """The faiss index and the rows table, checked against meta.json and each other."""
    try:
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
        rows = pq.read_table(io.BytesIO(rows_raw))
    except Exception as e:  # faiss's RuntimeError, Arrow's errors: a truncated or garbled file
        raise IndexDamaged(shown, f"{meta['generation']}: {type(e).__name__}: {_first_line(e)}") from None
    counts = {"index.faiss": index.ntotal, "rows.parquet": rows.num_rows, "meta.json": meta["rows"],
              "its files": sum(f["rows"] for f in meta["files"])}
    if len(set(counts.values())) != 1 or index.d != meta["dim"] or "sample_id" not in rows.column_names:
        said = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise IndexDamaged(shown, f"{meta['generation']}: rows disagree ({said}; dimension {index.d})")
    return index, rows


def save(fs, root: str, column: str, meta: Dict[str, Any], index, rows: pa.Table) -> Dict[str, Any]:
    """Write a new generation (its marker first), then publish it; returns the meta as published.
    meta.json is strict JSON: a NaN or infinity in it is a bug here, refused before anything is written."""
    generation = f"g{int(time.time()):010d}-{uuid.uuid4().hex[:8]}"  # sorts by age; the age is in the name
    meta = redact_strings({**meta, "generation": generation})
    folder = f"{index_dir(root, column)}/{generation}"
    text = json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode()
    marker = {"made_by": "featurize index", "generation": generation, "created": time.time()}
    write_atomic(fs, f"{folder}/{MARKER}", json.dumps(marker).encode())
    write_atomic(fs, f"{folder}/{INDEX_FILE}", faiss.serialize_index(index).tobytes())
    write_atomic(fs, f"{folder}/{ROWS_FILE}", parquet_bytes(rows))
    write_atomic(fs, f"{folder}/{META}", text)
    write_atomic(fs, f"{index_dir(root, column)}/{META}", text)  # the publish
    _clean(fs, root, column, generation)
    return meta


def _clean(fs, root: str, column: str, current: str) -> None:
    """Remove generations meta.json does not name, older than GRACE_S, that hold the marker a build
    wrote (a folder without it is not the project's, whatever its name)."""
    try:
        current = (read_meta(fs, root, column) or {}).get("generation", current)
    except IndexDamaged:  # another build's publish half seen: keep ours and theirs
        return
    try:
        folders = fs.ls(index_dir(root, column), detail=True)
    except FileNotFoundError:
        return
    for info in folders:
        path = info["name"].rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if info.get("type") != "directory" or info.get("islink") or name == current:  # a link: not ours
            continue
        made = _marker_time(fs, path, name)
        if made is not None and time.time() - made > GRACE_S:
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:  # another build removed it first
                pass
            except OSError as e:
                log.warning("could not remove an old index generation %s: %s", path, e)


def _marker_time(fs, folder: str, name: str) -> Optional[float]:
    """When a build made this folder, from the marker it wrote there; None: not a build's folder."""
    try:
        marker = json.loads(fs.cat_file(f"{folder}/{MARKER}"))
    except (OSError, ValueError):  # no marker (FileNotFoundError is an OSError), or not ours
        return None
    if not isinstance(marker, dict) or marker.get("generation") != name or not number(marker.get("created")):
        return None
    return float(marker["created"])
