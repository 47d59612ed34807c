"""The output root across runs: start, resume, retry the failures, overwrite, and its status.

A run into an OUT that holds the same job's output resumes it: the plan saved there is used (the
source is never listed again) and only the samples not yet committed are processed. A different
job's output is refused, naming the settings that differ, unless `--overwrite`: then the new
output is built in `OUT/_overwrite/` and replaces the old one only once it is complete.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import FRAME_WINDOW_KEYS
from ..errors import OutputExists
from ..extract.plan import PLAN_SCHEMA, with_fetch_uris, write_plan
from ..extract.planfile import PlanFile, duckdb_in, of_file, parquet, query, scratch, write_batches, write_table
from ..fingerprint import changed, fingerprint
from ..redact import FETCH_URI, has_masked_uris, redact
from .ledger import (
    STAGING,
    TABLES,
    UNITS,
    Ledger,
    clear_staging,
    is_local,
    move,
    not_done,
    parquet_bytes,
    parquet_files,
    read_column,
    spill_column,
    write_atomic,
)
from .partitions import folder_key
from .store import READERS, filesystem, put_atomic, with_connections

JOB_FILE, PLAN_FILE, RETRY_FILE = "_job.json", "_plan.parquet", "_retry.parquet"
OVERWRITE, SWAP_FILE = "_overwrite", "_swap.json"
SAVED_SCHEMA = PLAN_SCHEMA.remove(PLAN_SCHEMA.get_field_index(FETCH_URI))  # as OUT keeps a plan


@dataclass
class Workspace:
    """Where this run writes and what it still has to do."""

    uri: str  # OUT, or OUT/_overwrite
    fs: Any
    root: str
    plan: PlanFile  # every planned sample, on the driver's disk
    todo: PlanFile  # the plan rows still to process, with `attempts` and `skip`
    job: str  # the job's fingerprint: its staging folder, and what its committer may recover
    previous: Optional[Dict[str, Any]]  # the _job.json an earlier run left, if any
    replaces: Optional[str] = None  # OUT's root, when this run overwrites it
    added: int = 0  # --incremental: samples new in the source, added to the plan by this run
    gone: int = 0  # --incremental: planned samples no longer in the source (their rows stay)
    rows: Optional[Dict[str, int]] = None  # the tables' rows on the store, as the run's audit read them
    # (ids, units) committed before this run: counts only; the committed ids live in the committer alone
    committed: Tuple[int, int] = (0, 0)
    scratch: Any = None  # the local folder that holds plan and todo (planfile.scratch), removed with it

    @property
    def skipped(self) -> int:
        return len(self.plan) - len(self.todo)


def settings(prepared) -> Dict[str, Any]:
    """The settings that decide what the output holds (not how fast it is made)."""
    job = prepared.job
    out = {
        "source.uri": job.source.uri, "source.format": job.source.format, "source.split": job.source.split,
        "source.split_files": job.source.split_files, "source.media": job.source.media,
        "preprocess.resize": prepared.image.resize, "preprocess.crop": prepared.image.crop,
        "preprocess.mean": list(prepared.mean), "preprocess.std": list(prepared.std),
        "preprocess.interpolation": prepared.image.interpolation,
        "model.arch": job.model.arch, "model.weights": prepared.weights.id,
        "model.weights_sha256": prepared.weights.sha256, "model.layer": job.model.layer,
        "model.pool": job.model.pool, "output.dtype": job.output.dtype,
        "output.partition_by": list(job.output.partition_by), "output.frame_features": job.output.frame_features,
    }
    if prepared.frame_size:  # clip models' exact frame size (the key came with them)
        out["preprocess.frame_size"] = list(prepared.frame_size)
    if prepared.image.squash:  # an output made before the key resized the shorter side
        out["preprocess.resize_mode"] = "squash"
    if not prepared.image.jpeg_draft:  # an output made before the key was decoded with draft
        out["preprocess.jpeg_draft"] = False
    if job.model.family != "torchvision":  # an output made before model families holds none: torchvision
        out["model.family"] = job.model.family
    if job.output.partition_by:  # folders `split_dir=`, exact values in the files (an older output had `split=`)
        out["output.partition_folders"] = [folder_key(c) for c in job.output.partition_by]
    if job.is_video:
        # the windows in frames are recorded as the seconds they resolve to (config.frame_windows)
        out.update({f"video.{k}": v for k, v in vars(job.video).items()
                    if k != "decode_timeout_s" and k not in FRAME_WINDOW_KEYS})
        out["temporal"] = [h.provenance() for h in prepared.heads]
    # As _job.json holds them: lists, not tuples, credentials masked (a changed password is the same job).
    return redact(json.loads(json.dumps(out)))


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"{k} ({change})" for k, change in changed(old, new, _same)]


def _same(key: str, old: Any, new: Any) -> bool:
    """Equal, or an output made before local paths were made absolute (config.absolute_local)
    recorded the same path as written: relative to the folder it was run from."""
    if old == new:
        return True
    local = key in ("source.uri", "apply.input") and isinstance(old, str) and isinstance(new, str) and "://" not in old
    return local and os.path.abspath(old) == new


def read_record(fs, root: str) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))
    except FileNotFoundError:
        return None


def open_output(prepared, overwrite: bool = False, retry_failed: bool = False,
                incremental: bool = False) -> Workspace:
    """Decide how this run uses OUT: start it, resume it, retry its failures, overwrite it, or
    (incremental) add the samples the source gained since it was planned."""
    job = prepared.job
    if overwrite and retry_failed:
        raise OutputExists("--overwrite and --retry-failed: choose one")
    if overwrite and incremental:
        raise OutputExists("--overwrite and --incremental: choose one (--overwrite lists the source anew anyway)")
    fs, out, previous, taken = _claim(job.output.uri, prepared.out_options, "output.uri")
    wanted = settings(prepared)
    if overwrite and taken:
        return _overwriting(fs, out, job.output.uri, wanted,
                            lambda root, uri, earlier: _workspace(prepared, fs, root, uri, wanted, earlier))
    if taken:
        _refuse_other_job(job.output.uri, previous, wanted)
    elif retry_failed:
        raise OutputExists(f"--retry-failed: output.uri {job.output.uri} holds no output to retry")
    if retry_failed:
        _forget_errors(fs, out, previous)
    return _workspace(prepared, fs, out, job.output.uri, wanted, previous, incremental)


def open_planned(uri: str, storage_options: Dict[str, Any], wanted: Dict[str, Any], make_plan: Callable[[], pa.Table],
                 kind: str, overwrite: bool = False, key: str = "--output") -> Workspace:
    """An output root whose plan the caller makes (apply: the rows of the table it reads), with
    the same rules as a run's: the same `wanted` settings resume, others are refused naming what
    differs, `overwrite` builds in OUT/_overwrite and swaps in when complete. `make_plan` is
    called only when no plan is saved; it needs sample_id, uri and container columns."""
    fs, out, previous, taken = _claim(uri, storage_options, key)

    def planned(root: str, at: str, earlier: Optional[Dict[str, Any]]) -> Workspace:
        resuming = earlier is not None and earlier.get("settings") == wanted
        folder = scratch()
        plan = local_plan(fs, root, folder.name) if resuming else None
        if plan is None:
            table = make_plan()
            write_atomic(fs, f"{root}/{PLAN_FILE}", parquet_bytes(table))
            plan = write_table(table, os.path.join(folder.name, "plan.parquet"))
            earlier = None
        return _ready(fs, root, at, wanted, plan, earlier, folder)

    if overwrite and taken:
        return _overwriting(fs, out, uri, wanted, planned)
    if taken:
        _refuse_other_job(uri, previous, wanted, kind=kind, key=key)
    return planned(out, uri, previous)


def _claim(uri: str, storage_options: Dict[str, Any], key: str):
    """(fs, OUT's root, its _job.json or None, whether it holds output); an --overwrite that
    stopped while swapping is finished first."""
    fs, out = filesystem(uri, with_connections(uri, storage_options, READERS))  # the audits' reads overlap
    out = out.rstrip("/")
    try:
        finish_swap(fs, out)
        previous = read_record(fs, out)
        taken = previous is not None or any(parquet_files(fs, f"{out}/{t}") for t in TABLES)
    except Exception as e:
        raise OutputExists(f"{key} {uri}: cannot be reached ({type(e).__name__}: {e})") from None
    return fs, out, previous, taken


def _overwriting(fs, out: str, uri: str, wanted: Dict[str, Any], workspace) -> Workspace:
    """The new output is built in OUT/_overwrite (resumed there if the same job began it)."""
    at, root = f"{uri.rstrip('/')}/{OVERWRITE}", f"{out}/{OVERWRITE}"
    earlier = read_record(fs, root)
    if earlier is not None and earlier.get("settings") != wanted:  # another job's overwrite
        fs.rm(root, recursive=True)
        earlier = None
    ws = workspace(root, at, earlier)
    ws.replaces = out
    return ws


def _refuse_other_job(uri: str, previous: Optional[Dict[str, Any]], wanted: Dict[str, Any], kind: str = "run",
                      key: str = "output.uri") -> None:
    if previous is None:
        raise OutputExists(f"{key} {uri} holds features or errors but no {JOB_FILE}: not this "
                           f"{kind}'s output; choose another {key}, or --overwrite to replace it")
    made_by = previous.get("kind", "run")  # a run's record names no kind
    if made_by != kind:
        raise OutputExists(f"{key} {uri} holds the output of {made_by} {previous.get('name')!r}, not of this "
                           f"{kind}; choose another {key}, or --overwrite to replace it")
    diff = differences(previous.get("settings", {}), wanted)
    if diff:
        raise OutputExists(f"{key} {uri} holds the output of {kind} {previous.get('name')!r} with different "
                           f"settings: {'; '.join(diff)}. Choose another {key}, or --overwrite to replace it")


def _workspace(prepared, fs, root: str, uri: str, wanted: Dict[str, Any], previous,
               incremental: bool = False) -> Workspace:
    resuming = previous is not None and previous.get("settings") == wanted
    folder = scratch()
    plan = local_plan(fs, root, folder.name) if resuming else None
    added = gone = 0
    if plan is None:
        plan = write_plan(prepared.job.source, folder.name)
        save_plan(fs, root, plan)
        previous = None
    elif incremental:
        plan, added, gone = extend_plan(fs, root, plan, prepared.job.source, folder.name)
    else:
        plan = _with_fetch_uris(plan, prepared.job.source, folder.name)  # OUT's plan has credentials masked
    return _ready(fs, root, uri, wanted, plan, previous, folder, added, gone)


def _ready(fs, root: str, uri: str, wanted: Dict[str, Any], plan: PlanFile, previous, folder, added: int = 0,
           gone: int = 0) -> Workspace:
    """The workspace once the plan is known: what an interrupted run left staged is published
    (not redone), and the plan rows not yet committed are the todo. The ledger's set of committed
    ids is read only when something is staged (to publish it without a row twice), and dropped
    once it is: the run's committer reads its own (committer.py)."""
    staged = parquet_files(fs, f"{root}/{STAGING}")
    ledger = Ledger(fs, root, state=None if staged else (set(), set()), job=fingerprint(wanted))
    ledger.recover()
    del ledger
    todo, committed = todo_of(fs, root, plan, folder.name)
    return Workspace(uri, fs, root, plan, todo, fingerprint(wanted), previous, added=added, gone=gone,
                     committed=committed, scratch=folder)


def extend_plan(fs, root: str, plan: PlanFile, source, folder: str) -> Tuple[PlanFile, int, int]:
    """--incremental: list the source again; samples it gained join the plan (saved before any
    work, so an interrupted run resumes them), samples it lost stay planned and keep their rows.
    Returns (plan with the real URIs of this listing, added, gone). A tar shard is one planned
    sample: a shard that grew is not reread. Joined out of core, like the todo (todo_of)."""
    os.makedirs(os.path.join(folder, "listing"))
    listed = parquet(write_plan(source, os.path.join(folder, "listing")).path)
    con = duckdb_in(folder)
    try:
        old = parquet(plan.path)
        new = f"FROM {listed} WHERE sample_id NOT IN (SELECT sample_id FROM {old})"
        added = con.execute(f"SELECT count(*) {new}").fetchall()[0][0]
        gone = len(plan) - (con.execute(f"SELECT count(*) FROM {listed}").fetchall()[0][0] - added)
        if added:
            # a plan saved by an older version may lack a column the listing has now: null there
            have = set(plan.schema.names)
            columns = ", ".join(f'"{f.name}"' if f.name in have else f'NULL AS "{f.name}"' for f in SAVED_SCHEMA)
            names = ", ".join(f'"{f.name}"' for f in SAVED_SCHEMA)
            merged = write_batches(query(con, f"SELECT {columns} FROM {old} UNION ALL SELECT {names} {new} "
                                              "ORDER BY sample_id"),
                                   os.path.join(folder, "merged.parquet"), SAVED_SCHEMA.with_metadata(_metadata(plan)))
            save_plan(fs, root, merged)
            plan, old = merged, parquet(merged.path)
        # the real URIs of this listing (the source is listed once); a sample no longer listed keeps its masked uri
        schema = plan.schema.remove_metadata()
        schema = schema if FETCH_URI in schema.names else schema.append(pa.field(FETCH_URI, pa.string()))
        with_uris = write_batches(query(con, f"SELECT p.* EXCLUDE ({FETCH_URI}), l.{FETCH_URI} FROM "
                                             f"(SELECT *, NULL::VARCHAR AS {FETCH_URI} FROM {old}) p LEFT JOIN "
                                             f"{listed} l USING (sample_id) ORDER BY sample_id"),
                                  os.path.join(folder, "plan.parquet"), schema.with_metadata(_metadata(plan)))
    finally:
        con.close()
    return with_uris, added, gone


def _metadata(plan: PlanFile) -> Dict[bytes, bytes]:
    return {k: v for k, v in (plan.schema.metadata or {}).items() if k != b"ARROW:schema"}


def save_plan(fs, root: str, plan: PlanFile) -> None:
    """OUT/_plan.parquet: the plan without the real URIs, streamed from the local plan."""
    schema = plan.schema
    saved = os.path.join(os.path.dirname(plan.path), "saved.parquet")
    names = [n for n in schema.names if n != FETCH_URI]
    keep = pa.schema([schema.field(n) for n in names], metadata=_metadata(plan))
    write_batches(plan.batches(names), saved, keep)
    put_atomic(fs, saved, f"{root}/{PLAN_FILE}")
    os.remove(saved)


def load_plan(fs, root: str) -> Optional[pa.Table]:
    try:
        return pq.read_table(f"{root}/{PLAN_FILE}", filesystem=fs)
    except FileNotFoundError:
        return None


def local_plan(fs, root: str, folder: str) -> Optional[PlanFile]:
    """OUT's saved plan as a local file: itself on local disk, else a copy in `folder`."""
    path = f"{root}/{PLAN_FILE}"
    if is_local(fs):
        return of_file(path) if os.path.exists(path) else None
    try:
        fs.get_file(path, os.path.join(folder, PLAN_FILE))
    except FileNotFoundError:
        return None
    return of_file(os.path.join(folder, PLAN_FILE))


def _with_fetch_uris(plan: PlanFile, source, folder: str) -> PlanFile:
    """A saved plan whose URIs hold masked credentials gets the real ones from a new listing, in
    memory (plan.with_fetch_uris): a source whose URIs carry credentials is not streamed."""
    if not any(has_masked_uris(pa.Table.from_batches([b])) for b in plan.batches(["uri"])):
        return plan
    return write_table(with_fetch_uris(plan.read(), source), os.path.join(folder, "plan-uris.parquet"))


def todo_of(fs, root: str, plan: PlanFile, folder: str) -> Tuple[PlanFile, Tuple[int, int]]:
    """The plan rows not yet done, with `skip` and `attempts`, into `folder`/todo.parquet, and the
    (ids, units) committed before. Out of core: the committed ids and units are copied from the
    store into local Parquet files a group of files at a time, and DuckDB leaves them out of the
    plan (ledger.not_done's rule: a tar shard is done when in _units, a file when its row is
    committed or its unit complete). A fresh run's todo is the plan streamed with two columns more."""
    ids = os.path.join(folder, "committed.parquet")
    units = os.path.join(folder, "units.parquet")
    n_ids = spill_column(fs, [f for t in TABLES for f in parquet_files(fs, f"{root}/{t}")], "sample_id", ids)
    n_units = spill_column(fs, parquet_files(fs, f"{root}/{UNITS}"), "unit", units)
    retry = os.path.join(folder, RETRY_FILE)
    try:
        fs.get_file(f"{root}/{RETRY_FILE}", retry)
    except FileNotFoundError:
        retry = None
    done: List[List[str]] = []  # the committed ids in order, read only for a plan with tar shards

    def more(batch: pa.RecordBatch) -> pa.Table:
        table = pa.Table.from_batches([batch])
        if "attempts" not in table.column_names:  # a fresh run's
            table = table.append_column("attempts", pa.array(np.zeros(len(table), np.int64)))
        if not done and pc.any(pc.equal(table["container"], "tar")).as_py():
            done.append(sorted(pq.read_table(ids)["sample_id"].to_pylist()))
        return _with_skip(table, done[0] if done else [])

    schema = plan.schema.remove_metadata().append(pa.field("skip", pa.list_(pa.string())))
    schema = schema.append(pa.field("attempts", pa.int64()))
    path = os.path.join(folder, "todo.parquet")
    if not (n_ids or n_units or retry):
        return write_batches(plan.batches(), path, schema, more), (0, 0)
    where = not_done(parquet(ids) if n_ids else None, parquet(units) if n_units else None)
    attempts = "0"
    if retry:  # how many runs already failed on each sample (a tar shard: the most among its members)
        attempts = (f"coalesce((SELECT max(attempts) FROM {parquet(retry)} r WHERE r.unit = p.sample_id), 0)")
    con = duckdb_in(folder)
    try:
        sql = (f"SELECT *, {attempts}::BIGINT AS attempts FROM {parquet(plan.path)} p WHERE {where} "
               f"ORDER BY sample_id")
        return write_batches(query(con, sql), path, schema, more), (n_ids, n_units)
    finally:
        con.close()


def _with_skip(todo: pa.Table, done: List[str]) -> pa.Table:
    """Tar shards list their members already committed (`done`, sorted), which the read stage
    passes over; any other row an empty list (built on Arrow: a todo of millions of files holds no
    Python list each)."""
    shards = pc.indices_nonzero(pc.equal(todo["container"], "tar")).to_pylist()
    lengths = np.zeros(len(todo), np.int32)
    members: List[str] = []
    if shards:
        ids = todo["sample_id"]
        for i in shards:
            sid = ids[i].as_py()
            lo, hi = bisect.bisect_left(done, sid + "/"), bisect.bisect_left(done, sid + "0")
            lengths[i] = hi - lo  # "0" follows "/": the ids under the shard
            members.extend(done[lo:hi])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]), pa.int32())
    return todo.append_column("skip", pa.ListArray.from_arrays(offsets, pa.array(members, pa.string())))


def _forget_errors(fs, root: str, previous: Dict[str, Any]) -> None:
    """--retry-failed: note the failures' attempts in _retry.parquet, then remove the errors
    table (and reopen the units they belong to), so that the run takes them up as not done.
    Each step can be repeated, so a retry that is interrupted is simply run again."""
    files = parquet_files(fs, f"{root}/errors")
    if not files:
        return
    errors = pq.ParquetDataset(files, filesystem=fs).read(columns=["sample_id", "attempts"])
    plan = pq.read_table(f"{root}/{PLAN_FILE}", filesystem=fs, columns=["sample_id", "container"])
    units = _units_of(errors["sample_id"].to_pylist(), plan)
    retry = pa.table({"unit": units, "sample_id": errors["sample_id"], "attempts": errors["attempts"]})
    write_atomic(fs, f"{root}/{RETRY_FILE}", parquet_bytes(retry))
    _reopen_units(fs, root, set(units))
    for f in files:
        fs.rm(f)
    if is_local(fs) and not fs.ls(f"{root}/errors"):  # an empty folder fails readers that read its schema
        fs.rmdir(f"{root}/errors")


def _units_of(ids: List[str], plan: pa.Table) -> List[str]:
    """The plan row each sample id comes from: itself, its tar shard, or its windowed video."""
    planned = pc.is_in(pa.array(ids, pa.string()), value_set=plan["sample_id"]).to_pylist()
    shards = set(plan.filter(pc.equal(plan["container"], "tar"))["sample_id"].to_pylist())
    out = []
    for sid, is_planned in zip(ids, planned):
        unit = sid if is_planned else sid.rsplit("#w", 1)[0]
        parts = sid.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in shards:
                unit = "/".join(parts[:n])
                break
        out.append(unit)
    return out


def _reopen_units(fs, root: str, units: set) -> None:
    files = parquet_files(fs, f"{root}/{UNITS}")
    done = set(read_column(fs, files, "unit").to_pylist())
    if not done & units:
        return
    keep = sorted(done - units)
    units = pa.table({"unit": pa.array(keep, pa.string())})
    write_atomic(fs, f"{root}/{UNITS}/part-reopened.parquet", parquet_bytes(units))
    for f in files:
        if not f.endswith("/part-reopened.parquet"):
            fs.rm(f)


def finish(ws: Workspace) -> None:
    """After a run that completed: drop what only the run needed, and swap an --overwrite
    output into place."""
    clear_staging(ws.fs, ws.root)
    if ws.fs.exists(f"{ws.root}/{RETRY_FILE}"):
        ws.fs.rm(f"{ws.root}/{RETRY_FILE}")
    if ws.replaces:
        start_swap(ws.fs, ws.replaces)


def multi_row_units(todo: PlanFile, windowed: bool) -> List[str]:
    """The units of this run that may yield several rows: tar shards, and videos cut into windows."""
    units: List[str] = []
    for batch in todo.batches(["sample_id", "container"]):
        ids = batch.column(0) if windowed else batch.column(0).filter(pc.equal(batch.column(1), "tar"))
        units.extend(ids.to_pylist())
    return units


# --overwrite: the swap. `_swap.json` lists the new output's files before anything moves, so a
# swap that stops midway is finished by the next run instead of being left half done. Old files
# that the new output lacks go first, then the new ones move in (same names replace atomically),
# so a reader sees some files missing for a moment but never a sample twice.

ENTRIES = ("features", "errors", UNITS)


def start_swap(fs, out: str) -> None:
    new = f"{out}/{OVERWRITE}"
    files = [f[len(new) + 1:] for e in ENTRIES for f in parquet_files(fs, f"{new}/{e}")]
    write_atomic(fs, f"{out}/{SWAP_FILE}", json.dumps({"files": files}).encode())
    finish_swap(fs, out)


def finish_swap(fs, out: str) -> None:
    try:
        files = set(json.loads(fs.cat_file(f"{out}/{SWAP_FILE}"))["files"])
    except FileNotFoundError:
        return
    new = f"{out}/{OVERWRITE}"
    for e in ENTRIES:
        for f in parquet_files(fs, f"{out}/{e}"):
            if f[len(out) + 1:] not in files:
                fs.rm(f)
    for rel in sorted(files):
        if fs.exists(f"{new}/{rel}"):
            move(fs, f"{new}/{rel}", f"{out}/{rel}")
    for name in (PLAN_FILE, JOB_FILE):  # the job record last: it says the swap is done
        if fs.exists(f"{new}/{name}"):
            move(fs, f"{new}/{name}", f"{out}/{name}")
    if fs.exists(new):
        fs.rm(new, recursive=True)
    for left in (STAGING, RETRY_FILE):  # the old job's: never to be published or applied to the new one
        if fs.exists(f"{out}/{left}"):
            fs.rm(f"{out}/{left}", recursive=True)
    fs.rm(f"{out}/{SWAP_FILE}")
