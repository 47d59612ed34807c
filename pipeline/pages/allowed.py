"""What a page may read for its thumbnails: a hit's URI is a string in a table, so it is read only
under the table's own source (from its `_job.json`; an `apply` table's through the table it was
applied to) or under a prefix the user passes (`--allow-uris`), as extraction confines a
manifest's URIs (listing.confine: scheme and host must match, `..` and local links resolved).
A URI that names an internal web server, a cloud metadata endpoint or a private file elsewhere is
never opened: its card says so.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Dict, List, Optional, Sequence

from ..extract.listing import confine
from ..extract.plan import expand_braces
from ..output.store import filesystem
from ..redact import logger, redact_text

log = logger(__name__)
NOT_READ = "not read: outside the source (--allow-uris PREFIX reads it)"
MAX_HOPS = 8  # apply tables applied to apply tables ...: how far back a source is looked for
MAX_RECORD_BYTES = 16 << 20


def page_roots(table: Optional[str], storage_options: Optional[Dict[str, Any]] = None,
               allow_uris: Sequence[str] = ()) -> List[str]:
    """The prefixes a page of `table`'s rows may read: the user's `allow_uris` and the table's source."""
    roots = [str(u) for u in allow_uris or ()]
    return roots + (source_roots(table, storage_options or {}) if table else [])


def source_roots(uri: str, options: Dict[str, Any]) -> List[str]:
    """Where the table at `uri` read its samples, from its `_job.json`; [] when that is unknown."""
    seen = {uri}
    for _ in range(MAX_HOPS):
        record = _record(uri, options)
        if record.get("kind") != "apply":
            return job_roots(record.get("config"))
        source = (record.get("input") or {}).get("uri") or (record.get("settings") or {}).get("apply.input")
        if not isinstance(source, str) or source in seen:
            return []
        seen.add(source)
        uri = source
    return []


def job_roots(config: Any) -> List[str]:
    """An extraction job's source: its folder; a manifest's folder and the job's own allow_uris
    (its rows were confined there when they were read); a webdataset's shard folders."""
    source = config.get("source") if isinstance(config, dict) else None
    uri = source.get("uri") if isinstance(source, dict) else None
    if not isinstance(uri, str) or not uri.strip():
        return []
    kind = source.get("format", "image_folder")
    if kind == "manifest":
        extra = source.get("allow_uris") or []
        return [_absolute(posixpath.dirname(uri) or ".")] + [str(u) for u in extra if isinstance(u, str)]
    if kind == "webdataset":  # a brace pattern, a glob or a folder: the folders its shards lie in
        return sorted({_absolute(_folder(p)) for p in expand_braces(uri)})
    return [_absolute(uri)]


def readable(uri: str, roots: Sequence[str]) -> bool:
    """Whether the URI (a tar member's: its shard's) lies under one of `roots`, by extraction's
    own confinement (listing.confine)."""
    return confine(uri, list(roots))


def _record(uri: str, options: Dict[str, Any]) -> Dict[str, Any]:
    try:
        fs, root = filesystem(uri, options)
        with fs.open(f"{root.rstrip('/')}/_job.json", "rb") as f:
            record = json.loads(f.read(MAX_RECORD_BYTES))
        return record if isinstance(record, dict) else {}
    except Exception as e:  # no _job.json (a table written by hand), unreadable: nothing is the source
        log.debug("no source for the pages of %s: %s", redact_text(uri), redact_text(str(e)))
        return {}


def _folder(pattern: str) -> str:
    """A shard pattern's folder: before the first part with a glob, else a shard's folder, else itself."""
    parts = pattern.split("/")
    glob = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    if glob is not None:
        return "/".join(parts[:glob])
    return posixpath.dirname(pattern) if pattern.lower().endswith(".tar") else pattern


def _absolute(uri: str) -> str:
    """A relative local path (a `_job.json` written before paths were made absolute) as the user
    meant it: against the current folder (as output/root.py compares them)."""
    return uri if "://" in uri else os.path.abspath(uri)
