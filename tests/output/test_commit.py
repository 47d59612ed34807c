"""The commit protocol without Ray: staging, publishing, dropping rows already committed, units."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import faults
from pipeline.extract.plan import PLAN_SCHEMA
from pipeline.output.ledger import (
    CommitConflict,
    Ledger,
    Staged,
    audit,
    clear_staging,
    not_done,
    parquet_bytes,
    parquet_files,
    part_name,
    write_atomic,
)

from conftest import S3_BUCKET

FS = LocalFileSystem()
JOB = "job0fingerprint"  # output.fingerprint of the job the tests' ledgers belong to


def stage(root, rel_folder, ids, units=(), job=JOB):
    columns = {"sample_id": ids, "value": list(range(len(ids)))}
    if rel_folder == "errors":
        columns.update(stage=["decode"] * len(ids), error_type=["Broken"] * len(ids))
    table = pa.table(columns)
    rel = f"{rel_folder}/{part_name(ids)}"
    path = f"{root}/_staging/{job}/run1/task-{len(ids)}-{ids[0]}/{rel}"
    write_atomic(FS, path, parquet_bytes(table))
    kinds = ["decode/Broken"] * len(ids) if rel_folder == "errors" else []
    return Staged(path, rel, list(ids), kinds, list(units))


def published_ids(root):
    files = [f for t in ("features", "errors") for f in parquet_files(FS, f"{root}/{t}")]
    return sorted(i for f in files for i in pq.read_table(f)["sample_id"].to_pylist())


def test_publish_moves_staged_files_and_counts(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    result = ledger.commit([stage(root, "features/split=a", ["a1", "a2"]), stage(root, "errors", ["b1"])])
    assert result["features"] == 2 and result["errors"] == {"decode/Broken": 1} and result["duplicates"] == 0
    assert published_ids(root) == ["a1", "a2", "b1"]
    assert not parquet_files(FS, f"{root}/_staging")  # moved, not copied


def test_rows_already_committed_are_dropped_whole_or_in_part(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
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
    ledger = Ledger(FS, root, job=JOB)
    ledger.commit([stage(root, "errors", ["s1"])])
    assert ledger.commit([stage(root, "features", ["s1"])])["features"] == 0
    assert published_ids(root) == ["s1"]


def test_a_new_ledger_reads_back_what_is_committed_and_publishes_leftovers(tmp_path):
    root = str(tmp_path)
    Ledger(FS, root, job=JOB).commit([stage(root, "features", ["a", "b"])])
    stage(root, "features", ["b", "c"])  # staged by a run that was killed before committing
    stage(root, "errors", ["d"])
    ledger = Ledger(FS, root, job=JOB)
    assert ledger.rows == {"a", "b"}
    assert ledger.recover() == 2  # c and d; b was already there
    assert published_ids(root) == ["a", "b", "c", "d"]
    clear_staging(FS, root)
    assert not os.path.exists(f"{root}/_staging")


def test_units_complete_when_all_their_rows_are_committed_in_any_order(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    # shard.tar has three members; only the last one read knows the count
    ledger.commit([stage(root, "features", ["shard.tar/k3"], [("shard.tar/k3", "shard.tar", 3)])])
    ledger.commit([stage(root, "features", ["shard.tar/k1"], [("shard.tar/k1", "shard.tar", 0)])])
    assert "shard.tar" not in ledger.units
    ledger.commit([stage(root, "errors", ["shard.tar/k2"], [("shard.tar/k2", "shard.tar", 0)])])
    assert "shard.tar" in ledger.units
    assert Ledger(FS, root, job=JOB).units == {"shard.tar"}  # recorded in _units


def test_the_rows_not_done():
    plan = pa.Table.from_pylist(
        [{"sample_id": "a.jpg", "uri": "", "label": "", "split": "", "container": ""},
         {"sample_id": "b.jpg", "uri": "", "label": "", "split": "", "container": ""},
         {"sample_id": "s.tar", "uri": "", "label": "", "split": "", "container": "tar"},
         {"sample_id": "t.tar", "uri": "", "label": "", "split": "", "container": "tar"},
         {"sample_id": "v.mp4", "uri": "", "label": "", "split": "", "container": ""}],
        schema=PLAN_SCHEMA,
    )
    import duckdb

    con = duckdb.connect()
    con.register("plan", plan)
    con.register("ids", pa.table({"sample_id": ["a.jpg", "s.tar", "v.mp4#w0"]}))
    con.register("units", pa.table({"unit": ["t.tar", "v.mp4"]}))
    # a shard's own id as a row (its error row) does not make it done; only its unit record does
    left = con.execute(f"SELECT sample_id FROM plan WHERE {not_done('ids', 'units')} ORDER BY sample_id").fetchall()
    assert [r[0] for r in left] == ["b.jpg", "s.tar"]
    everything = con.execute(f"SELECT count(*) FROM plan WHERE {not_done(None, None)}").fetchall()
    assert everything == [(5,)]


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


def test_a_failpoint_armed_across_processes_counts_every_process_hits(tmp_path, monkeypatch):
    import subprocess
    import sys

    folder = tmp_path / "faults"
    folder.mkdir()
    monkeypatch.setenv(faults.ENV, str(folder))
    (folder / "write.json").write_text('{"action": "raise", "after": 3, "across": true}')
    hit = "from pipeline import faults; faults.point('write', 'a')"
    for _ in range(2):  # hits 1 and 2, each in a process of its own: nothing happens
        subprocess.run([sys.executable, "-c", hit], check=True, cwd=Path(faults.__file__).parent.parent)
    with pytest.raises(faults.InjectedFault):  # this process's first hit is the third
        faults.point("write", "b")


def test_the_sink_passes_over_an_empty_block(tmp_path):
    """A read task can yield nothing (a resumed tar shard whose members are all committed); Ray
    Data then hands the sink a block without columns, which holds nothing to write."""
    from pipeline.output.sink import ParquetCommitSink, SinkSpec, image_columns

    spec = SinkSpec(str(tmp_path / "out"), {}, ["split"], image_columns("float16", 4))
    result = ParquetCommitSink(spec, committer=None).write([pa.table({})], ctx=None)
    assert (result["features"], result["files"], sum(result["errors"].values())) == (0, 0, 0)
    assert not (tmp_path / "out" / "features").exists()


# --- issue 12: names that cannot collide, no replacing a committed file, only this job's staging ---

ID = st.one_of(  # separators, JSON's own syntax, a lone surrogate (an undecodable file name), any text
    st.text(alphabet=st.sampled_from(["a", "b", "é", "猫", "\n", ",", "\x00", "/", '"', "\\", "[", "]", " ", "\udcff"]),
            max_size=6),
    st.text(max_size=8))


@settings(max_examples=400, deadline=None)
@given(st.lists(ID, max_size=5), st.lists(ID, max_size=5))
def test_different_id_lists_never_share_a_part_name(a, b):
    assert (part_name(a) == part_name(b)) == (a == b)
    assert part_name(list(a)) == part_name(tuple(a))  # deterministic: the same rows, the same name


def test_an_id_holding_a_separator_does_not_name_the_file_of_two_ids():
    assert part_name(["a.jpg\nb.jpg"]) != part_name(["a.jpg", "b.jpg"])
    assert part_name(["a,b"]) != part_name(["a", "b"]) and part_name([]) != part_name([""])


def test_publishing_onto_a_committed_file_refuses_and_keeps_it(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    ledger.commit([stage(root, "features", ["a.jpg", "b.jpg"])])
    name = f"{root}/features/{part_name(['a.jpg', 'b.jpg'])}"
    before = open(name, "rb").read()
    clash = stage(root, "features", ["c.jpg"])  # staged under the committed file's name
    clash.rel = f"features/{part_name(['a.jpg', 'b.jpg'])}"
    with pytest.raises(CommitConflict, match="already holds committed rows"):
        ledger.commit([clash])
    assert open(name, "rb").read() == before
    assert published_ids(root) == ["a.jpg", "b.jpg"]
    with pytest.raises(FileExistsError):  # the rewrite of a half-new file is exclusive too
        write_atomic(FS, name, b"x", exclusive=True)
    assert open(name, "rb").read() == before


def test_publishing_onto_a_committed_key_refuses_on_s3(s3):
    fs, _ = s3
    root = f"{S3_BUCKET}/out"
    rel = f"features/{part_name(['a'])}"
    for ids in (["a"], ["b"]):  # the second is staged under the first's published name
        write_atomic(fs, f"{root}/_staging/{JOB}/r/t{ids[0]}/{rel}", parquet_bytes(pa.table({"sample_id": ids})))
    ledger = Ledger(fs, root, job=JOB)
    ledger.commit([Staged(f"{root}/_staging/{JOB}/r/ta/{rel}", rel, ["a"])])
    with pytest.raises(CommitConflict):
        ledger.commit([Staged(f"{root}/_staging/{JOB}/r/tb/{rel}", rel, ["b"])])
    with pytest.raises(FileExistsError):  # PUT If-None-Match: *
        write_atomic(fs, f"{root}/{rel}", b"x", exclusive=True)
    assert pq.read_table(f"{root}/{rel}", filesystem=fs)["sample_id"].to_pylist() == ["a"]


def test_recovery_publishes_only_its_own_jobs_staged_files(tmp_path):
    root = str(tmp_path)
    stage(root, "features", ["mine"])
    stage(root, "features", ["theirs"], job="otherjobfingerprint")  # a killed job A's leftover
    os.makedirs(f"{root}/_staging/old-task/features")  # the layout before job folders
    write_atomic(FS, f"{root}/_staging/old-task/features/{part_name(['old'])}",
                 parquet_bytes(pa.table({"sample_id": ["old"]})))
    ledger = Ledger(FS, root, job=JOB)
    assert ledger.recover() == 1
    assert published_ids(root) == ["mine"]
    assert parquet_files(FS, f"{root}/_staging") == []  # the foreign files are gone, not left to publish later


def test_a_ledger_that_lost_its_lease_publishes_nothing(tmp_path):
    root = str(tmp_path)

    def fence():
        raise RuntimeError("lease lost")

    staged = stage(root, "features", ["a"])
    with pytest.raises(RuntimeError, match="lease lost"):
        Ledger(FS, root, job=JOB, fence=fence).commit([staged])
    assert published_ids(root) == []


def test_audit_reads_duplicates_and_gaps_from_the_files(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    scratch_in = tmp_path / "it's a \"TMPDIR\""  # the audit spills here: its paths are quoted in DuckDB's SQL
    scratch_in.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_in))
    plan = pa.Table.from_pylist([{"sample_id": s, "uri": "", "label": "", "split": "", "container": ""}
                                 for s in ("a", "b", "c")], schema=PLAN_SCHEMA)
    write_atomic(FS, f"{root}/features/{part_name(['a', 'b'])}", parquet_bytes(pa.table({"sample_id": ["a", "b"]})))
    write_atomic(FS, f"{root}/errors/{part_name(['b'])}", parquet_bytes(pa.table({"sample_id": ["b"]})))
    assert audit(FS, root, plan) == {"missing": 1, "first_missing": "c", "duplicates": ["b"],
                                    "rows": {"features": 2, "errors": 1}}


def test_without_hard_links_publishing_still_refuses_a_committed_name(tmp_path, monkeypatch):
    def no_links(src, dst):  # some FUSE and SMB mounts
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    ledger.commit([stage(root, "features", ["a"])])
    assert published_ids(root) == ["a"]
    with pytest.raises(FileExistsError):
        write_atomic(FS, f"{root}/features/{part_name(['a'])}", b"x", exclusive=True)
    assert published_ids(root) == ["a"] and not list((tmp_path / "features").glob(".tmp-*"))


def carried(ids, value=0):
    """A file as a write task hands it over for an object store: its bytes, no staged copy."""
    table = pa.table({"sample_id": list(ids), "value": [value] * len(ids)})
    return Staged("", f"features/{part_name(ids)}", list(ids), data=parquet_bytes(table))


def test_concurrent_commits_of_overlapping_files_publish_every_row_once(tmp_path):
    """Eight threads, as the threaded committer runs them, commit blocks that a re-executed task cut
    differently (every row in two files of different cuts): each row is published once."""
    from concurrent.futures import ThreadPoolExecutor

    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    ids = [f"s{i:03d}" for i in range(120)]
    first = [ids[i:i + 8] for i in range(0, 120, 8)]
    second = [ids[i:i + 5] for i in range(0, 120, 5)]  # the same rows, cut again
    files = [stage(root, "features", f) for f in first] + [carried(f, 1) for f in second]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: ledger.commit([s]), files[::2] + files[1::2]))
    assert sum(r["features"] for r in results) == 120
    assert sum(r["duplicates"] for r in results) == 120
    assert published_ids(root) == ids  # each once
    assert ledger.rows == set(ids) and not ledger.reserved


def test_carried_bytes_are_published_by_one_exclusive_write(tmp_path):
    root = str(tmp_path)
    ledger = Ledger(FS, root, job=JOB)
    assert ledger.commit([carried(["a", "b"])])["features"] == 2
    assert published_ids(root) == ["a", "b"]
    assert not os.path.exists(f"{root}/_staging")  # nothing staged, nothing left behind
    # half old: the new row alone, rewritten from the carried bytes
    assert ledger.commit([carried(["b", "c"], 7)])["features"] == 1
    assert pq.read_table(f"{root}/features/{part_name(['c'])}")["value"].to_pylist() == [7]


def test_a_retried_put_that_finds_its_own_bytes_is_published_and_other_bytes_refused(tmp_path):
    """A PUT whose reply was lost is retried by the client and meets its own object (412): the same
    bytes count as published, once; a different file under the name is still a conflict."""
    root = str(tmp_path)
    mine = carried(["a"])
    write_atomic(FS, f"{root}/{mine.rel}", mine.data)  # the first attempt's object landed
    ledger = Ledger(FS, root, job=JOB, state=(set(), set()))  # it started before that
    assert ledger.commit([mine])["features"] == 1
    assert published_ids(root) == ["a"]
    other = carried(["z"])
    write_atomic(FS, f"{root}/{other.rel}", parquet_bytes(pa.table({"sample_id": ["z"], "value": [9]})))
    before = open(f"{root}/{other.rel}", "rb").read()
    with pytest.raises(CommitConflict, match="already holds committed rows"):
        ledger.commit([other])
    assert open(f"{root}/{other.rel}", "rb").read() == before
    assert "z" not in ledger.rows and not ledger.reserved


def test_on_s3_a_file_is_one_request_and_the_fence_a_few(s3_server, s3):
    """Publishing on the S3 endpoint, counted at a proxy in front of it: one PutObject a file (with
    If-None-Match); the fence reads the lease once for the batch of commits, not once a file."""
    import s3fs

    from pipeline.output.lease import Fence, Lease

    from faultproxy import FaultProxy

    _, options = s3
    with FaultProxy(s3_server) as proxy:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**{**options, "client_kwargs": {"endpoint_url": proxy.endpoint}})
        root = f"{S3_BUCKET}/out"
        lease = Lease(fs, root, "OUT", "run1").acquire()
        ledger = Ledger(fs, root, state=(set(), set()), job=JOB, fence=Fence(fs, root, "run1"))
        files = [carried([f"f{i}-{j}" for j in range(4)]) for i in range(20)]
        proxy.kinds.clear()
        for f in files:
            ledger.commit([f])
        counted = dict(proxy.kinds)
        lease.release()
    assert counted.pop("PutObject") == 20, counted
    assert set(counted) <= {"HeadObject", "GetObject"} and sum(counted.values()) <= 2, counted  # one lease read
    assert len(published_ids_on(fs, root)) == 80


def published_ids_on(fs, root):
    files = parquet_files(fs, f"{root}/features")
    return [i for f in files for i in pq.read_table(f, filesystem=fs)["sample_id"].to_pylist()]


def test_the_committer_s_s3_client_keeps_its_calls_in_flight_and_a_user_s_pool_is_kept():
    from pipeline.output.store import with_connections

    assert with_connections("s3://b/out", {"key": "k"}, 32) == {"key": "k", "config_kwargs": {"max_pool_connections": 32}}
    mine = {"config_kwargs": {"max_pool_connections": 4, "retries": {"max_attempts": 9}}}
    assert with_connections("s3://b/out", mine, 32) == mine
    assert with_connections("/data/out", {}, 32) == {} and with_connections("gs://b/out", {}, 32) == {}


# --- issue 26: files sized by output.file_size, row groups inside; an audit that opens each file once ---

def _block(start: int, n: int, dim: int = 64, errors=()):
    """A model batch as the sink receives it: rows start..start+n, both splits, `errors` failed."""
    import numpy as np
    from ray.data.block import BlockAccessor

    ids = [f"s{i:03d}" for i in range(start, start + n)]
    failed = [i in errors for i in range(start, start + n)]
    text = lambda values: np.array(values, dtype=object)  # noqa: E731
    return BlockAccessor.batch_to_block({
        "sample_id": text(ids), "uri": text([f"/data/{i}.jpg" for i in ids]), "label": text(["cat"] * n),
        "split": text(["train" if i % 2 else "val" for i in range(start, start + n)]),
        "feature": np.full((n, dim), 0.5, np.float16), "width": np.ones(n, np.int32), "height": np.ones(n, np.int32),
        "error_stage": text(["decode" if f else "" for f in failed]),
        "error_type": text(["Broken" if f else "" for f in failed]), "error_message": text(["bad" if f else "" for f in failed])})


@pytest.mark.usefixtures("ray_session")
def test_a_write_gathers_blocks_into_files_of_the_target_size_with_row_groups_inside(tmp_path):
    """Ray Data hands the sink blocks until they hold file_bytes (min_bytes_per_write); the sink writes
    each partition of them as one file, in row groups of a quarter of the target: so the files follow
    the setting, not the 8-row blocks the upstream stage made."""
    import ray
    from ray.data.block import BlockAccessor

    from pipeline.output.committer import Committer
    from pipeline.output.sink import ParquetCommitSink, SinkSpec, image_columns

    out = str(tmp_path / "out")
    blocks = [_block(8 * i, 8, errors={13, 77}) for i in range(12)]
    per_block = BlockAccessor.for_block(blocks[0]).size_bytes()
    spec = SinkSpec(out, {}, ["split"], image_columns("float16", 64), staging="j/r", file_bytes=4 * per_block)
    sink = ParquetCommitSink(spec, ray.remote(Committer).remote(out, {}, job="j"))
    assert sink.min_bytes_per_write == 4 * per_block
    ray.data.from_blocks(blocks).write_datasink(sink, ray_remote_args={"num_cpus": 0})

    files = parquet_files(FS, f"{out}/features")
    assert len(files) == 6  # 12 blocks in 3 write calls of 4, each a file per split: not 24 files
    for f in files:
        meta = pq.read_metadata(f)
        split = pq.read_table(f, columns=["split"])["split"].unique().to_pylist()
        assert len(split) == 1 and f"split_dir={split[0]}" in f
        assert meta.num_rows >= 15 and meta.num_row_groups >= 2, (f, meta.num_rows, meta.num_row_groups)
    errors = parquet_files(FS, f"{out}/errors")
    assert len(errors) == 2 and sorted(published_ids(out)) == sorted(f"s{i:03d}" for i in range(96))
    assert sink.totals["features"] == 94 and sum(sink.totals["errors"].values()) == 2


class CountingFS(LocalFileSystem):
    """The local file system, counting the files opened (each open is a footer's and a column's reads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened = []

    def _open(self, path, mode="rb", **kwargs):
        self.opened.append(path)
        return super()._open(path, mode, **kwargs)


def test_the_audit_opens_each_file_once_and_finds_a_duplicate_and_a_missing_id(tmp_path):
    root = str(tmp_path)
    plan = pa.Table.from_pylist([{"sample_id": f"s{i}", "uri": "", "label": "", "split": "", "container": ""}
                                 for i in range(30)], schema=PLAN_SCHEMA)
    groups = [[f"s{i}" for i in range(k, k + 5)] for k in range(0, 25, 5)]  # s25..s29 in none yet
    groups += [["s25", "s26", "s27", "s28"], ["s3"]]  # s29 missing; s3 also in the errors
    for ids in groups[:-1]:
        write_atomic(FS, f"{root}/features/split_dir=a/{part_name(ids)}",
                     parquet_bytes(pa.table({"sample_id": ids, "v": list(range(len(ids)))}), row_group_bytes=8))
    write_atomic(FS, f"{root}/errors/{part_name(groups[-1])}", parquet_bytes(pa.table({"sample_id": groups[-1]})))
    assert pq.read_metadata(parquet_files(FS, f"{root}/features")[0]).num_row_groups > 1
    fs = CountingFS(skip_instance_cache=True)
    assert audit(fs, root, plan) == {"missing": 1, "first_missing": "s29", "duplicates": ["s3"],
                                     "rows": {"features": 29, "errors": 1}}
    files = [f for t in ("features", "errors") for f in parquet_files(FS, f"{root}/{t}")]
    assert sorted(fs.opened) == sorted(files)  # each once, and nothing else

    empty = tmp_path / "empty"
    assert audit(CountingFS(skip_instance_cache=True), str(empty), plan.slice(0, 2)) == {
        "missing": 2, "first_missing": "s0", "duplicates": [], "rows": {"features": 0, "errors": 0}}
