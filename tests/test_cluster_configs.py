"""The cluster configs in cluster/ parse, hold no keys, and fit what the pipeline asks for.

Each config's node types, at their largest, become the node list `plan_resources` lays the
cluster job file (jobs/imagenet_train_cluster.yaml) onto: decode must land on the CPU-only nodes,
the model on GPUs that exist, and every per-task and per-actor request must fit a node.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_job, memory_bytes
from pipeline.extract.layout import plan_resources

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CLUSTER_JOB = ROOT / "jobs" / "imagenet_train_cluster.yaml"
IMAGENET_TRAIN = 1_281_167
KEYS = re.compile(r"aws_access_key_id|aws_secret_access_key|AKIA[0-9A-Z]{16}|secretAccessKey", re.I)


def pinned_ray() -> str:
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def node(name: str, cpus: float, gpus: float, memory: float):
    return {"NodeID": name, "Alive": True,
            "Resources": {"CPU": cpus, "memory": memory, **({"GPU": gpus} if gpus else {})}}


def k8s_quantity(value) -> float:
    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def check_job_fits(nodes) -> None:
    """Lay the cluster job onto the nodes and check each request against them."""
    job = load_job(str(CLUSTER_JOB))
    res = job.resources
    layout = plan_resources(job, IMAGENET_TRAIN, nodes)
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU")]
    cpu_nodes = [n for n in nodes if n["Resources"]["CPU"] and not n["Resources"].get("GPU")]
    assert gpu_nodes and cpu_nodes
    # decode on the CPU-only nodes, the model on the GPUs
    assert layout.decode_selector == {"ray.io/node-id": f"!in({','.join(n['NodeID'] for n in gpu_nodes)})"}
    assert layout.gpus_per_actor == 1.0 / res.actors_per_gpu
    assert layout.max_actors <= sum(n["Resources"]["GPU"] for n in gpu_nodes) * res.actors_per_gpu
    # every request fits a node of its kind
    assert res.decode_cpus <= min(n["Resources"]["CPU"] for n in cpu_nodes)
    assert res.max_decode_cpus <= sum(n["Resources"]["CPU"] for n in cpu_nodes)
    for n in cpu_nodes:  # a node full of decode tasks
        assert memory_bytes(res.task_memory, "") * n["Resources"]["CPU"] / res.decode_cpus <= n["Resources"]["memory"]
    for n in gpu_nodes:  # a node full of model actors
        actors = n["Resources"]["GPU"] * res.actors_per_gpu
        assert memory_bytes(res.actor_memory, "") * actors <= n["Resources"]["memory"], n["NodeID"]


# --- the Ray cluster launcher config for AWS -------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_config_is_valid_for_the_ray_cluster_launcher(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))  # Ray's own schema and checks, with the AWS defaults filled in


def test_aws_config_has_a_cpu_head_cpu_decode_workers_and_g5_p5_gpu_workers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} == {"g5", "p5"}
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for k, t in types.items() if t is not head)
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["node_config"]["IamInstanceProfile"]["Name"], name  # S3 through the instance profile
    assert sum(t["max_workers"] for t in types.values()) <= aws["max_workers"]


def test_aws_config_holds_no_keys_and_keeps_ray_private(aws):
    text = (CLUSTER / "aws.yaml").read_text()
    assert not KEYS.search(text)
    assert aws["provider"]["use_internal_ips"] is True
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)


def test_the_cluster_job_fits_the_aws_cluster_at_its_largest(aws):
    nodes = []
    for name, t in aws["available_node_types"].items():
        r = t["resources"]
        count = 1 if name == aws["head_node_type"] else t["max_workers"]
        nodes += [node(f"{name}{i}", r.get("CPU", 0), r.get("GPU", 0), r.get("memory", 0)) for i in range(count)]
    check_job_fits(nodes)


# --- KubeRay --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kuberay():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    (job,) = yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    by_kind = {d["kind"]: d for d in docs}
    return by_kind["RayCluster"], job, by_kind


def containers(template):
    return template["spec"]["containers"]


def test_raycluster_has_a_cpu_head_and_cpu_and_gpu_worker_groups(kuberay):
    cluster, _, by_kind = kuberay
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_ray()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in containers(g["template"])[0]["resources"]["limits"]]
    cpu = [g for g in groups.values() if g not in gpu]
    assert gpu and cpu
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for template in templates:  # S3 through the service account; token auth from a Secret
        assert template["spec"]["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
        env = {e["name"]: e for e in containers(template)[0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    policy = by_kind["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def test_manifests_and_image_hold_no_keys():
    for path in [*(CLUSTER / "kuberay").glob("*.yaml"), CLUSTER / "Dockerfile"]:
        assert not KEYS.search(path.read_text()), path


def test_the_cluster_job_fits_the_raycluster_at_its_largest(kuberay):
    cluster, _, _ = kuberay
    head = cluster["spec"]["headGroupSpec"]
    nodes = [node("head", float(head["rayStartParams"]["num-cpus"]), 0,
                  k8s_quantity(containers(head["template"])[0]["resources"]["limits"]["memory"]))]
    for g in cluster["spec"]["workerGroupSpecs"]:
        limits = containers(g["template"])[0]["resources"]["limits"]
        nodes += [node(f"{g['groupName']}{i}", k8s_quantity(limits["cpu"]), k8s_quantity(limits.get("nvidia.com/gpu", 0)),
                       k8s_quantity(limits["memory"])) for i in range(g["maxReplicas"])]
    check_job_fits(nodes)


def test_rayjob_runs_a_job_file_of_this_repo_on_the_raycluster(kuberay):
    cluster, job, _ = kuberay
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "pipeline.cli", "run"] and entry[-2:] == ["--address", "auto"]
    image_path = Path(entry[4])
    assert image_path.parent == Path("/opt/featurize/jobs")  # where cluster/Dockerfile puts jobs/
    load_job(str(ROOT / "jobs" / image_path.name))  # a job file of this repo, and a valid one
    env = {e["name"]: e for e in containers(spec["submitterPodTemplate"])[0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"


def test_the_image_is_built_on_the_pinned_ray_and_carries_the_job_files():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:([\d.]+)-", dockerfile, re.M).group(1) == pinned_ray()
    assert "COPY --chown=ray jobs ./jobs" in dockerfile and "WORKDIR /opt/featurize" in dockerfile
