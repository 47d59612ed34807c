"""Exactly once at the edges (issue 12, cases 2-4): ids whose naming could collide, two runs into
one OUT, and staged files another job left behind (the first and the last in one run sequence).
Each ends with every planned sample exactly once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import parse_job
from pipeline.extract.prepare import prepare
from pipeline.fingerprint import fingerprint
from pipeline.jobrun import IncompleteOutput
from pipeline.output.ledger import staging_folder
from pipeline.output.root import JOB_FILE, settings
from pipeline.output.status import status
from pipeline.samples import encode, make_image_folder, photo

from conftest import assert_exactly_once, assert_whole_files, job_dict, planned, read_errors, refusal_lines, run
from tables import write_table

pytestmark = pytest.mark.usefixtures("ray_session")
ROOT = Path(__file__).resolve().parent.parent


def _featurize(job_file: Path, env, address: str) -> subprocess.Popen:
    featurize = Path(sys.executable).with_name("featurize")
    return subprocess.Popen([str(featurize), "run", str(job_file), "--address", address], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_runs_started_at_once_into_one_output_one_refuses(tmp_path, faults, ray_address):
    """Both once exited 0 with 525 rows for 300 planned; now the second holds back, exit 2.
    Both join the session's Ray, as two runs submitted to one cluster do."""
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=16, broken=1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(str(src), str(out), resources={"batch_size": 4})))
    faults("embed", action="sleep", seconds=1.0, once=False)  # each model batch sleeps: the winner is still running
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    procs = [_featurize(job_file, env, ray_address) for _ in range(2)]
    try:
        results = [(p.wait(300), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)  # a run still going after a failed wait
            except ProcessLookupError:
                pass
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    refused = next(r for r in results if r[0] == 2)[2]
    assert "is in use by run" in refused and "since" in refused and len(refusal_lines(refused)) == 1
    assert_exactly_once(str(out), planned(src))
    assert status(str(out))["complete"] and not (out / "_lease.json").exists()


@pytest.mark.timeout(300)
def test_staged_files_of_another_job_and_an_id_holding_a_newline_are_published_once(tmp_path):
    """Two bugs, one run sequence. A killed job A left a staged file; job B --overwrite completed,
    and B's next run published A's file into B's output (40 rows for 20 planned). And the id
    `a.jpg\nb.jpg` once named the same file as the ids `a.jpg`, `b.jpg`: retrying it replaced their
    committed file and the run still exited 0."""
    src, out = tmp_path / "data", tmp_path / "out"
    src.mkdir()
    good = encode(photo(80, 60, seed=1))
    ids = ["a.jpg", "a.jpg\nb.jpg", "b.jpg", "c.jpg"]
    for name in ("a.jpg", "b.jpg"):  # `a.jpg\nb.jpg` and c.jpg do not exist yet: error rows
        (src / name).write_bytes(good)
    pq.write_table(pa.table({"uri": ids}), src / "manifest.parquet")
    job_b = job_dict(str(src / "manifest.parquet"), str(out), name="B", source={"format": "manifest"},
                     resources={"batch_size": 4, "decode_batch_size": 4})

    # OUT as job A's killed run left it: A's _job.json, and a file A's sink staged (A's rows and
    # provenance, written here as a run writes them) under A's staging folder and an older layout's
    a = prepare(parse_job(job_dict(str(tmp_path / "a"), str(out), name="A")))
    out.mkdir()
    (out / JOB_FILE).write_text(json.dumps({"name": "A", "status": "running", "settings": settings(a)}))
    a_ids = ["cat/a0.jpg", "cat/a1.jpg", "dog/a2.jpg", "dog/a3.jpg"]
    staged = Path(write_table(str(tmp_path / "a-rows"), ["all"] * 4, [i.split("/")[0] for i in a_ids],
                              feature=np.ones((4, a.dim)), metadata=a.provenance(),
                              rows={"sample_id": a_ids, "uri": [f"{tmp_path}/a/{i}" for i in a_ids]}))
    left = next((staged / "features").rglob("*.parquet"))
    for task in (f"{staging_folder(fingerprint(settings(a)), 'run-a')}/task1", "task-old-layout"):
        dst = out / "_staging" / task / left.relative_to(staged)
        dst.parent.mkdir(parents=True)
        shutil.copy(left, dst)

    run(job_b, overwrite=True)
    assert_exactly_once(str(out), ids)
    assert sorted(read_errors(str(out))["sample_id"].to_pylist()) == ["a.jpg\nb.jpg", "c.jpg"]
    (src / "a.jpg\nb.jpg").write_bytes(encode(photo(70, 50, seed=2)))  # fixed: retried alone, one id
    run(job_b, retry_failed=True)
    assert_exactly_once(str(out), ids)
    assert_whole_files(str(out))
    st = status(str(out))
    assert st["complete"] and st["remaining"] == 0 and st["duplicates"] == 0
    run(job_b)  # B again: nothing to do, and nothing of A's appears
    assert_exactly_once(str(out), ids)
    assert status(str(out))["complete"]
    assert not (out / "_staging").exists() or not list((out / "_staging").rglob("*.parquet"))

    # what is on the store decides, not a tally: a file copied in twice makes status and a run fail
    twice = next((out / "features").rglob("*.parquet"))
    shutil.copy(twice, twice.with_name("part-copy.parquet"))
    st = status(str(out))
    assert not st["complete"] and st["duplicates"] > 0 and st["remaining"] == 0
    with pytest.raises(IncompleteOutput, match="more than once"):
        run(job_b)
