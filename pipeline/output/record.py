"""What a job tells its user: `_job.json`, the end-of-run summary, and `featurize inspect`."""
from __future__ import annotations

import json
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .. import __version__
from ..config import to_dict
from ..errors import NoOutput
from ..extract.plan import split_list_gaps
from ..redact import redact_strings, redact_text
from .ledger import write_atomic
from .partitions import column_of
from .provenance import describe
from .root import JOB_FILE, settings
from .store import filesystem

if TYPE_CHECKING:  # imported for types only: report stays importable without Ray
    from ..extract.prepare import Prepared
    from .root import Workspace


def versions() -> Dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    return {
        "featurize": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyarrow": pyarrow.__version__,
    }


@dataclass
class Summary:
    out_uri: str
    planned: int
    features: int  # committed by this run
    errors: Dict[str, int]  # "stage/error_type" -> count, committed by this run
    wall_s: float  # from the start of execution to the last commit
    startup_s: float  # planning and Ray start, before execution
    skipped: int = 0  # planned samples an earlier run had committed
    added: int = 0  # --incremental: samples new in the source, planned by this run
    gone: int = 0  # --incremental: planned samples no longer in the source (their rows stay)
    duplicates: int = 0  # rows Ray computed twice, dropped by the committer
    output_rows: Dict[str, int] = field(default_factory=dict)  # features and errors in OUT, all runs
    first_commit_s: float = 0.0  # execution start to the first commit: actor start, model load, fill
    steady_throughput: float = 0.0  # samples/s between the first and the last commit
    layout: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, Any] = field(default_factory=dict)  # time per stage and the bound (timing.breakdown)
    split_lists: Dict[str, Any] = field(default_factory=dict)  # sources.split_list_gaps: unlisted, missing
    progress: List[List[float]] = field(default_factory=list)  # jobrun.progress_series: [[s, rows so far], ...]
    ray_logs: str = ""  # Ray's own logs of the run (its session's folder on the driver's node), if known
    provenance: Dict[str, str] = field(default_factory=dict)  # the features' `featurize.*` metadata

    @property
    def samples(self) -> int:
        return self.features + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0


def write_job_record(
    prepared: "Prepared", ws: "Workspace", status: str, started_at: float,
    summary: Optional[Summary] = None, error: Optional[str] = None,
) -> None:
    """OUT/_job.json of a run: the job, its settings (a later run compares them), counts and timings."""
    head = {
        "name": prepared.job.name,
        "config": to_dict(prepared.job),  # secrets redacted
        "settings": settings(prepared),
        "resolved": {
            "weights": {"id": prepared.weights.id, "sha256": prepared.weights.sha256},
            "preprocess": {"resize": prepared.image.resize, "crop": prepared.image.crop,
                           "mean": prepared.mean, "std": prepared.std},
            "dim": prepared.dim,
        },
    }
    write_record(ws, head, status, started_at, summary, error)


def write_record(ws: "Workspace", head: Dict[str, Any], status: str, started_at: float,
                 summary: Optional[Summary] = None, error: Optional[str] = None) -> None:
    """OUT/_job.json of any job that writes an output root: `head` (name, settings, and what
    else describes the job), then status, versions, counts, timings. Earlier runs into the same
    OUT (interrupted, resumed, retried) are kept under `runs`."""
    runs = list((ws.previous or {}).get("runs", []))
    run: Dict[str, Any] = {"started_at": _iso(started_at), "status": status, "todo": len(ws.todo),
                           "skipped_as_done": ws.skipped}
    if ws.added or ws.gone:  # --incremental
        run.update(added_to_plan=ws.added, gone_from_source=ws.gone)
    if error is not None:
        run["error"] = error
    record: Dict[str, Any] = {"name": head["name"], "status": status,
                              **{k: v for k, v in head.items() if k != "name"},
                              "versions": versions(), "counts": {"planned": len(ws.plan)}, "runs": runs + [run]}
    if error is not None:
        record["error"] = error
    gaps = split_list_gaps(ws.plan)  # a video_folder job's split lists: videos in none, entries with no video
    if gaps:
        record["counts"]["split_lists"] = gaps
    if summary is not None:
        record["finished_at"] = run["finished_at"] = _iso(time.time())
        rows = summary.output_rows  # features and errors in OUT, all runs together
        record["counts"].update(samples=sum(rows.values()), **rows, errors_by_kind=summary.errors)
        run.update(samples=summary.samples, features=summary.features, errors=sum(summary.errors.values()),
                   errors_by_kind=summary.errors, duplicates_dropped=summary.duplicates)
        if summary.progress:  # the report's throughput chart (pipeline/pages/report.py)
            run["progress"] = summary.progress
        record["timings"] = {
            "startup_s": round(summary.startup_s, 3), "wall_s": round(summary.wall_s, 3),
            "first_commit_s": round(summary.first_commit_s, 3), "samples_per_s": round(summary.throughput, 2),
            "steady_samples_per_s": round(summary.steady_throughput, 2),
        }
        record["layout"] = summary.layout
        record["stages"] = summary.stages
    record = redact_strings(record)  # URLs in the weights id, the error, the layout: no credentials
    write_atomic(ws.fs, f"{ws.root}/{JOB_FILE}", json.dumps(record, indent=2).encode())


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_summary(summary: Summary) -> str:
    lines = [f"samples      {summary.samples} ({summary.features} features, {sum(summary.errors.values())} errors)"]
    if summary.skipped:
        lines.append(f"skipped      {summary.skipped} planned samples already committed by an earlier run")
    if summary.added or summary.gone:
        lines.append(f"incremental  {summary.added} samples new in the source planned and taken up; "
                     f"{summary.gone} planned samples no longer in the source (their rows stay in the output)")
    if summary.duplicates:
        lines.append(f"dropped      {summary.duplicates} rows that Ray computed twice (already committed)")
    lines += _split_list_lines(summary.split_lists)
    if summary.samples:
        rate = (f"throughput   {summary.throughput:.1f} samples/s over {summary.wall_s:.1f} s "
                f"(+{summary.startup_s:.1f} s to plan and start Ray)")
        if summary.steady_throughput:  # needs two commits or more
            rate += (f"; {summary.steady_throughput:.1f} samples/s once the first batch was committed "
                     f"after {summary.first_commit_s:.1f} s")
        lines.append(rate)
    else:
        lines.append(f"nothing to do: every planned sample is committed ({summary.startup_s:.1f} s to check)")
    for kind, n in summary.errors.items():
        lines.append(f"  error      {n:>5}  {kind}")
    if summary.layout:
        lines.append(f"layout       {format_layout(summary.layout)}")
    if summary.stages.get("bound"):
        lines += format_stages(summary.stages)
    if summary.ray_logs:  # kept off the console (console.py): where to look when something went wrong
        lines.append(f"ray logs     {summary.ray_logs}")
    if summary.provenance:  # what made the features, and a warning when the weights were random
        lines += describe(summary.provenance).lines()
    lines.append(f"output       {summary.out_uri}")
    return redact_text("\n".join(lines))


def _split_list_lines(gaps: Dict[str, Any]) -> List[str]:
    lines = []
    if gaps.get("unlisted"):
        lines.append(f"split lists  {gaps['unlisted']} videos are in no split list: written with split=unlisted")
    if gaps.get("missing"):
        lines.append(f"split lists  {gaps['missing']} list entries have no video in source.uri "
                     f"(first: {', '.join(gaps['first_missing'])})")
    return lines


def format_layout(layout: Dict[str, Any]) -> str:
    """Where the stages ran: "1 to 8 model actors, 1 GPU each, batch 256; decode on CPU-only nodes (3 of 11); ..."."""
    n = f"{layout['actors']}"
    if layout["actors"] != layout["max_actors"]:
        n += f" to {layout['max_actors']}"
    on = (f"{layout['gpus_per_actor']:g} GPU each" if layout["gpus_per_actor"]
          else f"on CPU with {layout['torch_threads']} torch threads")
    return (f"{n} model actor{'s' if layout['max_actors'] > 1 else ''}, {on}, batch {layout['batch_size']}; "
            f"decode {'in' if layout.get('decode_in_actor') else 'on'} {layout['decode_on']}; "
            f"{layout['cpus']:g} CPUs in the cluster")


def format_stages(stages: Dict[str, Any]) -> List[str]:
    """One line per stage: busy seconds, workers, the rate they could sustain, the share of the run."""
    lines = []
    for name, s in stages["stages"].items():
        mark = "  <- bounds the run" if name == stages["bound"] else ""
        workers = f"{s['workers']} worker{'s' if s['workers'] > 1 else ' '}"
        lines.append(f"  {name:<9} {s['busy_s']:>8.1f} s busy over {workers}"
                     f" {s['busy_share']:>5.0%} of the run, {s['samples_per_s']:>8.1f} samples/s{mark}")
    return ["time         per stage (all workers' busy seconds; the busiest share bounds the run)", *lines,
            f"suggestion   {stages['suggestion']}"]


def inspect_output(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> str:
    """Schema, rows per partition, feature dimension, provenance and errors of an output root."""
    fs, root = filesystem(uri, storage_options or {})
    root = root.rstrip("/")
    if not any(fs.exists(f"{root}/{name}") for name in (JOB_FILE, "features", "errors")):
        raise NoOutput(f"{uri}: no output there (no {JOB_FILE}, features or errors)")  # a typo'd path
    out = [f"output     {uri}"]
    if fs.exists(f"{root}/{JOB_FILE}"):
        record = json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))
        out.append(f"job        {record['name']} ({record['status']}), planned {record['counts']['planned']}")
    if fs.exists(f"{root}/features"):
        out += _describe_features(fs, f"{root}/features")
    else:
        out.append("features   none")
    out += _describe_errors(fs, f"{root}/errors")
    return redact_text("\n".join(out))


def _describe_features(fs, path: str):
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    folders = _path_order(dataset.partitioning.schema.names if dataset.partitioning else [], dataset.files)
    rows = _rows_per_partition(dataset, [column_of(k) for k in folders])
    schema = pa.schema([f for f in dataset.schema if f.name not in folders or column_of(f.name) == f.name])
    out = [f"rows       {sum(rows.values())}"]
    out += [f"  {k:<40} {n}" for k, n in sorted(rows.items())]
    for f in schema:  # `feature` for images; clip_<name> (and frame_features) for videos
        if pa.types.is_fixed_size_list(f.type):
            out.append(f"feature    {f.name}: dim {f.type.list_size}, {f.type.value_type}")
    out.append("schema")
    out += [f"  {f.name}: {f.type}" for f in schema]
    files = dataset.files
    if files:
        meta = pq.read_schema(files[0], filesystem=fs).metadata or {}
        out.append("provenance")
        out += [f"  {k.decode()[len('featurize.'):]}: {v.decode()}" for k, v in sorted(meta.items())
                if k.startswith(b"featurize.")]
    return out


def _path_order(keys: List[str], files: List[str]) -> List[str]:
    """The partition keys in the order the folders nest (`split_dir=train/label_dir=cat`): rows are
    shown as their paths read, whatever order the reader discovered the keys in."""
    parts = files[0].split("/") if files else []
    position = {p.split("=", 1)[0]: i for i, p in enumerate(parts) if "=" in p}
    return sorted(keys, key=lambda k: position.get(k, len(parts)))


def _rows_per_partition(dataset, columns: List[str]) -> Counter:
    """"split=train/label=cat" -> rows, from the exact values the files hold (an older output's
    files lack them: then from its `split=` folders, as readers get them)."""
    if not columns:
        return Counter({"(unpartitioned)": dataset.count_rows()})
    counts = dataset.to_table(columns=columns).group_by(columns).aggregate([([], "count_all")])
    return Counter({"/".join(f"{c}={_shown(v)}" for c, v in zip(columns, values)): n
                    for *values, n in zip(*(counts[c].to_pylist() for c in columns), counts["count_all"].to_pylist())})


def _shown(value: Any) -> str:
    """A value as is where that is unambiguous; quoted where it is empty, has blanks or control characters."""
    text = str(value)
    plain = value is not None and text and text.isprintable() and text.strip() == text
    return text if plain else json.dumps(value, ensure_ascii=False)


def _describe_errors(fs, path: str):
    if not fs.exists(path) or not any(f.endswith(".parquet") for f in fs.find(path)):
        return ["errors     0"]  # none, or all retried away (--retry-failed)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["stage", "error_type"])
    kinds = Counter(zip(table["stage"].to_pylist(), table["error_type"].to_pylist()))
    out = [f"errors     {table.num_rows}"]
    out += [f"  {stage}/{kind:<35} {n}" for (stage, kind), n in kinds.most_common()]
    return out
