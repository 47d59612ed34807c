"""SIGTERM (what schedulers and kubectl send) stops `featurize run` as Ctrl-C does (issue 12 case 8).

It used to abort with a C++ stack dump and exit 134: ray.init replaces the SIGTERM handler with
one that kills the local Ray under the still-connected driver. The one test here starts its own
Ray in the `featurize` subprocess, as a user's run does (the suite's only run that does: it also
checks that such a Ray keeps its noise off the console and shows in RAY_TMPDIR, the control of
test_cli's refusals); the rerun uses the session's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.samples import make_image_folder

from conftest import RAY_NOISE, assert_exactly_once, assert_whole_files, job_dict, planned, run, wait_for

ROOT = Path(__file__).resolve().parent.parent
INTERRUPTED = "featurize: interrupted; run the same command again to resume"


def _running(out: Path) -> bool:
    """The job is executing: its record says running and a first file is committed."""
    try:
        record = json.loads((out / "_job.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return record["status"] == "running" and any((out / "features").rglob("*.parquet"))


@pytest.mark.cluster  # a Ray of its own: ray.init's SIGTERM handler is that of an embedded local Ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_exits_130_with_one_line_and_the_rerun_completes(ray_session, tmp_path, ray_tmpdir):
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=20, broken=1)
    job = job_dict(str(src), str(out), resources={"batch_size": 2, "decode_batch_size": 2})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    slow = tmp_path / "slow"  # every model batch sleeps: the job is still running when SIGTERM comes
    slow.mkdir()
    (slow / "embed.json").write_text(json.dumps({"action": "sleep", "seconds": 0.6, "once": False}))
    env = {**os.environ, "FEATURIZE_FAULTS": str(slow), "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)
    featurize = Path(sys.executable).with_name("featurize")
    proc = subprocess.Popen([str(featurize), "run", str(job_file)], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _running(out) or proc.poll() is not None, 240, "the job to execute")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)  # the driver only, as kubectl signals a pod's main process
        _, stderr = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its Ray left over
        except ProcessLookupError:
            pass
    assert proc.returncode == 130, stderr[-3000:]
    assert (ray_tmpdir / "ray").is_dir()  # the control of test_cli's refusals: a Ray start shows there
    lines = stderr.strip().splitlines()
    assert lines[-1] == INTERRUPTED and stderr.count("featurize:") == 1, stderr[-3000:]
    for dump in ("Traceback", "Stack trace", "*** SIG", "Aborted", "core dumped", "Check failed"):
        assert dump not in stderr, stderr[-3000:]
    assert not [n for n in RAY_NOISE if n in stderr], stderr[-3000:]
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "interrupted" and record["runs"][-1]["error"].startswith("KeyboardInterrupt")

    summary = run(job)  # the same job again, on the session's Ray: it resumes and completes
    assert summary.skipped > 0 and summary.skipped + summary.samples == len(planned(src))
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))
