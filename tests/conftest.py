"""Shared fixtures for the end-to-end tests: one local Ray, one moto S3 server, job helpers.

Everything here is real: Ray runs the pipeline in worker processes, moto serves the S3 API over
HTTP on 127.0.0.1, and outputs are read back with pyarrow (and DuckDB in the tests).
Nothing is autouse, so the unit tests in this folder never pay for Ray or moto.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

# Dummy credentials: handed to s3fs through storage options only (never the environment).
S3_KEY = "featurize-test-key"
S3_SECRET = "featurize-test-secret-Zq8vX2pL"
S3_BUCKET = "featurize-e2e"

# Small and fast: random-init ResNet-18 on 56x56 crops.
SMALL_MODEL = {"arch": "resnet18", "weights": "none"}
SMALL_PREPROCESS = {"resize": 64, "crop": 56}
SMALL_RESOURCES = {"batch_size": 16, "decode_batch_size": 8}
# a file a model batch or so (16 rows of 512 float16 are ~18 KB), so a few samples commit in several
# files, as the tests that stop a run midway and resume it need; real jobs keep the 64MiB default
SMALL_FILE_SIZE = "8KiB"


@pytest.fixture(scope="session")
def faults_dir(tmp_path_factory):
    """The folder FEATURIZE_FAULTS names in every Ray worker of the session (see pipeline/faults.py)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture
def faults(faults_dir):
    """arm(point, **spec) arms a failpoint for this test, arm(point, spec, spec, ...) a list of specs
    (the first that matches a hit applies); everything armed is disarmed after it."""
    import json

    def arm(point: str, *specs, **spec):
        (faults_dir / f"{point}.json").write_text(json.dumps(list(specs) if specs else spec))

    yield arm
    for f in faults_dir.iterdir():
        f.unlink()


# A training's worker that exits right after it reported epoch 2, having waited after epoch 1 until
# Ray Train's controller (it polls its workers) surely registered that epoch's checkpoint: without
# the wait, on a loaded machine neither report may be registered and the rerun starts from 0.
WORKER_DIES_AFTER_EPOCH_2 = ({"action": "sleep", "seconds": 3, "match": "1", "once": False},
                             {"action": "exit", "match": "2"})


def recorded(faults_dir, point: str) -> List[str]:
    """Keys a failpoint armed with action "record" has logged."""
    log = faults_dir / f"{point}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def ray_tmpdir():
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 107 characters)."""
    path = tempfile.mkdtemp(prefix="ftray-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _usage_tags_with_a_timeout() -> None:
    """Ray's telemetry puts (record_extra_usage_tag: Ray Data records its operators at every
    execution, Tune its searcher) wait on the GCS with no timeout. In 5 of the last 9 full runs
    (with Ray's default settings too), the driver's GCS calls went unanswered after test_lbfgs's
    sweep, such a put first: the driver waited in InternalKVAccessor::Put while the GCS, alive,
    held no KV call and answered a client in another process at once (in one run the stall ended
    after 20+ minutes). A tag is telemetry only: here a put gets 10 s, then is dropped, as Ray
    drops a failed one (debug log)."""
    from ray._common.usage import usage_constants, usage_lib
    from ray.experimental import internal_kv

    def put(key: str, value: str, gcs_client=None) -> None:
        client = gcs_client or internal_kv.global_gcs_client
        try:
            client.internal_kv_put(f"{usage_constants.EXTRA_USAGE_TAG_PREFIX}{key}".encode(), value.encode(), True,
                                   usage_constants.USAGE_STATS_NAMESPACE.encode(), timeout=10)
        except Exception as e:  # Ray's own put swallows every error the same way
            logging.getLogger(__name__).debug("usage tag %s dropped: %s", key, e)

    usage_lib._put_extra_usage_tag = put


_STALLED: List[Any] = []


# What starts Ray: the session's (ray_session, ray_address) or a cluster (local_cluster, test_cluster).
_STARTS_RAY = re.compile(r"\b(ray_session|ray_address|local_cluster)\b")


@functools.lru_cache(maxsize=None)
def _starts_ray(path: Path) -> bool:
    return bool(_STARTS_RAY.search(path.read_text()))


def pytest_collection_modifyitems(items):
    """The test files that start Ray first, each in collection order. They take most of the suite's
    time: `make test` runs two pytest-xdist workers a file at a time (`--dist loadfile
    --no-loadscope-reorder`, so a module's fixtures are built once, in one worker) and hands them out
    in this order, so the short files fill in at the end, not the long ones."""
    items.sort(key=lambda item: not _starts_ray(item.path))  # stable: the order within each part stays


def pytest_runtest_setup(item):
    if "ray_session" in item.fixturenames:
        _answering_gcs_client()


def _answering_gcs_client() -> None:
    """The session driver's GCS client, checked before each test that uses the session's Ray: a
    stalled one (_usage_tags_with_a_timeout) is replaced by a new client of the same GCS (a new
    client in another process answered at once in a stalled run). Every internal KV call of the
    driver goes through it: Ray Data's telemetry, and the export of each remote function, which
    stalled the same way in a later run. Not a cure: the driver's core worker stalled with it there (its
    task events unanswered), so a test that creates actors may still wait."""
    import sys
    import warnings

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray._private import worker
    from ray._raylet import GcsClient
    from ray.experimental import internal_kv

    stalled = worker.global_worker.gcs_client
    try:
        stalled.internal_kv_get(b"answering", b"featurize-tests", timeout=5)
        return
    except Exception as e:
        warnings.warn(f"the session driver's GCS client did not answer in 5 s ({type(e).__name__}): replaced",
                      stacklevel=2)
    _STALLED.append(stalled)  # kept: destroying a client with a call in flight could block on its thread
    # by 127.0.0.1, not the address the stalled one uses: another gRPC target, so its own connection
    # (channels to one target share theirs); the session's GCS is local and listens on every interface
    port = stalled.address.rsplit(":", 1)[1]
    fresh = GcsClient(address=f"127.0.0.1:{port}", cluster_id=stalled.cluster_id.hex())
    worker.global_worker.gcs_client = fresh
    internal_kv._initialize_internal_kv(fresh)


@pytest.fixture(scope="session")
def ray_session(faults_dir):
    """One local Ray for the whole session (each xdist worker's); `run_job` finds it initialised and reuses it."""
    import ray

    from pipeline.jobrun import LOCAL_RAY_ENV

    if ray.is_initialized():  # pragma: no cover - someone else started it in this process
        yield ray
        return
    # address="local": always a Ray of our own; without it ray.init joins any cluster that a
    # concurrent `ray start` or ray.cluster_utils.Cluster (test_cluster, test_faults) advertises in
    # /tmp/ray, and fails ("num_cpus ... must not be provided").
    # Idle task workers are kept for the session, not stopped after a second beyond 2 (the CPUs): the
    # next run's read, decode and write tasks find them with ray.data, pyarrow and pipeline imported
    # (a small job's run took 7.1 s, 5.3 s with them kept; each holds 80-220 MB RSS). A killed
    # node is seen dead after 5 health checks a second apart, not 3 s apart (test_faults test_2: the
    # rest of the job after the kill took 23 s, 14 s). (A run with Ray's defaults hung as runs with
    # these did: _usage_tags_with_a_timeout.)
    _usage_tags_with_a_timeout()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"num_workers_soft_limit": 16, "idle_worker_killing_time_threshold_ms": 3_600_000,
                            "health_check_period_ms": 1000},
             runtime_env={"env_vars": {"FEATURIZE_FAULTS": str(faults_dir), **LOCAL_RAY_ENV}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def ray_address(ray_session):
    """The session's Ray, for a `featurize` subprocess to join with `--address` instead of starting a
    Ray of its own (10-30 s on a busy 2-core machine). Pass the subprocess this process's environment
    (RAY_AUTH_MODE included, as the head read it) and arm its failpoints with `faults`: the session's
    workers read FEATURIZE_FAULTS from the head's runtime_env, not from the subprocess."""
    return ray_session.get_runtime_context().gcs_address


def join_node(address: str, *args: str, env: Optional[Dict[str, str]] = None):
    """A node that joins the Ray at `address` (`ray start --block ARGS`), in a process group of its own:
    SIGKILL to the group takes its raylet and agents down at once, as when a machine dies (its workers,
    in groups of their own, exit as they find their raylet gone); SIGTERM to the process stops the node
    cleanly."""
    import subprocess
    import sys

    env = dict(os.environ if env is None else env)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block", f"--address={address}",
                             "--min-worker-port=0", "--max-worker-port=0", "--dashboard-agent-listen-port=0",
                             "--disable-usage-stats", *args],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"moto server did not come up on port {port}")


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on a free local port (as s3fs's own tests run it); yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_for_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server):
    """(s3fs filesystem, storage options) for the moto server, with a fresh bucket per test."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = s3_options(s3_server)
    fs = s3fs.S3FileSystem(**options)
    if fs.exists(S3_BUCKET):
        fs.rm(S3_BUCKET, recursive=True)
    fs.mkdir(S3_BUCKET)
    fs.invalidate_cache()
    yield fs, options
    s3fs.S3FileSystem.clear_instance_cache()


def s3_options(endpoint: str) -> Dict[str, Any]:
    return {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": endpoint}}


# What Ray prints on a console that a run keeps off it (pipeline/console.py); test_progress, test_interrupt
RAY_NOISE = ("Token authentication is enabled", "has constructor arguments in the object store",
             "does not have any available CPUs", "Progress bars disabled")


def refusal_lines(stderr: str) -> List[str]:
    """stderr's lines less the `starting` line a run prints before it can refuse (the job's model,
    source and output are checked after the imports that line is printed ahead of)."""
    lines = stderr.strip().splitlines()
    while lines and lines[0].startswith("starting     job "):
        lines = lines[1:]
    return lines


def job_dict(source_uri: str, output_uri: str, *, name: str = "e2e", source: Optional[Dict[str, Any]] = None,
             output: Optional[Dict[str, Any]] = None, resources: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A small job as the YAML file would hold it."""
    return {
        "name": name,
        "source": {"uri": source_uri, **(source or {})},
        "output": {"uri": output_uri, "file_size": SMALL_FILE_SIZE, **(output or {})},
        "preprocess": dict(SMALL_PREPROCESS),
        "model": dict(SMALL_MODEL),
        "resources": {**SMALL_RESOURCES, **(resources or {})},
    }


def run(data: Dict[str, Any], **modes):
    """parse_job + run_job on the Ray the caller's `ray_session` fixture started."""
    from pipeline.config import parse_job
    from pipeline.extract.runner import run_job

    return run_job(parse_job(data), **modes)


def assert_whole_files(out: str, fs=None) -> None:
    """Every file under OUT/features and OUT/errors is a complete Parquet file, and nothing else is
    there (no temporary or partial files), read by pyarrow and by DuckDB alike."""
    import duckdb
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    fs = fs or LocalFileSystem()
    for table in ("features", "errors"):
        path = f"{_strip(fs, out)}/{table}"
        if not fs.exists(path):
            continue
        files = fs.find(path)
        names = [f.rsplit("/", 1)[-1] for f in files]
        assert all(n.startswith("part-") and n.endswith(".parquet") for n in names), names
        for f in files:
            with fs.open(f, "rb") as fh:
                pq.read_table(fh)  # a truncated file fails here
        if isinstance(fs, LocalFileSystem):
            n = duckdb.sql(f"select count(*) from read_parquet('{path}/**/*.parquet')").fetchall()[0][0]
            assert n == sum(pq.read_metadata(f).num_rows for f in files)


def _strip(fs, uri: str) -> str:
    return fs._strip_protocol(uri).rstrip("/")


def read_features(out: str, fs=None, columns: Optional[List[str]] = None):
    """OUT/features as one pyarrow table, hive partitioning (`split=<v>` folders -> columns)."""
    import pyarrow.dataset as pads
    from fsspec.implementations.local import LocalFileSystem

    fs = fs or LocalFileSystem()
    path = f"{_strip(fs, out)}/features"
    if not fs.exists(path):
        return None
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=columns)


def read_errors(out: str, fs=None):
    import pyarrow.dataset as pads
    from fsspec.implementations.local import LocalFileSystem

    fs = fs or LocalFileSystem()
    path = f"{_strip(fs, out)}/errors"
    if not fs.exists(path):
        return None
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def accounted(out: str, fs=None) -> Tuple[List[str], List[str]]:
    """(sample ids in OUT/features, sample ids in OUT/errors), as lists so duplicates show."""
    features = read_features(out, fs, columns=["sample_id"])
    errors = read_errors(out, fs)
    return (
        [] if features is None else features["sample_id"].to_pylist(),
        [] if errors is None else errors["sample_id"].to_pylist(),
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 0.2 s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def video_stage_rows(prepared, paths, root) -> Dict[str, Any]:
    """A video job's rows as its stages make them (decode_video_batch, the model actor, the temporal
    actor), run in this process in turn: what the sink gets for the local videos `paths` (ids
    relative to `root`). For checks of a stage's output that need no run on Ray."""
    import numpy as np

    from pipeline.extract.video import decode_video_batch
    from pipeline.models.actor import Embedder, EmbedSpec
    from pipeline.models.temporal import TemporalEmbedder

    n, job = len(paths), prepared.job
    batch = {"sample_id": [str(p.relative_to(root)) for p in paths], "uri": [str(p) for p in paths],
             "label": [p.parent.name for p in paths], "split": ["all"] * n, "data": [b""] * n,
             "error_stage": [""] * n, "error_type": [""] * n, "error_message": [""] * n}
    (batch,) = decode_video_batch({k: np.array(v, dtype=object) for k, v in batch.items()}, prepared.frames,
                                  job.video, windowed=bool(job.video.window_s))
    spec = EmbedSpec(model=job.model, weights=prepared.weights, crop=prepared.image.crop, dim=prepared.dim,
                     mean=prepared.mean, std=prepared.std, dtype=job.output.dtype, torch_threads=2)
    temporal = TemporalEmbedder(prepared.heads, dtype=job.output.dtype,
                                keep_frame_features=job.output.frame_features, torch_threads=2)
    return temporal(Embedder(spec)(batch))


def planned(src) -> List[str]:
    """The sample ids an image or video folder plans: every file's path relative to it."""
    return sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())


def assert_exactly_once(out: str, expected, fs=None) -> Tuple[List[str], List[str]]:
    """Every expected sample id appears exactly once across features and errors, nothing else."""
    features, errors = accounted(out, fs)
    seen = features + errors
    duplicates = sorted({s for s in seen if seen.count(s) > 1})
    assert not duplicates, f"samples written more than once: {duplicates}"
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    assert not missing, f"planned samples missing from the output: {missing}"
    assert not extra, f"unplanned samples in the output: {extra}"
    assert len(seen) == len(set(expected))
    return features, errors


def tree(root) -> Dict[str, Tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under a local folder."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out
