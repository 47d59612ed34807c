"""The commit protocol: every planned sample exactly once across OUT/features and OUT/errors.

Write tasks hand each Parquet file whole to one Committer actor (committer.py), around the Ledger
here. It holds the set of committed sample ids (read back from the files when it starts) and
publishes a file so that it becomes visible only whole and never replaces one: on local disk the
write task stages it under `OUT/_staging/` and the ledger hard-links it to its name; on object
stores the file's bytes travel in the commit call and the ledger PUTs them with `If-None-Match: *`
(one request a file; staging it and copying it server-side took about nine, bench/commit.py).
The committer publishes several files at once (a threaded actor): a file's rows are reserved
under the ledger's lock, published outside it, and recorded once the store has them. Rows it has
already published, because Ray re-ran a task after an actor, worker or node died and the blocks
came out cut differently, are dropped before publishing, so no sample ever lands twice. The
published files themselves are the record of what is done: nothing else has to be kept in step with them.

Guards at the edges: a file is named by a hash of its JSON-encoded id list, so two different
lists never share a name, and publishing never replaces a file (CommitConflict fails the job
instead of losing committed rows). Runs stage under `_staging/<job fingerprint>/<run id>/`, and
recovery publishes only its own job's files (bytes in flight to an object store when a run is
killed are not kept: its resume makes those files again). The committer publishes only while its run holds
OUT's lease (lease.py), and a run ends well only if `audit` of the files on the store finds
every planned sample once.

A plan row can yield several rows: a tar shard its members, a video its windows. Such a unit is
done when all its rows are committed; rows say how many their unit has (`unit_rows`, set on the
shard's last member once the stream ends, or on every window), and completed units are recorded
in `OUT/_units/` so that a resumed run skips them without reading them again.

Why not Ray Data's own checkpointing: it filters rows only for `read_*` sources, and for a
custom datasink it records ids after the data is written (at least once), so it cannot keep a
row that Ray re-executes from being written twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ..extract.planfile import PlanFile, duckdb_in, parquet, scratch, sql_text
from ..redact import logger
from .store import (  # noqa: F401 (re-exported)
    is_local,
    move,
    parquet_bytes,
    parquet_files,
    publish,
    read_column,
    same_bytes,
    write_atomic,
)

STAGING, UNITS = "_staging", "_units"
TABLES = ("features", "errors")
log = logger(__name__)  # credentials masked in every record


class CommitConflict(RuntimeError):
    """A file was about to be published onto a name that already holds a committed file."""


@dataclass
class Staged:
    """A whole Parquet file waiting for the committer: staged under _staging (`path`), or, on
    object stores, its bytes carried along (`data`, `path` empty)."""

    path: str  # where it is staged ("" when `data` holds it)
    rel: str  # where it is published, relative to OUT: features/split_dir=train/part-....parquet
    ids: List[str]  # its rows' sample ids, in order
    kinds: List[str] = field(default_factory=list)  # errors: "stage/error_type" per row
    units: List[Tuple[str, str, int]] = field(default_factory=list)  # rows of multi-row units
    data: Optional[bytes] = None  # the file itself, published by one exclusive PUT
    row_group_bytes: Optional[int] = None  # its row groups' size, kept when its rows are written anew

    def table(self, fs) -> pa.Table:
        if self.data is not None:
            return pq.read_table(io.BytesIO(self.data))
        return pq.read_table(self.path, filesystem=fs)

    def drop(self, fs) -> None:
        """Remove what was staged (nothing to remove for carried bytes)."""
        if self.data is None:
            fs.rm(self.path)


def error_kinds(table: pa.Table) -> List[str]:
    """"stage/error_type" of each row of an errors table."""
    return [f"{s}/{k}" for s, k in zip(table["stage"].to_pylist(), table["error_type"].to_pylist())]


def part_name(ids: Iterable[str]) -> str:
    """Named by the sample ids it holds, so the same rows always land on the same name.

    The ids are hashed as a JSON list, an encoding no two different lists share (a newline or a
    comma inside an id is escaped, not a separator; ASCII escapes also carry the lone surrogates
    that undecodable file names become). 32 hex digits (128 bits) make an accidental SHA-256
    collision negligible at any dataset size; should one happen, publishing refuses it."""
    key = json.dumps(list(ids), ensure_ascii=True, separators=(",", ":"))
    return f"part-{hashlib.sha256(key.encode('ascii')).hexdigest()[:32]}.parquet"


def committed_ids(fs, root: str) -> Dict[str, pa.ChunkedArray]:
    """The sample ids of OUT/features and of OUT/errors as the files on the store hold them (Arrow
    arrays, a few bytes an id; an id committed twice shows twice)."""
    return {t: read_column(fs, parquet_files(fs, f"{root}/{t}"), "sample_id") for t in TABLES}


def committed_units(fs, root: str) -> pa.ChunkedArray:
    return read_column(fs, parquet_files(fs, f"{root}/{UNITS}"), "unit")


def clear_staging(fs, root: str) -> None:
    try:
        fs.rm(f"{root.rstrip('/')}/{STAGING}", recursive=True)
    except FileNotFoundError:
        pass


def staging_folder(job: str, run: str) -> str:
    """Where a run's write tasks stage, relative to OUT/_staging: named for the job (a hash of
    the settings that decide the output) and the run, so recovery can tell its own files."""
    return f"{job}/{run}"


class Ledger:
    """What OUT holds: committed sample ids and completed multi-row units; publishes staged files.

    `job` is this job's fingerprint (output.fingerprint): recovery publishes only files staged
    under it. `fence`, when given, is called before each commit and raises if this run no longer
    holds OUT's lease (lease.Fence), so a run that lost it cannot publish.

    `commit` may be called from several threads at once (the committer is a threaded actor, so
    that an object store's round trips overlap): what is decided (which rows are new, units,
    counts) is decided under one lock; the store's requests are made outside it. A file's new rows
    are reserved while it is published, and a file that shares a reserved row waits for that
    publish to end (only a re-executed block's files share rows), so no row is published twice."""

    def __init__(self, fs, root: str, state: Optional[Tuple[Set[str], Set[str]]] = None, job: str = "",
                 fence: Optional[Callable[[], None]] = None):
        self.fs, self.root, self.job, self.fence = fs, root.rstrip("/"), job, fence
        if state is None:
            state = (set(), set(committed_units(fs, self.root).to_pylist()))
            for ids in committed_ids(fs, self.root).values():
                for chunk in ids.chunks:  # a file's ids at a time: no second list of all of them
                    state[0].update(chunk.to_pylist())
        self.rows, self.units = state
        self.pending: Dict[str, Tuple[Set[str], int]] = {}  # unit -> (its rows seen, rows expected)
        self.reserved: Set[str] = set()  # rows of files being published now
        self.lock = threading.Condition()

    def recover(self) -> int:
        """Publish (or drop, if already there) what an interrupted run of this job left staged;
        remove what another job left (a killed job whose output was then overwritten)."""
        staging = f"{self.root}/{STAGING}"
        published = foreign = 0
        for path in parquet_files(self.fs, staging):
            parts = path[len(staging) + 1:].split("/")  # job / run / write task / rel
            if not self.job or len(parts) < 5 or parts[0] != self.job or parts[3] not in TABLES:
                self.fs.rm(path)
                foreign += 1
                continue
            rel = "/".join(parts[3:])
            ids = pq.read_table(path, columns=["sample_id"], filesystem=self.fs)["sample_id"].to_pylist()
            kinds = []
            if rel.startswith("errors/"):
                kinds = error_kinds(pq.read_table(path, columns=["stage", "error_type"], filesystem=self.fs))
            published += self._publish(Staged(path, rel, ids, kinds))[0]
        if foreign:
            log.warning("%s: removed %d staged files of another job or an older version",
                                                staging, foreign)
        return published

    def commit(self, staged: List[Staged]) -> Dict[str, Any]:
        if self.fence is not None:
            self.fence()
        result: Dict[str, Any] = {"features": 0, "errors": Counter(), "duplicates": 0, "files": 0, "units": 0}
        for s in staged:
            multi = {sid for sid, _, _ in s.units}
            new, kinds, singles = self._publish(s, multi)
            result["units"] += singles
            if s.rel.startswith("errors/"):
                result["errors"].update(kinds)
            else:
                result["features"] += new
            result["duplicates"] += len(s.ids) - new
            result["files"] += int(new > 0)
        with self.lock:
            completed = self._track_units(u for s in staged for u in s.units)
            done = sorted(set(completed) - self.units)
        result["units"] += len(done)  # plan rows done: single rows, and whole units
        self.complete_units(done)
        return result

    def complete_units(self, units: Iterable[str]) -> None:
        with self.lock:
            done = sorted(set(units) - self.units)
        if done:
            table = pa.table({"unit": done})
            write_atomic(self.fs, f"{self.root}/{UNITS}/{part_name(done)}", parquet_bytes(table))
            with self.lock:
                self.units.update(done)

    def _publish(self, s: Staged, multi: Set[str] = frozenset()) -> Tuple[int, List[str], int]:
        """(rows published, their error kinds, single-row plan rows done); rows already committed are
        dropped first."""
        keep = self._reserve(s)
        try:
            self._write(s, keep)
        finally:
            with self.lock:
                self.reserved.difference_update(s.ids[i] for i in keep)
                self.lock.notify_all()
        with self.lock:  # recorded only once the store holds them
            self.rows.update(s.ids[i] for i in keep)
        singles = sum(1 for i in keep if s.ids[i] not in multi)
        return len(keep), [s.kinds[i] for i in keep] if s.kinds else [], singles

    def _reserve(self, s: Staged) -> List[int]:
        """The rows of `s` not committed yet, reserved for this thread; waits while another thread
        publishes a file that shares rows with it."""
        with self.lock:
            while self.reserved.intersection(s.ids):
                self.lock.wait()
            keep = [i for i, sid in enumerate(s.ids) if sid not in self.rows]
            self.reserved.update(s.ids[i] for i in keep)
            return keep

    def _write(self, s: Staged, keep: List[int]) -> None:
        """Make the kept rows of `s` a published file, never onto a file there (CommitConflict)."""
        final = f"{self.root}/{s.rel}"
        data = s.data
        try:
            if len(keep) == len(s.ids) and data is None:
                publish(self.fs, s.path, final)
            elif keep:
                if len(keep) < len(s.ids):
                    table = s.table(self.fs).take(keep)
                    final = posixpath.join(posixpath.dirname(final), part_name(table["sample_id"].to_pylist()))
                    data = parquet_bytes(table, s.row_group_bytes)
                self._put(final, data)
                s.drop(self.fs)
            else:
                s.drop(self.fs)
        except FileExistsError:  # never replace a committed file: its rows would be lost
            raise CommitConflict(f"{final} already holds committed rows; refusing to replace it with "
                                 f"{len(keep)} new rows (first: {s.ids[keep[0]]!r})") from None
        except FileNotFoundError:  # recovered by a restarted committer, or a twin task's file
            if keep:
                raise

    def _put(self, final: str, data: bytes) -> None:
        """One exclusive write. A PUT whose reply was lost is retried by the client and then finds its
        own object there (HTTP 412): the same bytes are taken as published, anything else refused."""
        try:
            write_atomic(self.fs, final, data, exclusive=True)
        except FileExistsError:
            if not same_bytes(self.fs, final, data):
                raise

    def _track_units(self, rows: Iterable[Tuple[str, str, int]]) -> List[str]:
        completed = []
        for sample_id, unit, expected in rows:
            seen, known = self.pending.get(unit, (set(), 0))
            seen.add(sample_id)
            known = known or expected
            self.pending[unit] = (seen, known)
            if known > 0 and len(seen) >= known:
                completed.append(unit)
                del self.pending[unit]
        return completed


COMMITTED_GROUP = 256  # committed files whose ids are read (concurrently) and spilled at a time


def spill_column(fs, files: List[str], column: str, path: str) -> int:
    """`column` of the files into the local Parquet file `path`, COMMITTED_GROUP files at a time
    (each opened once); returns its rows."""
    rows = 0
    with pq.ParquetWriter(path, pa.schema([(column, pa.string())])) as writer:
        for i in range(0, len(files), COMMITTED_GROUP):
            values = read_column(fs, files[i:i + COMMITTED_GROUP], column).cast(pa.string())
            writer.write_table(pa.table({column: values}))
            rows += len(values)
    return rows


def not_done(ids: Optional[str], units: Optional[str]) -> str:
    """The plan rows not yet done, as a DuckDB condition on the plan against relations of committed
    `sample_id`s and completed `unit`s (None: there are none): a tar shard is done when recorded
    complete in _units, a file when its row is committed or (a windowed video) its unit is complete."""
    where = ["TRUE"]
    if units:
        where.append(f"sample_id NOT IN (SELECT unit FROM {units})")
    if ids:
        where.append(f"NOT (container = '' AND sample_id IN (SELECT sample_id FROM {ids}))")
    return " AND ".join(where)


def audit(fs, root: str, plan) -> Dict[str, Any]:
    """What the files on the store hold against the plan (a table, or a local plan file): planned
    samples missing (count and first), sample ids committed more than once across features and
    errors, and the rows of each table. Out of core: each file is opened once, for its ids and
    rows, and its ids spilled to local Parquet; DuckDB counts them against the plan under its
    memory limit, so the driver's memory does not grow with the rows."""
    with scratch() as folder:
        spilled = {t: os.path.join(folder, f"{t}.parquet") for t in (*TABLES, UNITS)}
        rows = {t: spill_column(fs, parquet_files(fs, f"{root}/{t}"), "sample_id", spilled[t]) for t in TABLES}
        spill_column(fs, parquet_files(fs, f"{root}/{UNITS}"), "unit", spilled[UNITS])
        con = duckdb_in(folder)
        try:
            if isinstance(plan, PlanFile):
                planned = parquet(plan.path)
            else:
                con.register("plan_table", plan.select(["sample_id", "container"]))
                planned = "plan_table"
            ids = f"read_parquet([{', '.join(sql_text(spilled[t]) for t in TABLES)}])"
            missing, first = con.execute(f"SELECT count(*), min(sample_id) FROM {planned} "
                                         f"WHERE {not_done(ids, parquet(spilled[UNITS]))}").fetchall()[0]
            twice = con.execute(f"SELECT sample_id FROM {ids} GROUP BY sample_id HAVING count(*) > 1 "
                                "ORDER BY sample_id").fetchall()
        finally:
            con.close()
    return {"missing": missing, "first_missing": first, "duplicates": [r[0] for r in twice], "rows": rows}


@dataclass
class Tally:
    """A run's progress as its committer knows it: plan rows done (`units`: an image, a video, a
    tar shard), rows committed (a shard's members, a video's clips), error rows, and the busy
    seconds per stage of the committed rows (timing.py)."""

    units: int = 0
    features: int = 0
    errors: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)

    def add(self, result: Dict[str, Any], seconds: Dict[str, float]) -> None:
        self.units += result.get("units", 0)
        self.features += result["features"]
        self.errors += sum(result["errors"].values())
        for stage, s in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s

    @property
    def rows(self) -> int:
        return self.features + self.errors
