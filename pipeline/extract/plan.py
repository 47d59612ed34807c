"""Listing and planning: turn a source into a deterministic plan of samples.

The plan is listed once on the driver and saved under the output root, so a re-run never lists
the bucket again. A plan row is one image file, or one tar shard (`container == "tar"`) whose
members are discovered while it is streamed.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import posixpath
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ..config import SourceConfig
from ..errors import SourceError
from ..output.store import filesystem, full_uri
from ..redact import FETCH_URI, has_masked_uris, public_row, saved_plan
from .listing import REFUSED_URI, Confinement, Entry, ListingError, raw_path, utf8, walk_local, walk_store
from .planfile import BATCH_ROWS, PlanFile, scratch, sort_unique, spill

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
VIDEO_EXTENSIONS = frozenset({"mp4", "avi", "webm", "mkv", "mov", "m4v", "mpg", "mpeg", "ogv", "flv", "wmv"})
LABEL_EXTENSIONS = ("cls", "txt", "json")
SPLIT_GAPS = "featurize.split_lists"  # plan metadata: split_list_gaps
PLAN_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("container", pa.string()),  # "" for a file, "tar" for a webdataset shard
        # Added later; a plan saved without them reads as null (read.py checks for them):
        ("refused", pa.string()),  # why the row is an error row never read (listing.py); null/"": read it
        ("raw_path", pa.binary()),  # the local path's bytes when its name is not UTF-8; else null
        (FETCH_URI, pa.string()),  # the real uri where `uri` has credentials masked; never saved (redact.py)
    ]
)


def plan_source(cfg: SourceConfig) -> pa.Table:
    """List the source once and return the plan, sorted by sample_id, as a table in memory (see
    write_plan for a plan that stays on disk)."""
    with scratch() as folder:
        return write_plan(cfg, folder).read()


def write_plan(cfg: SourceConfig, folder: str) -> PlanFile:
    """List the source once into `folder`/plan.parquet, sorted by sample_id, refusing an id listed
    twice. Rows become Arrow record batches as they are listed and are spilled to disk; the sort
    is out of core (planfile.sort_unique): the driver holds a batch of rows, not the plan."""
    listed = os.path.join(folder, "listed.parquet")
    try:
        rows = spill(_record_batches(_LISTERS[cfg.format](cfg)), listed, PLAN_SCHEMA)
    except SourceError:
        raise
    except ListingError as e:
        raise SourceError(f"source.uri {cfg.uri}: {e}") from None
    except FileNotFoundError as e:
        raise SourceError(f"source.uri {cfg.uri}: not found ({e})") from None
    except Exception as e:  # the store's own errors: no credentials, no endpoint, denied
        raise SourceError(f"source.uri {cfg.uri}: cannot list ({type(e).__name__}: {e})") from None
    if not rows:
        raise SourceError(f"source.uri {cfg.uri}: no {cfg.format} samples found")
    schema = PLAN_SCHEMA
    if cfg.format == "video_folder" and cfg.split_files:  # kept with the plan in OUT/_plan.parquet
        ids = pq.read_table(listed, columns=["sample_id"])["sample_id"]  # videos: thousands, not millions
        schema = schema.with_metadata({SPLIT_GAPS: json.dumps(_split_list_gaps(cfg, ids))})
    try:
        return sort_unique(listed, os.path.join(folder, "plan.parquet"), schema, _check_unique)
    finally:
        os.remove(listed)


def _record_batches(rows: Iterator[Dict[str, Any]]) -> Iterator[pa.RecordBatch]:
    """The listed rows, BATCH_ROWS at a time, with credentials in URIs masked in ids and uris
    (the real uri kept aside in FETCH_URI)."""
    while True:
        chunk = [public_row(r) for r in itertools.islice(rows, BATCH_ROWS)]
        if not chunk:
            return
        yield pa.RecordBatch.from_pylist(chunk, schema=PLAN_SCHEMA)


def split_list_gaps(plan: pa.Table) -> Dict[str, Any]:
    """A video_folder plan with split lists: {"unlisted": videos in no list (split `unlisted`),
    "missing": list entries with no file, "first_missing": a few of them}; {} for other plans."""
    return json.loads((plan.schema.metadata or {}).get(SPLIT_GAPS.encode(), b"{}"))


def _split_list_gaps(cfg: SourceConfig, ids: pa.ChunkedArray) -> Dict[str, Any]:
    listed = pa.array(sorted(_read_split_files(cfg)), pa.string())  # small text files: read again
    found = pc.is_in(listed, value_set=ids)
    missing = listed.filter(pc.invert(found)).to_pylist()
    unlisted = len(ids) - pc.sum(pc.is_in(ids, value_set=listed).cast(pa.int64())).as_py()
    return {"unlisted": unlisted, "missing": len(missing), "first_missing": missing[:3]}


def with_fetch_uris(plan: pa.Table, cfg: SourceConfig, listed: Optional[pa.Table] = None) -> pa.Table:
    """A plan read back from OUT holds masked URIs only: list the source again (or take `listed`,
    a listing just made) for the real ones (a manifest's rows may carry fresh signatures by now).
    A sample no longer listed keeps its masked uri, and its read fails as an error row."""
    if not has_masked_uris(plan):
        return plan
    listed = plan_source(cfg) if listed is None else listed
    at = pc.index_in(plan["sample_id"], value_set=listed["sample_id"])  # null where no longer listed
    return saved_plan(plan).append_column(FETCH_URI, listed[FETCH_URI].take(at))


def _check_unique(plan: pa.Table) -> None:
    """Refuse a sample_id listed twice: in the sorted ids, one equal to the id before it."""
    ids = plan["sample_id"]
    if len(ids) < 2:
        return
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if not pc.any(same).as_py():
        return
    a, b = plan.slice(pc.index(same, True).as_py(), 2).to_pylist()
    both = f" (as {_name(a)!r} and {_name(b)!r})" if a["raw_path"] or b["raw_path"] else ""
    raise SourceError(f"sample_id {a['sample_id']!r} appears twice in the source{both}")


def _name(row: Dict[str, Any]) -> Any:
    return row["raw_path"] or row["uri"]


def _extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""


def _list_image_folder(cfg: SourceConfig) -> Iterator[Dict[str, Any]]:
    return _list_folder(cfg, IMAGE_EXTENSIONS)


def _list_video_folder(cfg: SourceConfig) -> Iterator[Dict[str, Any]]:
    """UCF101's layout: <Class>/<video>; splits from its lists (trainlist01.txt ...) when given."""
    splits = _read_split_files(cfg)
    for row in _list_folder(cfg, VIDEO_EXTENSIONS):
        if splits:
            row["split"] = splits.get(row["sample_id"], cfg.split or "unlisted")
        yield row


def _list_folder(cfg: SourceConfig, extensions: frozenset) -> Iterator[Dict[str, Any]]:
    fs, root = filesystem(cfg.uri, cfg.storage_options)
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise SourceError(f"source.uri {cfg.uri}: not a folder")
    if isinstance(fs, LocalFileSystem):
        entries = walk_local(root, cfg.follow_symlinks)
    else:
        entries = walk_store(fs, root)
    for path, refused in entries:
        if _extension(path) not in extensions and not (refused and os.path.isdir(path)):
            continue  # a refused link to a folder is planned too: its error row says it was not followed
        rel = posixpath.relpath(path, root)
        parent = posixpath.dirname(rel)
        row = _row(rel, full_uri(fs, path), posixpath.basename(parent), cfg.split)
        yield _utf8_row(row, path, refused)


def _utf8_row(row: Dict[str, Any], path: str, refused: str = "") -> Dict[str, Any]:
    """Plan strings are Parquet strings, valid UTF-8: a non-UTF-8 name is escaped in sample_id,
    label and uri, and its real bytes kept for the read stage."""
    raw = raw_path(path)
    if raw is not None:
        row.update(sample_id=utf8(row["sample_id"]), uri=utf8(row["uri"]), label=utf8(row["label"]), raw_path=raw)
    return {**row, "refused": refused}


def _read_split_files(cfg: SourceConfig) -> Dict[str, str]:
    """sample_id -> split, from lists of one relative path per line (a class index may follow)."""
    splits: Dict[str, str] = {}
    for split, uri in sorted(cfg.split_files.items()):
        fs, path = filesystem(uri, cfg.storage_options)
        try:
            text = fs.cat_file(path).decode("utf-8", errors="replace")
        except FileNotFoundError:
            raise SourceError(f"source.split_files.{split}: {uri} not found") from None
        for line in text.splitlines():
            if line.strip():
                splits[line.split()[0].replace("\\", "/")] = split
    return splits


def _list_webdataset(cfg: SourceConfig) -> Iterator[Dict[str, Any]]:
    paths: List[str] = []
    fs = None
    for pattern in expand_braces(cfg.uri):
        fs, path = filesystem(pattern, cfg.storage_options)
        if any(c in path for c in "*?["):
            paths.extend(fs.glob(path))
        elif fs.isdir(path):
            local = isinstance(fs, LocalFileSystem)
            found = walk_local(path, cfg.follow_symlinks) if local else map(Entry, fs.find(path))
            paths.extend(p for p, refused in found if _extension(p) == "tar" and not refused)
        elif fs.exists(path):
            paths.append(path)
        else:
            raise SourceError(f"source.uri {cfg.uri}: shard {full_uri(fs, path)} not found")
    root = _common_root(paths)
    for path in paths:
        yield _utf8_row(_row(posixpath.relpath(path, root), full_uri(fs, path), "", cfg.split, container="tar"), path)


def _list_manifest(cfg: SourceConfig) -> Iterator[Dict[str, Any]]:
    fs, path = filesystem(cfg.uri, cfg.storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()  # the file's bytes (compressed); its rows are read a batch at a time
    names, batches = _parquet_batches(data) if _extension(path) == "parquet" else _csv_batches(data)
    if "uri" not in names:
        raise SourceError(f"source.uri {cfg.uri}: the manifest has no 'uri' column (has {names})")
    base = posixpath.dirname(path)
    allowed = Confinement([full_uri(fs, base), *cfg.allow_uris])  # its roots resolved once
    for batch in batches:
        uris, labels, splits = (_values(batch, name) for name in ("uri", "label", "split"))
        for uri, label, split in zip(uris, labels, splits):
            uri = str(uri)
            if "://" in uri or uri.startswith("/"):
                target = uri
            else:  # relative to the manifest's folder
                target = full_uri(fs, posixpath.join(base, uri))
            refused = "" if allowed.allows(target) else REFUSED_URI  # the same words whether or not it exists
            yield {**_row(uri, target, _text(label), cfg.split or _text(split)), "refused": refused}


def _values(batch: pa.RecordBatch, name: str) -> List[Any]:
    """A column's values, or None for each row where the manifest has no such column."""
    index = batch.schema.get_field_index(name)
    return batch.column(index).to_pylist() if index >= 0 else [None] * batch.num_rows


def _parquet_batches(data: bytes) -> Tuple[List[str], Iterator[pa.RecordBatch]]:
    f = pq.ParquetFile(io.BytesIO(data))
    return f.schema_arrow.names, f.iter_batches(batch_size=BATCH_ROWS)


def _csv_batches(data: bytes) -> Tuple[List[str], Iterator[pa.RecordBatch]]:
    """Every column as the text it holds: `007` stays `007`, `true`, `null` and `` stay strings."""
    parse = pacsv.ParseOptions(newlines_in_values=True)  # a quoted value may span lines
    names = pacsv.open_csv(io.BytesIO(data), parse_options=parse).schema.names
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                   quoted_strings_can_be_null=False)
    return names, pacsv.open_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _row(sample_id: str, uri: str, label: str, split: Any, container: str = "") -> Dict[str, Any]:
    return {"sample_id": sample_id, "uri": uri, "label": label, "split": split or "all", "container": container}


def _common_root(paths: List[str]) -> str:
    if not paths:
        return ""
    dirs = {posixpath.dirname(p) for p in paths}
    return posixpath.commonpath(sorted(dirs)) if len(dirs) > 1 else dirs.pop()


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> List[str]:
    """Expand `shard-{000..127}.tar` and `{a,b}` the way webdataset and bash do.

    fsspec globbing has no braces; this is small enough to keep rather than add a dependency.
    """
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


_LISTERS = {
    "image_folder": _list_image_folder,
    "video_folder": _list_video_folder,
    "webdataset": _list_webdataset,
    "manifest": _list_manifest,
}
