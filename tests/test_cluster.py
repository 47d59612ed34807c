"""The cluster path, on real Ray processes on this machine.

`cluster/local.sh` starts a head (`ray start --head`, dashboard and Jobs API on a free loopback
port, token authentication on) and a worker node joining it; `featurize submit` sends jobs through
the Jobs API; the cluster is stopped after the module, also when a test fails. For the last test a
node with a (declared) GPU joins it, and the test checks where each stage ran.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pipeline.samples import make_image_folder

from conftest import _free_port, assert_exactly_once, assert_whole_files, join_node, planned

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"
BIN = Path(sys.executable).parent


def _client_env(state: str, env: dict) -> dict:
    """The environment `local.sh env` tells clients to export."""
    out = subprocess.run([str(LOCAL_SH), "env"], env=env, capture_output=True, text=True, check=True).stdout
    client = dict(env)
    for line in out.splitlines():
        for pair in line.removeprefix("export ").split():
            key, _, value = pair.partition("=")
            client[key] = value
    return client


@pytest.fixture(scope="module")
def local_cluster():
    state = tempfile.mkdtemp(prefix="fzc", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "FEATURIZE_CLUSTER_DIR": state, "RAY": str(BIN / "ray"),
           "RAY_PORT": str(_free_port()), "DASHBOARD_PORT": str(_free_port()), "CLIENT_PORT": str(_free_port()),
           "HEAD_CPUS": "2", "WORKER_CPUS": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           # On SIGTERM a node first drains, up to 30 s: the head, which hosts the Jobs API and the
           # drivers' leftovers, never goes idle, so `down` waited out the whole 30 s after the tests.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run([str(LOCAL_SH), "up", "1"], env=env, capture_output=True, text=True, timeout=240)
        logs = "".join(p.read_text()[-2000:] for p in Path(state).glob("*.log"))
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}\n{logs}"
        yield _client_env(state, env)
    finally:
        subprocess.run([str(LOCAL_SH), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def featurize(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's pipeline, also where the venv's `featurize` was installed from another one
    return subprocess.run([str(BIN / "featurize"), *args], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def jobs(env: dict):
    """The cluster's jobs, asked from a fresh process (Ray reads RAY_AUTH_MODE once per process)."""
    script = ("import json, os; from ray.job_submission import JobSubmissionClient; print(json.dumps(["
              "{'id': j.submission_id, 'status': str(j.status.value), 'metadata': j.metadata} for j in "
              "JobSubmissionClient(os.environ['RAY_API_SERVER_ADDRESS']).list_jobs()]))")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_submit_wait_runs_the_demo_job_on_the_cluster(local_cluster, tmp_path):
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=40, broken=2)
    proc = featurize(local_cluster, "submit", "jobs/demo.yaml", "--wait",
                     "--set", f"source.uri={src}", "--set", f"output.uri={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted   featurize-demo-resnet18-" in proc.stdout
    assert "--address auto" in proc.stdout  # the driver ran on the cluster, against it
    assert "samples      42 (40 features, 2 errors)" in proc.stdout  # the job's own summary, streamed back
    features, errors = assert_exactly_once(str(out), planned(src))
    assert (len(features), len(errors)) == (40, 2)
    assert_whole_files(str(out))
    record = json.loads((out / "_job.json").read_text())  # the driver joined the whole cluster
    assert record["status"] == "complete" and record["layout"]["cpus"] == 3.0  # head 2 + worker 1
    (job,) = [j for j in jobs(local_cluster) if j["id"] in proc.stdout]
    assert job["status"] == "SUCCEEDED" and job["metadata"]["featurize.output"] == str(out)
    token = Path(local_cluster["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert token not in proc.stdout + proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_drives_the_job_on_an_existing_cluster_through_ray_client(local_cluster, tmp_path):
    """`ray://`: through Ray Client, the driver runs as a task on the head. (`--address auto`, a
    driver joining the cluster, is what the submitted job's entrypoint runs: the test above.)"""
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=24, broken=1)
    address = f"ray://127.0.0.1:{local_cluster['CLIENT_PORT']}"
    proc = featurize(local_cluster, "run", "jobs/demo.yaml", "--address", address,
                     "--set", f"source.uri={src}", "--set", f"output.uri={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples      25 (24 features, 1 errors)" in proc.stdout
    assert_exactly_once(str(out), planned(src))
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "complete" and record["layout"]["cpus"] == 3.0  # head 2 + worker 1


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_job_that_fails_on_the_cluster_exits_with_its_reason(local_cluster, tmp_path):
    proc = featurize(local_cluster, "submit", "jobs/demo.yaml", "--wait",
                     "--set", f"source.uri={tmp_path / 'nothing-here'}", "--set", f"output.uri={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # the driver's "cannot run" code
    assert "nothing-here" in proc.stdout  # the driver's own message, streamed
    assert "failed" in proc.stderr


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_bad_job_file_never_reaches_the_cluster(local_cluster, tmp_path):
    before = len(jobs(local_cluster))
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "jobs/demo.yaml").read_text().replace("pool: avg", "pool: mean"))
    proc = featurize(local_cluster, "submit", str(bad), "--wait")
    assert proc.returncode == 2
    assert "model.pool: 'mean' is not one of avg, max, none" in proc.stderr
    proc = featurize(local_cluster, "submit", "jobs/demo.yaml", "--set", "resources.actors=0")
    assert proc.returncode == 2 and "resources.actors" in proc.stderr
    assert "submitted" not in proc.stdout
    assert len(jobs(local_cluster)) == before


def test_an_unreachable_cluster_is_refused_with_the_address(tmp_path):
    address = f"http://127.0.0.1:{_free_port()}"
    proc = featurize({**os.environ, "RAY_AUTH_MODE": "disabled"}, "submit", "jobs/demo.yaml", "--address", address,
                     timeout=120)
    assert proc.returncode == 2
    assert f"cannot reach the Ray Jobs API at {address}" in proc.stderr


PLACEMENT_JOB = textwrap.dedent('''
    import collections, json, sys, time
    import ray
    from ray.util.state import list_actors, list_tasks
    from pipeline.config import parse_job
    from pipeline.extract.runner import run_job

    ray.init(log_to_driver=False)  # the cluster at RAY_ADDRESS
    deadline = time.time() + 120
    while not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]:
        assert time.time() < deadline, "the GPU node did not join"
        time.sleep(0.2)
    try:
        summary = run_job(parse_job(json.loads(sys.argv[1])))
        job_id = ray.get_runtime_context().get_job_id()  # this driver's tasks, not the other tests' jobs
        where = collections.defaultdict(set)
        for t in list_tasks(filters=[("job_id", "=", job_id)], limit=10000, detail=True,
                            raise_on_missing_output=False):
            if t.node_id:  # a task cancelled before it was scheduled ran nowhere
                where[t.name].add(t.node_id)
        for a in list_actors(filters=[("job_id", "=", job_id)], limit=1000, detail=True):
            if a.node_id:
                where["actor " + a.class_name].add(a.node_id)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({"cpu_only": [n["NodeID"] for n in nodes if not n["Resources"].get("GPU")],
                                      "gpu": [n["NodeID"] for n in nodes if n["Resources"].get("GPU")],
                                      "layout": summary.layout, "where": {k: sorted(v) for k, v in where.items()}}))
    finally:
        ray.shutdown()
''')


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_decode_runs_on_cpu_nodes_and_the_model_on_gpu_nodes(local_cluster, tmp_path):
    """A node with a (declared) GPU joins the module's cluster for this test: the model actor falls back
    to the CPU there, and decode keeps to the CPU-only nodes."""
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=40, broken=1)
    job = {"name": "placement", "source": {"uri": str(src), "split": "s"}, "output": {"uri": str(out)},
           "model": {"arch": "resnet18", "weights": "none"}, "preprocess": {"resize": 64, "crop": 56},
           "resources": {"batch_size": 8, "decode_batch_size": 4}}
    gpu_node = join_node(local_cluster["RAY_ADDRESS"], "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1",
                         env=local_cluster)
    try:
        proc = subprocess.run([sys.executable, "-c", PLACEMENT_JOB, json.dumps(job)], cwd=ROOT, env=local_cluster,
                              capture_output=True, text=True, timeout=280)
    finally:
        gpu_node.terminate()  # a clean stop: the head knows at once that the node is gone
        try:
            gpu_node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gpu_node.pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    where, cpu_only, (gpu,) = result["where"], result["cpu_only"], result["gpu"]
    assert result["layout"]["decode_on"] == "CPU-only nodes (2 of 3)"
    (decode,) = [name for name in where if "decode_batch" in name]
    assert where[decode] and set(where[decode]) <= set(cpu_only)
    (model,) = [name for name in where if name.startswith("actor MapWorker(MapBatches(Embedder")]
    assert where[model] == [gpu]
    assert_exactly_once(str(out), planned(src))
