"""The commit protocol without Ray: staging, publishing, dropping rows already committed, units."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline import faults
from pipeline.commit import Ledger, Staged, parquet_bytes, parquet_files, part_name, remaining, write_atomic
from pipeline.sources import PLAN_SCHEMA

FS = LocalFileSystem()


def stage(root, rel_folder, ids, units=()):
    columns = {"sample_id": ids, "value": list(range(len(ids)))}
    if rel_folder == "errors":
        columns.update(stage=["decode"] * len(ids), error_type=["Broken"] * len(ids))
    table = pa.table(columns)
    rel = f"{rel_folder}/{part_name(ids)}"
    path = f"{root}/_staging/task-{len(ids)}-{ids[0]}/{rel}"
    write_atomic(FS, path, parquet_bytes(table))
    kinds = ["decode/Broken"] * len(ids) if rel_folder == "errors" else []
    return Staged(path, rel, list(ids), kinds, list(units))


def published_ids(root):
    files = [f for t in ("features", "errors") for f in parquet_files(FS, f"{root}/{t}")]
    return sorted(i for f in files for i in pq.read_table(f)["sample_id"].to_pylist())


def test_publish_moves_staged_files_and_counts(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root)
    result = ledger.commit([stage(root, "features/split=a", ["a1", "a2"]), stage(root, "errors", ["b1"])])
    assert result["features"] == 2 and result["errors"] == {"decode/Broken": 1} and result["duplicates"] == 0
    assert published_ids(root) == ["a1", "a2", "b1"]
    assert not parquet_files(FS, f"{root}/_staging")  # moved, not copied


def test_rows_already_committed_are_dropped_whole_or_in_part(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root)
    ledger.commit([stage(root, "features", ["x1", "x2", "x3"])])
    # Ray re-ran the task and cut its blocks differently: one file all old, one half old
    result = ledger.commit([stage(root, "features", ["x1", "x2"]), stage(root, "features", ["x3", "x4"])])
    assert result["features"] == 1 and result["duplicates"] == 3
    assert published_ids(root) == ["x1", "x2", "x3", "x4"]
    # the half-old file was rewritten with its new row only, named by that row
    assert os.path.exists(f"{root}/features/{part_name(['x4'])}")
    assert pq.read_table(f"{root}/features/{part_name(['x4'])}")["value"].to_pylist() == [1]


def test_an_error_and_a_feature_for_one_sample_keep_the_first(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root)
    ledger.commit([stage(root, "errors", ["s1"])])
    assert ledger.commit([stage(root, "features", ["s1"])])["features"] == 0
    assert published_ids(root) == ["s1"]


def test_a_new_ledger_reads_back_what_is_committed_and_publishes_leftovers(tmp_path):
    root = str(tmp_path)
    Ledger(FS, root).commit([stage(root, "features", ["a", "b"])])
    stage(root, "features", ["b", "c"])  # staged by a run that was killed before committing
    stage(root, "errors", ["d"])
    ledger = Ledger(FS, root)
    assert ledger.rows == {"a", "b"}
    assert ledger.recover() == 2  # c and d; b was already there
    assert published_ids(root) == ["a", "b", "c", "d"]
    ledger.clear_staging()
    assert not os.path.exists(f"{root}/_staging")


def test_units_complete_when_all_their_rows_are_committed_in_any_order(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root)
    # shard.tar has three members; only the last one read knows the count
    ledger.commit([stage(root, "features", ["shard.tar/k3"], [("shard.tar/k3", "shard.tar", 3)])])
    ledger.commit([stage(root, "features", ["shard.tar/k1"], [("shard.tar/k1", "shard.tar", 0)])])
    assert "shard.tar" not in ledger.units
    ledger.commit([stage(root, "errors", ["shard.tar/k2"], [("shard.tar/k2", "shard.tar", 0)])])
    assert "shard.tar" in ledger.units
    assert Ledger(FS, root).units == {"shard.tar"}  # recorded in _units


def test_remaining_plan_rows():
    plan = pa.Table.from_pylist(
        [{"sample_id": "a.jpg", "uri": "", "label": "", "split": "", "container": ""},
         {"sample_id": "b.jpg", "uri": "", "label": "", "split": "", "container": ""},
         {"sample_id": "s.tar", "uri": "", "label": "", "split": "", "container": "tar"},
         {"sample_id": "t.tar", "uri": "", "label": "", "split": "", "container": "tar"},
         {"sample_id": "v.mp4", "uri": "", "label": "", "split": "", "container": ""}],
        schema=PLAN_SCHEMA,
    )
    # a shard's own id as a row (its error row) does not make it done; only its unit record does
    left = remaining(plan, rows={"a.jpg", "s.tar", "v.mp4#w0"}, units={"t.tar", "v.mp4"})
    assert left["sample_id"].to_pylist() == ["b.jpg", "s.tar"]


def test_a_write_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "write.json").write_text('{"action": "raise"}')
    monkeypatch.setenv(faults.ENV, str(tmp_path / "faults"))
    target = tmp_path / "out" / "features" / "part-x.parquet"
    with pytest.raises(faults.InjectedFault):
        write_atomic(FS, str(target), parquet_bytes(pa.table({"sample_id": ["a"] * 1000})))
    assert not target.exists()
    assert parquet_files(FS, str(tmp_path / "out" / "features")) == []  # the half-written temp is hidden


def test_a_failpoint_counts_its_hits_afresh_each_time_it_is_armed(tmp_path, monkeypatch):
    folder = tmp_path / "faults"
    folder.mkdir()
    monkeypatch.setenv(faults.ENV, str(folder))
    for _ in range(2):  # a process that saw an earlier arming must not carry its count over
        spec = folder / "write.json"
        spec.unlink(missing_ok=True)
        spec.write_text('{"action": "raise", "after": 2}')
        faults.point("write", "a")  # hit 1 of this arming: nothing happens
        with pytest.raises(faults.InjectedFault):
            faults.point("write", "b")
        (folder / "write.json.fired").unlink()


def test_the_sink_passes_over_an_empty_block(tmp_path):
    """A read task can yield nothing (a resumed tar shard whose members are all committed); Ray
    Data then hands the sink a block without columns, which holds nothing to write."""
    from pipeline.sinks import ParquetCommitSink, SinkSpec, image_columns

    spec = SinkSpec(str(tmp_path / "out"), {}, ["split"], image_columns("float16", 4))
    result = ParquetCommitSink(spec, committer=None).write([pa.table({})], ctx=None)
    assert (result["features"], result["files"], sum(result["errors"].values())) == (0, 0, 0)
    assert not (tmp_path / "out" / "features").exists()
