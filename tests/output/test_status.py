"""`featurize status` says what OUT holds at every moment of a run, from the files alone (no Ray):
planned before any record, running while a run holds the lease, stopped when its record says
running but no run does (a killed driver), interrupted apart from failed, complete."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.cli import main
from pipeline.output.lease import Lease
from pipeline.output.root import JOB_FILE, PLAN_FILE
from pipeline.output.status import status
from pipeline.output.store import parquet_bytes, write_atomic

IDS = ["a.jpg", "b.jpg", "c.jpg"]


def _root(tmp_path):
    fs, root = LocalFileSystem(), str(tmp_path / "out")
    write_atomic(fs, f"{root}/{PLAN_FILE}", parquet_bytes(pa.table({"sample_id": IDS, "container": [""] * 3})))
    return fs, root


def _commit(fs, root, ids):
    write_atomic(fs, f"{root}/features/split_dir=all/part-{ids[0]}.parquet", parquet_bytes(pa.table({"sample_id": ids})))


def _record(fs, root, state):
    write_atomic(fs, f"{root}/{JOB_FILE}", json.dumps({"name": "demo", "status": state}).encode())


def _cli(capsys, root):
    code = main(["status", root])
    return code, capsys.readouterr().out


def test_status_tells_planned_running_stopped_interrupted_and_complete(tmp_path, capsys):
    fs, root = _root(tmp_path)
    # a run stopped while Ray started: its plan is saved, no record yet (this said "no output there", exit 2)
    st = status(root)
    assert (st["status"], st["planned"], st["remaining"], st["complete"]) == ("planned", 3, 3, False)
    code, out = _cli(capsys, root)
    assert code == 1 and "job        (no record yet) (planned, not started" in out
    assert "complete   no: run the same command again to resume" in out

    _commit(fs, root, ["a.jpg"])
    _record(fs, root, "running")
    lease = Lease(fs, root, root, "run-1").acquire()  # a live run (this process) holds OUT
    try:
        st = status(root)
        assert (st["status"], st["features"], st["remaining"]) == ("running", 1, 2)
        assert "is in use by run run-1" in st["lease"]
    finally:
        lease.release()
    # the same record with no run holding OUT: its driver was killed (SIGKILL records nothing)
    assert status(root)["status"] == "stopped"
    code, out = _cli(capsys, root)
    assert code == 1 and "(stopped: its record says running but no run holds the output" in out

    for said in ("interrupted", "failed"):  # Ctrl-C or SIGTERM, and an error: two words
        _record(fs, root, said)
        assert status(root)["status"] == said and _cli(capsys, root)[1].count(f"demo ({said})") == 1

    _commit(fs, root, ["b.jpg", "c.jpg"])
    _record(fs, root, "complete")
    st = status(root)
    assert st["complete"] and st["remaining"] == 0
    assert _cli(capsys, root)[0] == 0


def test_no_plan_is_no_output(tmp_path, capsys):
    from pipeline.errors import NoOutput

    with pytest.raises(NoOutput, match="no output there"):
        status(str(tmp_path / "typo"))
    assert main(["status", str(tmp_path / "typo")]) == 2
