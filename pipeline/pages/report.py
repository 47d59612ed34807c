"""`featurize report OUT`: one self-contained HTML page about a job's output root.

What it shows: what made the features (output/provenance.py: model, weights, layer; an `apply`
output's head and source; a warning when the weights were random), where the time went (per stage;
rows committed over time), the errors by kind with a few examples, a classifier's accuracy and
confusion matrices when the table has `pred` and `label` (predictions.py), the distribution of the
feature norms, and a 2-D PCA projection of the features (an autoencoder's `code`) coloured by label.
It reads the output contract only (OUT/_job.json, OUT/features, OUT/errors), never Ray, and a
bounded sample: at most SAMPLE_ROWS feature rows, only the columns it draws; the errors table and
the pred and label strings are streamed in batches.
"""
from __future__ import annotations

import calendar
import json
import math
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ReportError
from ..output.provenance import Provenance, describe
from ..output.store import filesystem, parquet_files, write_atomic
from ..output.table import featurize_metadata
from ..output.tensors import default_vector
from ..redact import logger, redact_text
from . import charts
from .html import document, figure, provenance_html, table_html, text
from .predictions import predictions_section

log = logger(__name__)
REPORT_FILE = "_report.html"
SAMPLE_ROWS = 4000  # feature rows read for the norms and the projection
SAMPLE_FILES = 64  # spread over at most this many files (evenly spaced: every partition has a say)
EXAMPLES = 3  # example errors shown per kind


def write_report(uri: str, storage_options: Optional[Dict[str, Any]] = None, out: Optional[str] = None) -> str:
    """Write the report of the output root at `uri` to `out` (default OUT/_report.html, on the same
    store); return where it went (credentials masked)."""
    options = storage_options or {}
    page = build_report(uri, options)
    target = out or f"{uri.rstrip('/')}/{REPORT_FILE}"
    try:
        fs, path = filesystem(target, options)
        write_atomic(fs, path, page.encode("utf-8"))
    except Exception as e:
        raise ReportError(f"--out {redact_text(target)}: cannot be written ({type(e).__name__}: {e})") from None
    return redact_text(target)


def build_report(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> str:
    """The report's HTML (self-contained: charts are PNG data URIs)."""
    fs, root, record = _open(uri, storage_options or {})
    features = parquet_files(fs, f"{root}/features")
    schema = pq.read_schema(features[0], filesystem=fs) if features else None
    meta = featurize_metadata(schema) if schema is not None else {}
    sections = [
        _header(uri, record, len(features), describe(meta) if schema is not None else None),
        '<h2 id="time">Time</h2>\n' + _time_section(record),
        '<h2 id="errors">Errors</h2>\n' + _errors_section(fs, f"{root}/errors"),
    ]
    if schema is not None and "pred" in schema.names:
        sections.append('<h2 id="predictions">Predictions</h2>\n' + predictions_section(fs, features, schema, meta))
    sections += _feature_sections(fs, features, schema)
    return document(f"featurize report: {record.get('name') or uri}", "\n".join(sections))


def _open(uri: str, options: Dict[str, Any]) -> Tuple[Any, str, Dict[str, Any]]:
    try:
        fs, root = filesystem(uri, options)
        root = root.rstrip("/")
        found = {name: fs.exists(f"{root}/{name}") for name in ("_job.json", "features", "errors")}
        record = json.loads(fs.cat_file(f"{root}/_job.json")) if found["_job.json"] else {}
    except Exception as e:  # no endpoint, denied, bad options, a broken _job.json
        raise ReportError(f"{redact_text(uri)}: cannot be read ({type(e).__name__}: {redact_text(str(e))})") from None
    if not any(found.values()):
        raise ReportError(f"{redact_text(uri)}: no featurize output there (no _job.json, features or errors)")
    return fs, root, record


def _header(uri: str, record: Dict[str, Any], files: int, about: Optional[Provenance]) -> str:
    """What made the features (a warning first if random weights did), then the job, its counts and timings."""
    counts, timings = record.get("counts", {}), record.get("timings", {})
    rows = [("output", uri), ("job", record.get("name", "?")), ("kind", record.get("kind", "run")),
            ("status", record.get("status", "?")), ("finished", record.get("finished_at", "not yet")),
            ("planned", counts.get("planned", "?")), ("features", counts.get("features", "?")),
            ("errors", counts.get("errors", "?")), ("feature files", files)]
    if timings:
        rows += [("wall time", f"{timings.get('wall_s', 0):.1f} s (+{timings.get('startup_s', 0):.1f} s start-up)"),
                 ("throughput", _throughput(timings))]
    made = provenance_html(about) if about else '<p class="note">no features table to read its model from</p>\n'
    return (f"<h1>Report: {text(record.get('name') or uri)}</h1>\n"
            f'<div class="meta">made by featurize report at {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
            f"</div>\n{made}" + table_html(None, rows))


def _throughput(timings: Dict[str, Any]) -> str:
    """The last run's rates. One commit (all rows at once) gives no rate once the pipeline was full
    (jobrun.steady_state needs two): then the rate over the whole run is the one to go by."""
    overall, steady = timings.get("samples_per_s", 0), timings.get("steady_samples_per_s", 0)
    if steady:
        return f"{overall:.1f} samples/s overall, {steady:.1f} once the pipeline was full"
    if overall:
        return (f"{overall:.1f} samples/s over the whole run (one commit: all rows at once after "
                f"{timings.get('first_commit_s', timings.get('wall_s', 0)):.1f} s, so no rate once the pipeline "
                "was full)")
    return "none: the last run had nothing to do (every planned sample was committed before it)"


def _time_section(record: Dict[str, Any]) -> str:
    out = ["<h3>Time per stage</h3>"]
    stages = record.get("stages") or {}
    if stages.get("stages"):
        out.append(figure(charts.stage_chart(stages["stages"], stages.get("bound")), "busy seconds per stage"))
        if stages.get("suggestion"):
            out.append(f'<p class="note">{text(stages["suggestion"])}</p>')
    else:
        kind = record.get("kind", "run")
        out.append(f'<p class="note">not recorded for this {text(kind)} (no per-stage timings in _job.json)</p>')
    out.append("<h3>Throughput over time</h3>")
    runs = record.get("runs") or []
    series = [(f"run {i + 1} ({r.get('started_at', '?')})", r["progress"]) for i, r in enumerate(runs)
              if r.get("progress")]
    if series:
        out.append(figure(charts.throughput_chart(series), "rows committed over time"))
        out += [f'<p class="note">{text(name)} made one commit: all {_n(int(points[-1][1]), "row")} at once, '
                f"{points[-1][0]:.1f} s after execution began ({points[-1][1] / points[-1][0]:.1f} rows/s over the "
                "run)</p>" for name, points in series if len(points) == 2 and points[-1][0] > 0]
        return "\n".join(out)
    out.append('<p class="note">not recorded for this run (newer versions keep the rows committed over time '
               "in _job.json); below: each run's start and end</p>")
    points = _run_points(runs)
    if points:
        out.append(figure(charts.runs_chart(points), "rows committed by each run, from its start to its end"))
    return "\n".join(out)


def _run_points(runs: List[Dict[str, Any]]) -> List[Tuple[float, int]]:
    """Each finished run as two points, (its start, rows before it) and (its end, rows after it):
    seconds since the first run began, rows committed by all runs so far."""
    starts = [_epoch(r.get("started_at")) for r in runs]
    first = min((s for s in starts if s is not None), default=None)
    points: List[Tuple[float, int]] = []
    rows = 0
    for r, start in zip(runs, starts):
        end = _epoch(r.get("finished_at"))
        if first is None or start is None or end is None:
            continue
        points.append((start - first, rows))
        rows += int(r.get("samples", 0))
        points.append((end - first, rows))
    return points


def _epoch(iso: Optional[str]) -> Optional[float]:
    try:
        return float(calendar.timegm(time.strptime(str(iso), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _errors_section(fs, folder: str) -> str:
    files = parquet_files(fs, folder)
    if not files:
        return '<p class="note">no errors: every planned sample has its features</p>'
    counts, examples = error_kinds(fs, files)
    rows = []
    for kind, n in counts.most_common():
        shown = "; ".join(f"{sid}: {msg[:200]}" for sid, msg in examples[kind])
        rows.append((kind, n, shown))
    failed = sum(counts.values())
    return (f"<p>{_n(failed, 'sample')} failed, of {_n(len(counts), 'kind')} (stage/error type)</p>\n"
            + table_html(["kind", "samples", f"examples (first {EXAMPLES}: id: message)"], rows))


def error_kinds(fs, files: List[str]) -> Tuple[Counter, Dict[str, List[Tuple[str, str]]]]:
    """Samples per "stage/error_type" and the first few (id, message) of each, streamed in batches."""
    counts: Counter = Counter()
    examples: Dict[str, List[Tuple[str, str]]] = {}
    for path in files:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192,
                                                        columns=["sample_id", "stage", "error_type", "message"]):
                kinds = pc.binary_join_element_wise(batch["stage"], batch["error_type"], "/")
                vc = pc.value_counts(kinds)
                counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
                for kind in set(vc.field("values").to_pylist()):
                    have = examples.setdefault(kind, [])
                    if len(have) < EXAMPLES:
                        idx = pc.indices_nonzero(pc.equal(kinds, kind)).to_pylist()[: EXAMPLES - len(have)]
                        have += [(redact_text(str(batch["sample_id"][i])), redact_text(str(batch["message"][i])))
                                 for i in idx]
    return counts, examples


def _feature_sections(fs, files: List[str], schema: Optional[pa.Schema]) -> List[str]:
    norms, proj = '<h2 id="norms">Feature norms</h2>\n', '<h2 id="projection">Projection (PCA)</h2>\n'
    if schema is None:
        none = '<p class="note">no features table</p>'
        return [norms + none, proj + none]
    vectors = vector_columns(schema)
    if "pred" in schema.names:  # a classifier's probabilities: the predictions section says what they mean
        vectors = [c for c in vectors if c != "probs"]
        if not vectors:
            return []
    if not vectors:
        none = '<p class="note">no vector column (fixed-size list of floats) in the features table</p>'
        return [norms + none, proj + none]
    column = default_vector(vectors)
    chosen = f"<p>column <code>{text(column)}</code>" + (
        f" (the table's vector columns: {text(', '.join(vectors))})" if len(vectors) > 1 else "") + "</p>\n"
    labels = "label" if "label" in schema.names else None
    sample = sample_rows(fs, files, [column] + ([labels] if labels else []))
    x = _matrix(sample[column])
    finite = np.isfinite(x).all(axis=1)
    norm = np.linalg.norm(x[finite], axis=1)
    bad = f", {int((~finite).sum())} with NaN or infinite values left out" if (~finite).any() else ""
    stats = (f"<p>{_n(len(x), 'row')} sampled{bad}: norm mean {norm.mean():.3f}, min {norm.min():.3f}, "
             f"max {norm.max():.3f}, {int((norm == 0).sum())} all-zero</p>\n") if len(norm) else ""
    norms += chosen + stats + (figure(charts.histogram(norm, f"L2 norm of {column}"), "norm histogram")
                               if len(norm) else '<p class="note">no finite rows</p>')
    names = sample[labels].to_pylist() if labels else [""] * len(x)
    kept = [str(n) for n, ok in zip(names, finite) if ok]
    if finite.sum() >= 3:
        xy, share = charts.pca_2d(x[finite])
        proj += chosen + (f"<p>{int(finite.sum())} sampled rows on their first two principal components, "
                          f"coloured by label ({_n(len(set(kept)), 'label')})</p>\n")
        proj += figure(charts.scatter(xy, kept, share), "PCA projection")
    else:
        proj += '<p class="note">too few rows for a projection (3 at least)</p>'
    return [norms, proj]


def vector_columns(schema: pa.Schema) -> List[str]:
    """Fixed-size float lists: `feature` for images, clip_<head> for videos and applied heads."""
    return [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]


def sample_rows(fs, files: List[str], columns: List[str], limit: int = SAMPLE_ROWS) -> pa.Table:
    """At most `limit` rows of `columns`, from up to SAMPLE_FILES files spread evenly over the
    table, an equal share from each; only those columns are read, a batch at a time."""
    step = max(1, len(files) / SAMPLE_FILES)
    chosen = [files[int(i * step)] for i in range(min(len(files), SAMPLE_FILES))]
    quota = math.ceil(limit / len(chosen))
    parts = []
    for path in chosen:
        with fs.open(path, "rb") as f:
            got = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=min(quota, 4096), columns=columns):
                parts.append(batch.slice(0, quota - got))
                got += len(parts[-1])
                if got >= quota:
                    break
    table = pa.Table.from_batches(parts) if parts else pa.table({c: [] for c in columns})
    return table.slice(0, limit)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 1), dtype=np.float32)
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
