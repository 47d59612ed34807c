"""Fault injection: the issue's six faults, each on a real Ray, each bounded in time.

After each, OUT is read back with pyarrow and DuckDB: every planned sample exactly once across
features and errors (I1), only whole, published files (I2); the resumed runs recompute nothing
already committed (I3); a hanging or crashing decoder costs one error row (I4).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.extract.planfile import host_prefix
from pipeline.output.root import JOB_FILE
from pipeline.samples import make_image_folder, make_video_folder

from conftest import (
    S3_BUCKET,
    S3_SECRET,
    assert_exactly_once,
    assert_whole_files,
    job_dict,
    join_node,
    planned,
    recorded,
    run,
    s3_options,
    wait_for,
)
from faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent


def images(tmp_path, n=60) -> Path:
    src = tmp_path / "images"
    make_image_folder(str(src), n=n, broken=2)
    return src


def s3_images(fs, tmp_path, n: int) -> Path:
    """images(), uploaded to s3://BUCKET/images/; returns the local folder (planned() reads it)."""
    src = images(tmp_path, n=n)
    for path in planned(src):
        fs.pipe_file(f"{S3_BUCKET}/images/{path}", (src / path).read_bytes())
    fs.invalidate_cache()
    return src


def committed_files(out: Path):
    return list((out / "features").rglob("*.parquet")) if (out / "features").exists() else []


@pytest.mark.timeout(300)
def test_1_model_actor_killed_mid_job(ray_session, faults, faults_dir, tmp_path):
    src, out = images(tmp_path), tmp_path / "out"
    faults("embed", action="exit", after=3)  # the actor's process exits on its third batch
    summary = run(job_dict(str(src), str(out)))
    assert (faults_dir / "embed.json.fired").exists()
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))
    assert summary.features + sum(summary.errors.values()) == len(planned(src))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_5_exception_while_writing_a_parquet_file(ray_session, faults, faults_dir, tmp_path):
    src, out = images(tmp_path), tmp_path / "out"
    faults("write", action="raise", after=2)
    with pytest.raises(Exception, match="fault injected at write"):
        run(job_dict(str(src), str(out)))
    assert json.loads((out / JOB_FILE).read_text())["status"] == "failed"
    assert_whole_files(str(out))  # the half-written file never shows
    first = {p.name for p in committed_files(out)}
    summary = run(job_dict(str(src), str(out)))  # the same job again: resumes
    assert summary.skipped + summary.samples == len(planned(src))
    assert first <= {p.name for p in committed_files(out)}  # nothing committed was rewritten
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))


@pytest.mark.timeout(300)
def test_6_poisoned_video_hangs_or_crashes_its_decoder(ray_session, faults, faults_dir, tmp_path):
    src, out = tmp_path / "videos", tmp_path / "out"
    make_video_folder(str(src), n=4)
    good = next((src / "ApplyEyeMakeup").glob("v_*_c01.avi")).read_bytes()
    for name in ("poison_hang.avi", "poison_crash.avi"):  # decodable files; the failpoint poisons them
        (src / "ApplyEyeMakeup" / name).write_bytes(good)
    faults_file = faults_dir / "decode.json"
    faults_file.write_text(json.dumps([{"action": "hang", "match": "poison_hang", "once": False},
                                       {"action": "crash", "match": "poison_crash", "once": False}]))
    data = job_dict(str(src), str(out), source={"format": "video_folder"})
    data["video"] = {"num_frames": 4, "size": 64, "decode_timeout_s": 5}
    data["temporal"] = [{"kind": "mean", "name": "mean"}]
    summary = run(data)
    errors = {r["sample_id"]: r for r in _errors(out)}
    assert errors["ApplyEyeMakeup/poison_hang.avi"]["error_type"] == "timeout"
    assert errors["ApplyEyeMakeup/poison_hang.avi"]["stage"] == "decode"
    assert errors["ApplyEyeMakeup/poison_crash.avi"]["error_type"] == "crash"
    assert errors["ApplyEyeMakeup/poison_crash.avi"]["stage"] == "decode"
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))
    assert summary.features >= 4


def _errors(out: Path):
    import pyarrow.dataset as pads

    return pads.dataset(str(out / "errors"), format="parquet").to_table().to_pylist()


def _alive_nodes(ray) -> set:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.mark.cluster  # a node of its own joins the session's Ray, and is killed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_2_worker_node_killed_mid_job(ray_session, ray_address, faults, tmp_path):
    src, out = images(tmp_path, n=100), tmp_path / "out"
    faults("embed", action="sleep", seconds=0.7, once=False)  # every model batch sleeps: the kill lands mid-job
    head = _alive_nodes(ray_session)
    node = join_node(ray_address, "--num-cpus=2", "--num-gpus=0")
    killed = []

    def kill_worker_after_first_commit():
        wait_for(lambda: committed_files(out), 180, "the first commit")
        os.killpg(node.pid, signal.SIGKILL)
        killed.append(time.time())

    try:
        wait_for(lambda: len(_alive_nodes(ray_session)) == len(head) + 1, 120, "the worker node to join")
        killer = threading.Thread(target=kill_worker_after_first_commit, daemon=True)
        killer.start()
        run(job_dict(str(src), str(out)))
        finished = time.time()
        killer.join(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(30)
    assert killed and killed[0] < finished, "the worker node was killed after the job had finished"
    # it finished on the head alone, once Ray saw the node die
    wait_for(lambda: _alive_nodes(ray_session) == head, 120, "Ray to see the worker node dead")
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_3_driver_sigkilled_then_the_same_command_resumes(ray_session, ray_address, faults, faults_dir, tmp_path):
    import yaml

    from conftest import accounted, read_errors, read_features

    src, out = images(tmp_path, n=62), tmp_path / "out"
    # 16 model batches of 4 rows, 1 s each, a file every two: the second file is committed some 4 s
    # into the model's 16 s, and the job's workers go on for a few seconds after the kill until Ray
    # stops them (with batches of 16 at 0.7 s, 78% were done by then; under load, once, all of it)
    job = job_dict(str(src), str(out), resources={"batch_size": 4, "decode_batch_size": 4})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    faults("embed", action="sleep", seconds=1.0, once=False)  # every model batch sleeps: the kill lands mid-job
    featurize = Path(sys.executable).with_name("featurize")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    # the driver joins the session's Ray (as on a cluster): killing it ends its job, whose actors Ray stops
    proc = subprocess.Popen([str(featurize), "run", str(job_file), "--address", ray_address], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(committed_files(out)) >= 2, 240, "the first commits")
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of it left over
        except ProcessLookupError:
            pass
    left = glob.glob(os.path.join(tempfile.gettempdir(), f"{host_prefix()}{proc.pid}-*"))
    assert left  # the killed driver's scratch (its plan, real URIs and all): no exit handler ran
    cpus = ray_session.cluster_resources()["CPU"]  # Ray stops the dead driver's workers: none may still decode
    wait_for(lambda: ray_session.available_resources().get("CPU") == cpus, 60, "the killed job's workers to stop")
    features, errors = accounted(str(out))
    done_ids = set(features) | set(errors)
    assert 0 < len(done_ids) < len(planned(src))
    done_uris = set(read_features(str(out), columns=["uri"])["uri"].to_pylist())
    if errors:
        done_uris |= set(read_errors(str(out))["uri"].to_pylist())

    faults("decode", action="record", once=False)  # log what the second run decodes and embeds
    faults("embed", action="record", once=False)
    summary = run(job)
    decoded, embedded = set(recorded(faults_dir, "decode")), set(recorded(faults_dir, "embed"))
    assert decoded and embedded
    assert not decoded & done_uris, "the second run decoded samples the first had committed"
    assert not embedded & done_ids, "the second run embedded samples the first had committed"
    assert summary.skipped >= len(done_ids)
    assert summary.skipped + summary.samples == len(planned(src))
    assert not [f for f in left if os.path.exists(f)]  # the next run on this host removed it
    assert_exactly_once(str(out), planned(src))
    assert_whole_files(str(out))


def _store_options(proxy: FaultProxy, attempts: int = 3):
    return {**s3_options(proxy.endpoint),
            "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}}}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_4_object_store_faults_and_an_outage(ray_session, s3, s3_server, tmp_path, capfd):
    fs, _ = s3
    src = s3_images(fs, tmp_path, n=40)
    out = f"s3://{S3_BUCKET}/out"

    # a permanent outage mid-job: the job fails with the store's error, and OUT stays resumable.
    # One attempt per botocore call (s3fs still retries SlowDown itself): the outage is permanent,
    # so more attempts only make the failure take longer (~65 s with 3 attempts, retried at every layer).
    with FaultProxy(s3_server) as proxy:
        job = job_dict(f"s3://{S3_BUCKET}/images/", out,
                       source={"storage_options": _store_options(proxy, attempts=1)}, resources={"batch_size": 4})

        def outage_after_first_commit():
            def committed():
                fs.invalidate_cache()
                return fs.exists(f"{S3_BUCKET}/out/features") and any(
                    k.endswith(".parquet") for k in fs.find(f"{S3_BUCKET}/out/features"))

            wait_for(committed, 240, "the first commit")
            proxy.down = True

        threading.Thread(target=outage_after_first_commit, daemon=True).start()
        started = time.time()
        with pytest.raises(Exception, match="SlowDown|reduce your request rate|503|Service Unavailable"):
            run(job)
        assert time.time() - started < 300

    # the outage is over, but the store drops or throttles a fifth of the requests: the same job
    # resumes (storage options are no part of what OUT holds), and the clients' retries absorb them
    with FaultProxy(s3_server, fault_rate=0.2, seed=7) as proxy:
        job["source"]["storage_options"] = _store_options(proxy)
        summary = run(job)
        assert proxy.resets > 0 and proxy.slowdowns > 0  # both kinds of fault happened, retries absorbed them
    fs.invalidate_cache()
    assert summary.skipped > 0
    assert_exactly_once(out, planned(src), fs)
    assert_whole_files(out, fs)
    _assert_secret_nowhere(fs, [f"{S3_BUCKET}/out"], capfd)


@pytest.mark.timeout(300)
def test_7_writers_killed_mid_publish_on_s3_leave_every_sample_once(ray_session, faults, faults_dir, s3, tmp_path):
    """Write tasks die right after handing their files to the (threaded) committer, whose publishes
    go on without them; Ray runs the tasks again, their blocks cut anew, while other writers commit:
    every sample once, as the store holds it, and the run ends complete."""
    fs, options = s3
    src = s3_images(fs, tmp_path, n=48)
    out = f"s3://{S3_BUCKET}/killed-writers"
    faults("commit", action="exit", after=2)  # a writer process exits with its commit call in flight
    job = job_dict(f"s3://{S3_BUCKET}/images/", out, source={"storage_options": options},
                   output={"storage_options": options}, resources={"batch_size": 4, "decode_batch_size": 4})
    summary = run(job)
    assert (faults_dir / "commit.json.fired").exists()
    fs.invalidate_cache()
    assert_exactly_once(out, planned(src), fs)
    assert_whole_files(out, fs)
    # a dead writer's files are published by the committer (when its call reached it, as it mostly
    # does: it is sent at once) and its answer is lost with it: the task runs again and finds those
    # rows committed (duplicates, dropped), so every row is counted once, one way or the other
    assert summary.features + sum(summary.errors.values()) + summary.duplicates == len(planned(src))
    assert not fs.exists(f"{S3_BUCKET}/killed-writers/_staging")  # nothing staged on an object store


def _assert_secret_nowhere(fs, prefixes, capfd):
    """The secret key given in storage options is in no output file, no Ray log, no printed line."""
    import ray

    secret = S3_SECRET.encode()
    for prefix in prefixes:
        for key in fs.find(prefix):
            assert secret not in fs.cat_file(key), key
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert S3_SECRET not in captured.out + captured.err
