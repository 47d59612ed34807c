"""Runs into an output root that already holds output: resume, --retry-failed, --overwrite, status."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from pipeline.errors import OutputExists
from pipeline.output.root import JOB_FILE
from pipeline.output.status import status
from pipeline.samples import encode, make_image_folder, photo

from conftest import (
    assert_exactly_once,
    assert_whole_files,
    job_dict,
    planned,
    read_errors,
    read_features,
    recorded,
    run,
    tree,
)

pytestmark = pytest.mark.usefixtures("ray_session")


GOOD = encode(photo(90, 70, seed=3))


@pytest.fixture(scope="module")
def image_output(tmp_path_factory, ray_session):
    """(source, a complete output of it): 30 images, 2 broken files and late.jpg, truncated while it
    was being uploaded. A test copies the output to change it (source.uri is in the job's settings, so
    the source stays where it is: a test that changes it puts it back)."""
    base = tmp_path_factory.mktemp("resume")
    src, out = base / "images", base / "out"
    make_image_folder(str(src), n=30, broken=2)
    (src / "late.jpg").write_bytes(GOOD[:200])
    run(job_dict(str(src), str(out)))
    return src, out


def copied(image_output, tmp_path):
    """The shared source and a copy of its output in tmp_path."""
    src, out = image_output
    return src, shutil.copytree(out, tmp_path / "out")


@pytest.mark.timeout(300)
def test_retry_failed_moves_fixed_samples_from_errors_to_features(image_output, tmp_path):
    src, out = copied(image_output, tmp_path)
    job = job_dict(str(src), str(out))
    assert "late.jpg" in read_errors(str(out))["sample_id"].to_pylist()
    with pytest.raises(OutputExists, match="holds no output"):
        run(job_dict(str(src), str(tmp_path / "empty")), retry_failed=True)

    (src / "late.jpg").write_bytes(GOOD)  # the upload finished
    try:
        summary = run(job, retry_failed=True)
    finally:
        (src / "late.jpg").write_bytes(GOOD[:200])
    assert summary.skipped == len(planned(src)) - 3  # only the three errors were taken up again
    assert summary.features == 1 and sum(summary.errors.values()) == 2
    errors = read_errors(str(out)).to_pylist()
    assert "late.jpg" not in [e["sample_id"] for e in errors]
    assert all(e["attempts"] == 2 for e in errors)  # the still-broken ones, tried twice now
    assert "late.jpg" in read_features(str(out), columns=["sample_id"])["sample_id"].to_pylist()
    assert_exactly_once(str(out), planned(src))
    assert not (out / "_retry.parquet").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(image_output, tmp_path, faults):
    src, out = copied(image_output, tmp_path)
    old = tree(out / "features")
    other = job_dict(str(src), str(out))
    other["model"]["pool"] = "max"

    faults("write", action="raise", after=2)  # the overwriting run fails midway
    with pytest.raises(Exception, match="fault injected"):
        run(other, overwrite=True)
    assert tree(out / "features") == old  # the old output is untouched
    assert json.loads((out / JOB_FILE).read_text())["settings"]["model.pool"] == "avg"
    st = status(str(out))
    assert st["complete"] and st["overwrite_pending"]

    summary = run(other, overwrite=True)  # again: resumes the overwrite, then swaps it in
    assert summary.skipped > 0
    record = json.loads((out / JOB_FILE).read_text())
    assert record["settings"]["model.pool"] == "max" and record["status"] == "complete"
    assert not (out / "_overwrite").exists()
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))
    assert status(str(out))["complete"]


def _shards(folder, n_shards: int, per_shard: int):
    folder.mkdir()
    ids = []
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(per_shard):
                for name, data in ((f"s{s}k{k}.jpg", encode(photo(60 + k, 50 + s, seed=s * 10 + k))),
                                   (f"s{s}k{k}.cls", str(k % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ids.append(f"shard-{s:03d}.tar/s{s}k{k}")
    return ids


@pytest.mark.timeout(300)
def test_webdataset_resume_reads_past_committed_members(tmp_path, faults, faults_dir, monkeypatch):
    from ray.data import DataContext

    src, out = tmp_path / "shards", tmp_path / "out"
    # shards of 24 members, blocks of 4 rows at most (a shard larger than Ray Data's blocks, as real
    # shards are), a file each (file_size 1), 6 a shard: the fifth file staged, in whichever process,
    # fails half written, the 4 before it committed (and any a concurrent writer had staged), some 16
    # rows in files that may mix shards: far from a whole shard, so one at least is in part. (With 8
    # members a shard, a run on a loaded machine committed two whole shards and none in part; with a
    # block a shard, and a failpoint counting one process's writes, the fault once struck a shard's
    # completion mark after every row was committed.)
    shards, members = 2, 24
    ids = _shards(src, n_shards=shards, per_shard=members)
    monkeypatch.setattr(DataContext.get_current(), "target_max_block_size", 4096)
    job = job_dict(str(src), str(out), source={"format": "webdataset"},
                   resources={"batch_size": 4, "decode_batch_size": 4}, output={"file_size": 1})
    faults("write", action="raise", match="/_staging/", after=5, across=True)
    with pytest.raises(Exception, match="fault injected"):
        run(job)
    done = set(read_features(str(out), columns=["sample_id"])["sample_id"].to_pylist())
    assert done and status(str(out))["remaining"] > 0
    per_shard = [sum(d.startswith(f"shard-{s:03d}.tar/") for d in done) for s in range(shards)]
    assert any(0 < n < members for n in per_shard), per_shard  # a shard half committed: the rerun reads past that half

    faults("decode", action="record", once=False)
    summary = run(job)
    decoded = recorded(faults_dir, "decode")
    assert decoded and not {u.split("#", 1)[1] for u in decoded} & {d.rsplit("/", 1)[1] for d in done}
    assert summary.samples == len(ids) - len(done)
    assert_exactly_once(str(out), ids)
    assert status(str(out))["complete"]


def test_the_todo_lists_a_shards_committed_members_and_the_attempts_of_earlier_failures(tmp_path):
    """todo_of on a plan with a shard and files, the committed ids and units read from OUT's files:
    `skip` names the committed members under each shard only (not `s.tar0...` nor another
    shard's), `attempts` the most a unit's failures had; an empty plan has an empty todo."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.extract.planfile import write_table
    from pipeline.output.root import RETRY_FILE, todo_of

    plan = pa.table({"sample_id": ["a.jpg", "b.jpg", "s.tar", "t.tar"], "container": ["", "", "tar", "tar"]})
    fs, root, scratch = LocalFileSystem(), tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    planned = write_table(plan, str(scratch / "plan.parquet"))
    fresh, committed = todo_of(fs, str(root), planned, str(scratch))
    fresh = fresh.read()
    assert committed == (0, 0) and fresh["sample_id"].to_pylist() == plan["sample_id"].to_pylist()
    assert fresh["skip"].to_pylist() == [[]] * 4 and fresh["attempts"].to_pylist() == [0] * 4

    for folder, column, values in [("features", "sample_id", ["s.tar/2", "a.jpg", "s.tar/1"]),
                                   ("errors", "sample_id", ["s.tar0", "t.tar/x"]), ("_units", "unit", ["t.tar"])]:
        (root / folder).mkdir(parents=True)
        pq.write_table(pa.table({column: values}), root / folder / "part-0.parquet")
    pq.write_table(pa.table({"unit": ["s.tar", "s.tar", "b.jpg"], "sample_id": ["s.tar/3", "s.tar/4", "b.jpg"],
                             "attempts": [1, 3, 2]}), root / RETRY_FILE)
    todo, committed = todo_of(fs, str(root), planned, str(scratch))
    todo = todo.read()
    assert committed == (5, 1)
    assert todo["sample_id"].to_pylist() == ["b.jpg", "s.tar"]
    assert todo["skip"].to_pylist() == [[], ["s.tar/1", "s.tar/2"]]
    assert todo["attempts"].to_pylist() == [2, 3]
    assert todo.column_names == ["sample_id", "container", "skip", "attempts"]
    empty = write_table(plan.slice(0, 0), str(scratch / "empty.parquet"))
    assert len(todo_of(fs, str(root), empty, str(scratch))[0]) == 0
