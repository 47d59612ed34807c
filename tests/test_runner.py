"""How the pipeline is laid onto the local Ray's 2 CPUs (the shared session from conftest)."""
import pytest

from pipeline.config import ConfigError, parse_job
from pipeline.runner import plan_resources

BASE = {"name": "t", "source": {"uri": "data/"}, "output": {"uri": "out/"}}


def layout(ray_session, planned=1000, **resources):
    return plan_resources(parse_job({**BASE, "resources": resources}), planned)


def test_cpu_defaults_use_every_core_and_leave_room_for_decode(ray_session):
    lay = layout(ray_session)
    assert lay.gpus == 0 and lay.actors == 1 and lay.batch_size == 32
    assert lay.torch_threads == 2  # Ray's default of one thread per actor would halve the model
    assert lay.actor_cpus + 0.5 <= 2  # at least one decode task always fits beside the actor


def test_several_cpu_actors_share_the_cores(ray_session):
    lay = layout(ray_session, actors=2)
    assert lay.torch_threads == 1
    assert 2 * lay.actor_cpus + 0.5 <= 2


def test_read_tasks_are_small_enough_to_spread_and_stream(ray_session):
    assert layout(ray_session, planned=100).rows_per_read_task == 25
    assert layout(ray_session, planned=10**6).rows_per_read_task == 256
    assert layout(ray_session, planned=10**6, read_block_size=64).rows_per_read_task == 64


def test_explicit_settings_win(ray_session):
    lay = layout(ray_session, batch_size=8, torch_threads=1, actors=1)
    assert (lay.batch_size, lay.torch_threads) == (8, 1)


def test_decode_tasks_larger_than_a_node_are_refused(ray_session):
    with pytest.raises(ConfigError, match="resources.decode_cpus"):
        layout(ray_session, decode_cpus=4.0)
