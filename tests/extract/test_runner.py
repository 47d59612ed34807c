"""How the pipeline is laid onto a cluster: plan_resources is a pure function of the job and a node
list as `ray.nodes()` gives it, so these tests hand it nodes (one 2-CPU machine, heterogeneous
clusters, dead nodes) and need no Ray; one test checks that list's shape against the live session's."""
import pytest

from pipeline.config import parse_job
from pipeline.errors import ConfigError
from pipeline.extract.layout import decode_args, model_args, plan_resources, stage_workers

BASE = {"name": "t", "source": {"uri": "data/"}, "output": {"uri": "out/"}}


def node(node_id, cpus, gpus=0, alive=True):
    """One entry of `ray.nodes()`, with the keys layout reads."""
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


LOCAL = [node("local", 2)]  # a 2-core machine's embedded Ray
CLUSTER = [node("head", 8), node("cpu1", 32), node("cpu2", 32), node("gpu1", 16, 4), node("gpu2", 16, 4),
           node("gone", 64, 8, alive=False)]


def plan(nodes, planned=10**6, model=None, **resources):
    return plan_resources(parse_job({**BASE, "model": model or {}, "resources": resources}), planned, nodes)


def test_cpu_defaults_use_every_core_and_leave_room_for_decode():
    lay = plan(LOCAL, 1000)
    assert lay.gpus == 0 and lay.actors == 1 and lay.batch_size == 32 and lay.cpus == 2.0
    assert lay.torch_threads == 2  # Ray's default of one thread per actor would halve the model
    assert lay.actor_cpus + 0.5 <= 2  # at least one decode task always fits beside the actor


def test_images_for_a_cpu_model_decode_in_the_actor_videos_and_gpus_in_tasks():
    lay = plan(LOCAL, 1000)
    assert lay.decode_in_actor and lay.decode_on == "the model actor"
    assert stage_workers(lay, parse_job(BASE))["decode"] == lay.max_actors
    assert not plan(LOCAL, 1000, decode_on="any").decode_in_actor
    video = parse_job({**BASE, "source": {"uri": "v/", "media": "video"}, "temporal": [{"kind": "mean", "name": "mean"}],
                       "video": {"num_frames": 16}})  # prepare() resolves a null num_frames before the layout
    assert not plan_resources(video, 100, LOCAL).decode_in_actor
    assert not plan(CLUSTER).decode_in_actor  # GPUs: CPU nodes decode, the GPU nodes' CPUs feed the model
    lay = plan(CLUSTER, decode_on="actor")
    assert lay.decode_in_actor and lay.decode_selector == {}


def test_several_cpu_actors_share_the_cores():
    lay = plan(LOCAL, 1000, actors=2)
    assert lay.torch_threads == 1
    assert 2 * lay.actor_cpus + 0.5 <= 2
    big = plan([node("a", 16), node("b", 16)], 1000, actors=4)  # two actors a node, 8 threads each
    assert (big.max_actors, big.torch_threads) == (4, 8)


def test_read_tasks_are_small_enough_to_spread_and_stream():
    assert plan(LOCAL, 100).rows_per_read_task == 25
    assert plan(LOCAL, 10**6).rows_per_read_task == 256
    assert plan(LOCAL, 10**6, read_block_size=64).rows_per_read_task == 64


def test_explicit_settings_win():
    lay = plan(LOCAL, 1000, batch_size=8, torch_threads=1, actors=1)
    assert (lay.batch_size, lay.torch_threads) == (8, 1)


def test_decode_tasks_larger_than_a_node_are_refused():
    with pytest.raises(ConfigError, match="resources.decode_cpus"):
        plan(LOCAL, 1000, decode_cpus=4.0)


def test_dead_nodes_count_for_nothing():
    """A node Ray lists as dead (Alive false) lends neither CPUs nor GPUs nor a place to decode."""
    alive = [n for n in CLUSTER if n["Alive"]]
    assert plan(CLUSTER) == plan(alive)
    assert plan(CLUSTER).cpus == 104.0  # 8 + 32 + 32 + 16 + 16, not the dead node's 64
    lay = plan([node("gpu", 8, 1, alive=False), node("cpu", 4)])  # its only GPU node is gone
    assert lay.gpus == 0 and lay.gpus_per_actor == 0 and lay.decode_selector == {} and lay.decode_in_actor
    with pytest.raises(ConfigError, match="no CPU-only node"):
        plan([node("cpu", 4, alive=False), node("gpu", 8, 1)], decode_on="cpu_nodes")


def test_the_live_rays_node_list_is_what_layout_reads(ray_session):
    """The hand-made nodes above have the shape of `ray.nodes()`: the default reads the live list."""
    nodes = ray_session.nodes()
    assert all({"NodeID", "Alive", "Resources"} <= set(n) and "CPU" in n["Resources"] for n in nodes)
    job = parse_job(BASE)
    assert plan_resources(job, 1000) == plan_resources(job, 1000, nodes)
    alive = [n for n in nodes if n["Alive"]]
    assert plan_resources(job, 1000) == plan_resources(job, 1000, [node(n["NodeID"], n["Resources"]["CPU"])
                                                                   for n in alive])


def test_decode_stays_off_gpu_nodes_and_the_actor_pool_scales_to_the_gpus():
    lay = plan(CLUSTER)
    assert lay.gpus == 8 and (lay.actors, lay.max_actors) == (1, 8) and lay.gpus_per_actor == 1.0
    assert lay.decode_selector == {"ray.io/node-id": "!in(gpu1,gpu2)"}
    assert lay.decode_on == "CPU-only nodes (3 of 5)"
    assert lay.batch_size == 256 and lay.actor_cpus == 0.0
    assert decode_args(lay, parse_job(BASE).resources)["label_selector"] == lay.decode_selector
    assert model_args(lay, parse_job(BASE).resources) == {"num_gpus": 1.0}


def test_several_actors_share_a_gpu():
    lay = plan(CLUSTER, actors_per_gpu=2)
    assert (lay.actors, lay.max_actors, lay.gpus_per_actor) == (1, 16, 0.5)
    assert plan(CLUSTER, actors=3).actors == plan(CLUSTER, actors=3).max_actors == 3


def test_decode_runs_anywhere_when_asked_or_when_every_node_has_gpus():
    assert plan(CLUSTER, decode_on="any").decode_selector == {}
    assert plan([node("g1", 8, 1), node("g2", 8, 1)]).decode_selector == {}
    with pytest.raises(ConfigError, match="resources.decode_on"):
        plan([node("g1", 8, 1)], decode_on="cpu_nodes")


def test_a_cpu_model_ignores_the_gpus():
    lay = plan(CLUSTER, model={"device": "cpu"})
    assert lay.gpus == 0 and lay.gpus_per_actor == 0 and lay.max_actors == 1 and lay.decode_selector == {}
    assert model_args(lay, parse_job(BASE).resources) == {"num_cpus": 1.0}


def test_cuda_asks_for_a_gpu_before_the_autoscaler_has_brought_one():
    lay = plan([node("head", 4)], model={"device": "cuda"})
    assert lay.gpus == 0 and lay.gpus_per_actor == 1.0 and lay.max_actors == 1 and lay.batch_size == 256
    lay = plan([node("head", 4)], model={"device": "cuda"}, max_actors=8)  # the GPUs the autoscaler may add
    assert (lay.actors, lay.max_actors) == (1, 8)


def test_decode_cpus_and_memory_caps():
    res = {"max_decode_cpus": 16, "decode_cpus": 0.5, "task_memory": "2GiB", "actor_memory": "24GiB"}
    lay = plan(CLUSTER, planned=3200, **res)
    assert lay.decode_tasks == 32
    assert lay.rows_per_read_task == 100  # tasks for 2x the capped 16 CPUs, not for all 72 decode CPUs
    resources = parse_job({**BASE, "resources": res}).resources
    args = decode_args(lay, resources)
    assert args["compute"].size == 32 and args["memory"] == 2 * 2**30 and args["num_cpus"] == 0.5
    assert model_args(lay, resources)["memory"] == 24 * 2**30


def test_a_client_connection_whose_server_failed_to_start_is_tried_once_more(monkeypatch):
    """Ray Client's per-connection server can fail to start on a busy head; no Ray needed here."""
    import ray

    from pipeline.extract import runner

    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise ConnectionAbortedError("Initialization failure from server:\nStarting Ray client server failed.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    runner._connect_client("ray://head:10001", runtime_env={})
    assert calls == ["ray://head:10001"] * 2

    def refused(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionAbortedError("Initialization failure from server:\nversion mismatch")

    calls.clear()
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ConnectionAbortedError, match="version mismatch"):
        runner._connect_client("ray://head:10001", runtime_env={})
    assert len(calls) == 1  # any other refusal is the user's to see at once
