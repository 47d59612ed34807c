"""How a job is laid onto the cluster's nodes: model actors, decode tasks, their resources.

Pure functions of the job and the node list (`ray.nodes()`), so the cluster configs' tests can lay
a job onto a cluster that exists only on paper (tests/test_cluster_configs.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import ray
from ray.data import TaskPoolStrategy

from ..config import JobConfig, ResourcesConfig, memory_bytes
from ..errors import ConfigError

GPU_BATCH, CPU_BATCH = 256, 32


@dataclass
class Layout:
    """How the pipeline is laid onto the cluster's resources."""

    gpus: int  # GPUs the model actors share; 0: the model runs on CPUs
    cpus: float
    actors: int  # model actors at the start ...
    max_actors: int  # ... and at most, as Ray Data scales the pool with the load
    gpus_per_actor: float
    batch_size: int
    torch_threads: int
    actor_cpus: float
    rows_per_read_task: int
    decode_tasks: Optional[int] = None  # cap on concurrent read+decode tasks (resources.max_decode_cpus)
    decode_slots: int = 1  # read+decode tasks that can run at once
    decode_on: str = "any node"
    decode_in_actor: bool = False  # images decode in the model actor, beside the model, not in tasks
    decode_selector: Dict[str, str] = field(default_factory=dict)  # Ray label selector for decode tasks


def plan_resources(job: JobConfig, planned: int, nodes: Optional[List[Dict[str, Any]]] = None) -> Layout:
    """Lay the job onto the cluster's alive nodes (`ray.nodes()` unless given)."""
    res = job.resources
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n["Alive"]]
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) > 0]
    gpus = int(sum(n["Resources"]["GPU"] for n in gpu_nodes)) if job.model.device != "cpu" else 0
    # model.device: cuda on a cluster with no GPU node yet: ask for GPUs anyway, an autoscaler brings them
    use_gpus = gpus > 0 or job.model.device == "cuda"
    actor_slots = res.max_actors or (max(1, gpus) * res.actors_per_gpu if use_gpus else 1)
    actors, max_actors = (1, actor_slots) if res.actors == "auto" else (res.actors, res.actors)
    in_actor = res.decode_on == "actor" or (res.decode_on == "auto" and not use_gpus and not job.is_video)
    decode_nodes, selector, where = _decode_nodes(res.decode_on, nodes, gpu_nodes if use_gpus else [])
    cpus = float(sum(n["Resources"].get("CPU", 0) for n in nodes)) or float(os.cpu_count() or 1)
    decode_cpus = float(sum(n["Resources"].get("CPU", 0) for n in decode_nodes)) or cpus
    decode_tasks = None
    if res.max_decode_cpus is not None:
        decode_tasks = max(1, int(res.max_decode_cpus // res.decode_cpus))
        decode_cpus = min(decode_cpus, res.max_decode_cpus)
    batch = res.batch_size if res.batch_size != "auto" else (GPU_BATCH if use_gpus else CPU_BATCH)
    # A CPU actor claims one logical CPU but runs torch on its node's cores: it decodes its own
    # images between forward passes, or decode tasks beside it take a small share of them.
    cpu_counts = [n["Resources"]["CPU"] for n in nodes if n["Resources"].get("CPU")]
    node_cpus = max(cpu_counts, default=cpus)
    actors_per_node = math.ceil(max_actors / max(1, len(cpu_counts)))
    threads = res.torch_threads if res.torch_threads != "auto" else max(1, int(node_cpus // actors_per_node))
    # Enough read tasks to keep every decode core busy, none larger than read_block_size rows.
    # A video row carries num_frames images: keep read tasks' outputs about as large as for images.
    per_row = job.video.num_frames if job.is_video else 1
    rows = max(1, min(res.read_block_size // per_row, math.ceil(planned / max(2.0, 2 * decode_cpus))))
    actor_cpus = _actor_cpus(res.decode_cpus, node_cpus, actors_per_node, use_gpus)
    decode_slots = max(1, int((decode_cpus - actor_cpus * max_actors) // res.decode_cpus))  # beside CPU actors
    return Layout(
        gpus=gpus, cpus=cpus, actors=actors, max_actors=max_actors,
        gpus_per_actor=1.0 / res.actors_per_gpu if use_gpus else 0.0, batch_size=batch, torch_threads=threads,
        actor_cpus=actor_cpus, rows_per_read_task=rows, decode_tasks=decode_tasks,
        decode_slots=min(decode_slots, decode_tasks or decode_slots), decode_selector=selector,
        decode_on="the model actor" if in_actor else where, decode_in_actor=in_actor)


def _decode_nodes(decode_on: str, nodes, gpu_nodes):
    """Where read+decode tasks run: (nodes, Ray label selector, description).

    On a cluster with GPU and CPU-only nodes, decode stays off the GPU nodes, so their CPUs feed
    the model (copies, batching) rather than compete with it. GPU nodes that join later are not
    in the selector and may take decode tasks too. Images decoded in the model actor (`actor`)
    leave only reads to the tasks, which may run anywhere."""
    cpu_only = [n for n in nodes if n["Resources"].get("CPU") and not n["Resources"].get("GPU")]
    if decode_on == "cpu_nodes" and not cpu_only:
        raise ConfigError("resources.decode_on: cpu_nodes, but the cluster has no CPU-only node")
    if decode_on in ("any", "actor") or not (gpu_nodes and cpu_only):
        return nodes, {}, "any node"
    avoid = ",".join(n["NodeID"] for n in gpu_nodes)
    return cpu_only, {"ray.io/node-id": f"!in({avoid})"}, f"CPU-only nodes ({len(cpu_only)} of {len(nodes)})"


def _actor_cpus(decode_cpus: float, node_cpus: float, actors_per_node: int, gpus: bool) -> float:
    """Logical CPUs a model actor claims: never so many that no decode task fits beside them
    (then the job would wait forever); write tasks claim none, so they always fit."""
    if decode_cpus > node_cpus:
        raise ConfigError(f"resources.decode_cpus: {decode_cpus} is more than a node's {node_cpus} CPUs")
    if gpus:
        return 0.0
    return min(1.0, (node_cpus - decode_cpus) / actors_per_node) or 0.01


def decode_args(layout: Layout, res: ResourcesConfig) -> Dict[str, Any]:
    """Ray arguments of the read and decode tasks (the same for both, so Ray Data fuses them)."""
    args: Dict[str, Any] = {"num_cpus": res.decode_cpus}
    if layout.decode_selector:
        args["label_selector"] = layout.decode_selector
    if layout.decode_tasks:
        args["compute"] = TaskPoolStrategy(size=layout.decode_tasks)
    if res.task_memory is not None:
        args["memory"] = memory_bytes(res.task_memory, "resources.task_memory")
    return args


def model_args(layout: Layout, res: ResourcesConfig) -> Dict[str, Any]:
    gpu = layout.gpus_per_actor
    args: Dict[str, Any] = {"num_gpus": gpu} if gpu else {"num_cpus": layout.actor_cpus}
    if res.actor_memory is not None:
        args["memory"] = memory_bytes(res.actor_memory, "resources.actor_memory")
    return args


def stage_workers(layout: Layout, job: JobConfig) -> Dict[str, int]:
    """How many of each stage ran at once, at most (write tasks come as blocks do, like decode's)."""
    decode = layout.max_actors if layout.decode_in_actor else layout.decode_slots
    return {"read": layout.decode_slots, "decode": decode, "model": layout.max_actors,
            "temporal": 1 if job.is_video else 0, "write": layout.decode_slots}
