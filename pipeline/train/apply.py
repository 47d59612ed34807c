"""`featurize apply`: a trained head over an existing features table, as a Ray Data job.

OUT2 is a features table like any a run makes: every sample of OUT's features table (sample_id,
uri, label, split, in OUT's partition folders) with the head's column(s): `clip_<name>` with `pred`
and `probs` from the classifier trained with it (lstm, attention), `code` (autoencoder), or `pred`
and `probs` (linear, mlp). Nothing is decoded again:
the input column is read from OUT's Parquet files. OUT's error rows have no features and are not
carried over: OUT2's plan is OUT's feature rows (saved as OUT2/_plan.parquet, so `featurize
status` and `inspect` read OUT2 as they read a run's output).

It commits through the same protocol as a run (output/ledger.py, output/sink.py): OUT2's lease, one
Committer, staged whole files, an audit at the end. The same apply run again resumes (its
committed rows are skipped); OUT2 holding anything else is refused, naming what differs, unless
`overwrite`. A batch the head fails on becomes error rows (stage "apply"), as in a run.
"""
from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Union

import pyarrow as pa

from .. import __version__
from ..config import DEFAULT_FILE_SIZE, absolute_local, file_bytes, same_store
from ..errors import ApplyError, BadArgument, CheckpointError, ConfigError, OutputExists, TableError
from ..jobrun import complete, init_ray, recorded, run_to_end, start_committer, summarize, take_lease, verify
from ..output.ledger import staging_folder
from ..output.partitions import folder_key
from ..output.record import Summary, write_record
from ..output.root import Workspace, open_planned
from ..output.sink import ParquetCommitSink, SinkSpec, target_bytes
from ..output.table import FeatureTable, open_table
from ..output.tensors import SEQUENCE
from ..progress import Nouns, starting, watch
from ..redact import redact, redact_strings, redact_text
from .apply_map import CARRIED, HeadActor, read_rows
from .checkpoint import Checkpoint, load
from .guard import check_apply_args, check_fits, check_input, refuse_same_root
from .models import TEMPORAL

BATCH_BYTES = 64 << 20


@dataclasses.dataclass
class Plan:
    """What the apply reads and writes, decided before any work."""

    head: Checkpoint
    table: FeatureTable
    name: str
    column: str
    frames: Optional[int]  # sequences: padded (or cut) to this many frames
    dtype: str  # of clip_/code: the input table's
    partition_by: List[str]


def apply_head(checkpoint: str, input_uri: str, output_uri: str, name: Optional[str] = None,
               storage_options: Optional[Dict[str, Any]] = None,
               output_storage_options: Optional[Dict[str, Any]] = None, address: Optional[str] = None,
               overwrite: bool = False, batch_size: Optional[int] = None, progress: bool = False,
               verbose: bool = False, allow_other_source: bool = False,
               file_size: Union[int, str, None] = None) -> Summary:
    """Apply the head at `checkpoint` to the features table at `input_uri`, into `output_uri`.
    `storage_options` are the input's (and the checkpoint's, when on the same store);
    `output_storage_options` default to them when OUT2 is on the same store. Refusals raise
    ApplyError before any work; a failure midway raises as it is (run again to resume).
    `progress` and `verbose` as for runner.run_job; `allow_other_source`: apply a head to a table
    whose input provenance (model, weights, layer ...) differs from the one it was trained on;
    `file_size`: OUT2's files, as a run's output.file_size (default the same)."""
    t0 = time.time()
    check_apply_args(checkpoint, input_uri, output_uri, name, storage_options, output_storage_options, address,
                     {"overwrite": overwrite, "progress": progress, "verbose": verbose,
                      "allow_other_source": allow_other_source}, batch_size, ApplyError)
    try:
        size = file_bytes(DEFAULT_FILE_SIZE if file_size is None else file_size, "file_size")
    except ConfigError as e:
        raise ApplyError(str(e)) from None
    checkpoint, input_uri, output_uri = (absolute_local(u) for u in (checkpoint, input_uri, output_uri))
    if address and address.startswith("ray://"):  # Ray Data's executor needs a core worker, which a client lacks
        raise ApplyError(f"--address {address}: Ray Client is not supported by apply; run it on a node of the "
                         "cluster with the cluster's address (host:6379, or auto)")
    in_options = dict(storage_options or {})
    out_options = _options_for(output_uri, input_uri, in_options, output_storage_options)
    plan = _plan(checkpoint, input_uri, output_uri, name, in_options, out_options, allow_other_source)
    try:
        lease = take_lease(output_uri, out_options, key="--output")
    except OutputExists as e:
        raise ApplyError(str(e)) from None
    try:
        try:
            ws = open_planned(output_uri, out_options, settings(plan), lambda: _source_rows(plan.table),
                              kind="apply", overwrite=overwrite)
        except OutputExists as e:
            raise ApplyError(str(e)) from None
        return _run(plan, ws, lease, output_uri, out_options, t0, address, batch_size or _batch_rows(plan), size,
                    progress, verbose)
    finally:
        lease.release()


def _batch_rows(plan: Plan) -> int:
    """Rows per head batch: about BATCH_BYTES of float32 input (8,192 rows at most) keeps the
    head's calls few and memory bounded (the sink gathers batches into files of file_size)."""
    per_row = 4 * int(plan.head.input["dim"]) * (plan.frames or 1)
    return max(16, min(8192, BATCH_BYTES // per_row))


def _options_for(uri: str, other: str, options: Dict[str, Any], given: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if given is not None:
        return dict(given)
    return dict(options) if same_store(uri, other) else {}


def _plan(checkpoint: str, input_uri: str, output_uri: str, name: Optional[str], in_options: Dict[str, Any],
          out_options: Dict[str, Any], allow_other_source: bool = False) -> Plan:
    """Every refusal, before any work: the head, the table, and whether they fit."""
    ck_options = in_options if same_store(checkpoint, input_uri) else {}
    refuse_same_root(input_uri, in_options, output_uri, out_options, checkpoint, ck_options, ApplyError)
    try:
        head = load(checkpoint, ck_options)
        table = open_table(input_uri, in_options, key="--input")
    except (CheckpointError, TableError) as e:
        raise ApplyError(str(e)) from None
    name = name or head.kind
    column = head.input["column"]
    shape = check_fits(head, table, checkpoint, input_uri, head.kind in TEMPORAL, ApplyError)
    check_input(head, table, checkpoint, input_uri, allow_other_source, ApplyError)
    settings_ = table.record.get("settings", {})
    partition_by = list(settings_.get("output.partition_by", ["split"]))
    frames = head.input.get("frames") if shape == SEQUENCE else None
    return Plan(head, table, name, column, int(frames) if frames else None, _dtype(table, column), partition_by)


def _dtype(table: FeatureTable, column: str) -> str:
    """The input table's dtype: its provenance says it; else its column's value type."""
    given = table.metadata().get("featurize.dtype")
    if given in ("float16", "float32"):
        return given
    typ = table.schema.field(column).type
    while pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        typ = typ.value_type
    return "float16" if typ == pa.float16() else "float32"


def settings(plan: Plan) -> Dict[str, Any]:
    """What decides OUT2's content: the same settings resume, others are refused (output/root.py)."""
    out = {
        "apply.input": redact_text(plan.table.uri), "apply.input_job": plan.table.record.get("name"),
        "apply.input_rows": plan.table.rows(), "apply.column": plan.column, "apply.frames": plan.frames,
        "apply.checkpoint_sha256": plan.head.sha256, "apply.kind": plan.head.kind, "apply.name": plan.name,
        "output.dtype": plan.dtype, "output.partition_by": plan.partition_by,
        "output.partition_folders": [folder_key(c) for c in plan.partition_by],
    }
    return redact(json.loads(json.dumps(out)))


def provenance(plan: Plan) -> Dict[str, str]:
    """OUT2's Parquet metadata: its source table and its head, no credentials."""
    columns = plan.head.columns(plan.name, plan.dtype)
    vector = next(t for _, t in columns if pa.types.is_fixed_size_list(t))  # clip_/code, or probs (float32)
    meta = {
        "featurize.version": __version__,
        "featurize.job": job_name(plan),
        "featurize.kind": "apply",
        "featurize.dtype": "float16" if vector.value_type == pa.float16() else "float32",
        "featurize.dim": str(vector.list_size),
        "featurize.columns": json.dumps([c for c, _ in columns]),
        "featurize.source": json.dumps(plan.table.provenance(), sort_keys=True),
        "featurize.head": json.dumps(redact_strings(plan.head.provenance()), sort_keys=True),
    }
    return {k: redact_text(v) for k, v in meta.items()}


def job_name(plan: Plan) -> str:
    return f"apply-{plan.name}"


def _source_rows(table: FeatureTable) -> pa.Table:
    """OUT2's plan: OUT's feature rows, in the plan's form (container "": one row per sample)."""
    rows = table.dataset().to_table(columns=list(CARRIED))
    rows = rows.append_column("container", pa.array([""] * len(rows), pa.string()))
    return rows.sort_by("sample_id")


def _run(plan: Plan, ws: Workspace, lease, out_uri: str, out_options: Dict[str, Any], t0: float,
         address: Optional[str], batch_size: int, size: Optional[int], progress: bool = False,
         verbose: bool = False) -> Summary:
    record = partial(write_record, ws, _record_head(plan))
    if not len(ws.todo):  # all done already: no need for Ray
        verify(ws)
        lease.check()
        return complete(ws, record, t0, summarize(ws, out_uri, t0, time.time(), {}, provenance=provenance(plan)))
    record(status="running", started_at=t0)  # before Ray starts: a stop from here on is recorded
    with recorded(record, t0, ws.uri):
        starting(progress, f"{len(ws.todo)} rows to apply the head to: Ray and its actors")
        init_ray(address, verbose)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = verbose
        committer = start_committer(ws, out_uri, out_options, lease.run_id)
    columns = plan.head.columns(plan.name, plan.dtype)
    spec = SinkSpec(out_uri=ws.uri, storage_options=out_options, partition_by=plan.partition_by, columns=columns,
                    metadata=provenance(plan), staging=staging_folder(ws.job, lease.run_id),
                    file_bytes=target_bytes(size, len(ws.todo), columns, plan.frames or 1))
    sink = ParquetCommitSink(spec, committer)
    t1 = time.time()
    # no stage timing here (the head's op is not timed), so the line names no bound
    shown = watch(committer, len(ws.plan), ws.skipped, Nouns("samples"), progress, live=False if verbose else None)

    def write() -> None:
        with shown:
            dataset(plan, ws, batch_size, committer).write_datasink(sink, ray_remote_args={"num_cpus": 0})

    run_to_end(ws, lease, committer, write, record, t0)
    summary = summarize(ws, out_uri, t0, t1, sink.totals, provenance=spec.metadata)
    return complete(ws, record, t0, summary)  # an overwrite replaces the old table


def dataset(plan: Plan, ws: Workspace, batch_size: int, committer=None):
    """OUT's rows still to do -> the head's columns. Each read task reads one file of OUT, only
    the needed columns, and keeps only the rows still to do (a resumed apply), so memory stays
    bounded by a file; the sink gathers the head's output into OUT2's files of file_size."""
    import ray
    from ray.data import ActorPoolStrategy

    files = pa.table({"path": plan.table.files})
    todo = ray.put(ws.todo["sample_id"].combine_chunks()) if ws.skipped else None
    # from_blocks: no metadata task per block before the job (runner.build_dataset says why)
    ds = ray.data.from_blocks([files.slice(i, 1) for i in range(len(files))]).map_batches(
        read_rows, fn_kwargs={"fs": plan.table.fs, "columns": [*CARRIED, plan.column], "todo": todo},
        batch_size=1, batch_format="pyarrow",
        num_cpus=0.5)  # reads wait on I/O; and so they stay apart from the head's op, one block per file
    return ds.map_batches(HeadActor, fn_constructor_args=(plan.head, plan.column, plan.name, plan.frames, committer,
                                                          plan.dtype),
                          batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=1))


def _record_head(plan: Plan) -> Dict[str, Any]:
    """_job.json's description of the apply: what it read, with what head, into which columns."""
    return {"name": job_name(plan), "kind": "apply", "settings": settings(plan),
            "input": plan.table.provenance(), "checkpoint": redact_strings(plan.head.provenance()),
            "columns": [c for c, _ in plan.head.columns(plan.name, plan.dtype)]}


def check_apply_options(options: Mapping[str, Any]) -> None:
    """featurize.apply(**options): only apply_head's keywords (a typo is refused, not a TypeError)."""
    import inspect

    known = [p for p in inspect.signature(apply_head).parameters if p not in ("checkpoint", "input_uri", "output_uri")]
    for key in options:
        if key not in known:
            raise BadArgument(f"{key}: not an option of apply (options: {', '.join(known)})")
