"""Where an index lives and how it is saved and loaded, on local disk or an object store (fsspec).

    OUT/_index/<column>/meta.json          the pointer: the current generation and what it holds
    OUT/_index/<column>/<generation>/      index.faiss, rows.parquet, meta.json (a copy)

A build writes a new generation folder whole, then replaces meta.json in one atomic write
(write_atomic: a rename on disk, one PUT on an object store). A reader reads meta.json first and
then the files it names, so it never sees half of one build and half of another, and two builds
running at once each publish a whole index (the last one wins) without a lock. A build killed
midway leaves an unnamed folder and the previous index in place; later builds remove folders no
meta.json names once they are older than GRACE_S (a reader may still be loading one).
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

from ..redact import logger, redact_strings
from ..store import parquet_bytes, write_atomic

INDEX_DIR, META, INDEX_FILE, ROWS_FILE = "_index", "meta.json", "index.faiss", "rows.parquet"
GRACE_S = 600.0
log = logger(__name__)


def index_dir(root: str, column: str) -> str:
    return f"{root}/{INDEX_DIR}/{column}"


def read_meta(fs, root: str, column: str) -> Optional[Dict[str, Any]]:
    path = f"{index_dir(root, column)}/{META}"
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def load(fs, root: str, column: str) -> Optional[Tuple[Dict[str, Any], Any, pa.Table]]:
    """(meta, faiss index, rows) of the current generation, or None when there is no index.
    A generation removed between reading meta.json and its files (a build cleaning up right
    then) is retried once with the newer meta.json."""
    for attempt in range(2):
        meta = read_meta(fs, root, column)
        if meta is None:
            return None
        folder = f"{index_dir(root, column)}/{meta['generation']}"
        try:
            raw = fs.cat_file(f"{folder}/{INDEX_FILE}")
            rows = pq.read_table(io.BytesIO(fs.cat_file(f"{folder}/{ROWS_FILE}")))
        except FileNotFoundError:
            if attempt:
                raise
            continue
        return meta, faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8)), rows
    return None  # pragma: no cover - the loop returns or raises


def save(fs, root: str, column: str, meta: Dict[str, Any], index, rows: pa.Table) -> Dict[str, Any]:
    """Write a new generation, then publish it; returns the meta as published."""
    generation = f"g{int(time.time()):010d}-{uuid.uuid4().hex[:8]}"  # sorts by age; the age is in the name
    meta = redact_strings({**meta, "generation": generation})
    folder = f"{index_dir(root, column)}/{generation}"
    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    write_atomic(fs, f"{folder}/{INDEX_FILE}", faiss.serialize_index(index).tobytes())
    write_atomic(fs, f"{folder}/{ROWS_FILE}", parquet_bytes(rows))
    write_atomic(fs, f"{folder}/{META}", text)
    write_atomic(fs, f"{index_dir(root, column)}/{META}", text)  # the publish
    _clean(fs, root, column)
    return meta


def _clean(fs, root: str, column: str) -> None:
    """Remove generations meta.json does not name that are older than GRACE_S."""
    current = (read_meta(fs, root, column) or {}).get("generation")
    try:
        folders = fs.ls(index_dir(root, column), detail=False)
    except FileNotFoundError:
        return
    for path in folders:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name == current or not name.startswith("g") or "-" not in name:
            continue
        try:
            age = time.time() - int(name[1:].split("-", 1)[0])
        except ValueError:
            continue
        if age > GRACE_S:
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:  # another build removed it first
                pass
            except OSError as e:
                log.warning("could not remove an old index generation %s: %s", path, e)
