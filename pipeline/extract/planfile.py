"""The plan and the todo on the driver's disk, not in its memory.

A plan is a local Parquet file sorted by sample_id (`PlanFile`): the driver holds its path and row
count, and reads it a batch at a time. Listed rows are spilled to Parquet as they come, then sorted
and checked for duplicate ids out of core by DuckDB (an external sort with a memory limit, spilling
to the scratch folder: a well-kept one rather than a hand-written merge of sorted runs), so the
driver's memory while planning is bounded by `SORT_MEMORY` and a listed batch, not by the rows.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..procs import alive

BATCH_ROWS = 65_536  # rows listed, sorted or filtered at a time
SORT_MEMORY = "256MB"  # DuckDB's limit while sorting and joining: beyond it, it spills to the scratch folder
IN_MEMORY_ROWS = BATCH_ROWS  # a plan of up to this many rows is sorted in memory
SEQ = "_seq"  # a spilled row's place in the listing: equal ids sort in the order listed
FILE_READ_TASKS = 256  # read tasks per todo file made for Ray Data: a footer of a few hundred KB


@dataclass
class PlanFile:
    """A plan (or a todo) as a local Parquet file, sorted by sample_id."""

    path: str
    rows: int

    def __len__(self) -> int:
        return self.rows

    @property
    def schema(self) -> pa.Schema:
        return pq.read_schema(self.path)

    def __getitem__(self, column: str) -> pa.ChunkedArray:
        """One column, read whole (for the columns a caller needs in memory anyway)."""
        return self.read([column])[column]

    def read(self, columns: Optional[List[str]] = None) -> pa.Table:
        return pq.read_table(self.path, columns=columns)

    def batches(self, columns: Optional[List[str]] = None) -> Iterator[pa.RecordBatch]:
        return pq.ParquetFile(self.path).iter_batches(BATCH_ROWS, columns=columns)


def of_file(path: str) -> PlanFile:
    return PlanFile(path, pq.ParquetFile(path).metadata.num_rows)


def write_table(table: pa.Table, path: str) -> PlanFile:
    pq.write_table(table, path, row_group_size=BATCH_ROWS, compression="zstd")
    return PlanFile(path, len(table))


SCRATCH_PREFIX = "featurize-plan-"


def scratch() -> tempfile.TemporaryDirectory:
    """A local folder for a run's plan, todo and sort spills (in TMPDIR), removed when the run's
    workspace is dropped or the process exits. Local, not in OUT: the plan held here may carry
    the real URIs, credentials and all, that OUT's copy masks. Its name holds this host and process,
    so a later run can remove what a killed one left (remove_orphans)."""
    remove_orphans()
    return tempfile.TemporaryDirectory(prefix=f"{host_prefix()}{os.getpid()}-")


def remove_orphans() -> List[str]:
    """Remove the scratch folders that drivers on this host left when they were killed (SIGKILL, the
    OOM killer: no exit handler runs), as each holds a plan with the real URIs, as large as the
    listing. Only this user's, and only those whose process is gone: another host's (a TMPDIR
    shared between containers) or a live run's stay. Returns the folders removed."""
    import shutil

    mine = host_prefix()
    removed = []
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(mine):
            continue
        pid = entry.name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or alive(pid, None):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def host_prefix() -> str:
    """How the names of this host's scratch folders start: `featurize-plan-<host>-`, the host's name
    with no separator of ours or the path's."""
    import socket

    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f"{SCRATCH_PREFIX}{host}-"


def spill(batches: Iterable[pa.RecordBatch], path: str, schema: pa.Schema) -> int:
    """Write the batches to `path` as they come, each row with its place (SEQ); returns the rows."""
    rows = 0
    with pq.ParquetWriter(path, schema.append(pa.field(SEQ, pa.int64())), compression="zstd") as writer:
        for batch in batches:
            seq = pa.array(np.arange(rows, rows + batch.num_rows, dtype=np.int64))
            writer.write_batch(pa.RecordBatch.from_arrays([*batch.columns, seq], schema=writer.schema))
            rows += batch.num_rows
    return rows


def duckdb_in(folder: str):
    """A DuckDB connection held to SORT_MEMORY, spilling under `folder`."""
    import duckdb  # here: only the driver plans

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{SORT_MEMORY}'")
    con.execute(f"SET temp_directory = {sql_text(os.path.join(folder, 'duckdb'))}")
    con.execute("SET preserve_insertion_order = true")
    return con


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def parquet(path: str) -> str:
    return f"read_parquet({sql_text(path)})"


def write_batches(batches: Iterable[pa.RecordBatch], path: str, schema: pa.Schema,
                  each: Callable[[pa.RecordBatch], Union[pa.RecordBatch, pa.Table]] = lambda b: b) -> PlanFile:
    """Stream batches to `path` as `schema` (its metadata too), `each` applied to every batch."""
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in batches:
            table = each(batch)
            table = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
            writer.write_table(table.select(schema.names).cast(schema), row_group_size=BATCH_ROWS)
            rows += table.num_rows
    return PlanFile(path, rows)


def query(con, sql: str) -> Iterator[pa.RecordBatch]:
    return iter(con.sql(sql).to_arrow_reader(BATCH_ROWS))


def sort_unique(src: str, dest: str, schema: pa.Schema, check: Callable[[pa.Table], None]) -> PlanFile:
    """The spilled rows of `src` sorted by sample_id (equal ids in the order listed) into `dest`;
    `check` sees each sorted batch with the row before it, so it can refuse an id listed twice.
    Up to IN_MEMORY_ROWS rows are sorted by Arrow (no DuckDB to start for a small plan)."""
    previous: List[pa.RecordBatch] = []

    def checked(batch: pa.RecordBatch) -> pa.RecordBatch:
        batch = batch.select(schema.names).cast(schema.remove_metadata())
        check(pa.Table.from_batches(previous + [batch]))
        previous[:] = [batch.slice(batch.num_rows - 1)] if batch.num_rows else previous
        return batch

    if pq.ParquetFile(src).metadata.num_rows <= IN_MEMORY_ROWS:
        table = pq.read_table(src)
        table = table.take(pc.sort_indices(table, [("sample_id", "ascending"), (SEQ, "ascending")]))
        return write_batches(table.to_batches(BATCH_ROWS), dest, schema, checked)
    con = duckdb_in(os.path.dirname(dest))
    try:
        return write_batches(query(con, f"SELECT * FROM {parquet(src)} ORDER BY sample_id, {SEQ}"), dest, schema,
                             checked)
    finally:
        con.close()


def read_task_files(todo: PlanFile, rows_per_task: int, folder: str) -> List[str]:
    """The todo rewritten for Ray Data's read tasks: row groups of `rows_per_task` rows (a task
    reads one), FILE_READ_TASKS of them a file."""
    os.makedirs(folder, exist_ok=True)
    files: List[str] = []
    per_file = rows_per_task * FILE_READ_TASKS
    writer = None
    written = per_file
    source = pq.ParquetFile(todo.path)
    for batch in source.iter_batches(rows_per_task):  # batches of exactly rows_per_task, the last shorter
        if written >= per_file:
            if writer is not None:
                writer.close()
            files.append(os.path.join(folder, f"todo-{len(files):06d}.parquet"))
            writer, written = pq.ParquetWriter(files[-1], source.schema_arrow), 0
        writer.write_batch(batch, row_group_size=rows_per_task)
        written += batch.num_rows
    if writer is not None:
        writer.close()
    return files
