"""A driver killed with SIGKILL leaves Ray processes running (its raylet's agents wait up to 60 s
for the GCS that died with it); the next local start stops them, and only them (issue 23, item 6)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from pipeline.jobrun import init_ray
from pipeline.procs import MARK, start_time, stop_orphans

ROOT = Path(__file__).resolve().parent.parent
# A driver that starts the embedded local Ray as `featurize run` and `featurize train` do, runs two
# tasks (workers of its own), says so, and waits to be killed.
DRIVER = """
import time, ray
from pipeline.jobrun import init_ray
init_ray(None)
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])
print("UP", flush=True)
time.sleep(600)
"""


def marked_by(driver_pid: int):
    """The running (not zombie) processes whose environment names `driver_pid` as their driver."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"{MARK}={driver_pid}:".encode()) for e in env) and \
                start_time(int(name)) not in (None, "zombie"):
            found.append(int(name))
    return found


@pytest.mark.cluster  # a Ray of its own, killed with its driver
@pytest.mark.timeout(180)  # one Ray start in a subprocess: 10-30 s on a busy machine
def test_the_next_local_start_stops_what_a_killed_driver_left(monkeypatch):
    tmpdir = tempfile.mkdtemp(prefix="ftray-", dir="/tmp")  # short: Ray's socket paths must stay under 107
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmpdir}  # its own Ray
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert killed.stdout.readline().strip() == "UP"
        assert len(marked_by(killed.pid)) >= 4  # GCS, raylet, its agents, workers ...: all carry the mark
        killed.kill()
        killed.wait()
        # The next run's start, here without starting a Ray of its own (the session's is this process's)
        started = []
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kw: started.append(os.environ.get(MARK)))
        init_ray(None)
        assert marked_by(killed.pid) == []  # without the stop: the two agents, for a minute or more
        assert started == [f"{os.getpid()}:{start_time(os.getpid())}"] and MARK not in os.environ
    finally:
        for pid in marked_by(killed.pid):  # whatever the test's failure left
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmpdir, ignore_errors=True)


def sleeper(mark=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != MARK}
    if mark is not None:
        env[MARK] = mark
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_processes_of_a_dead_driver_are_stopped():
    """A dead driver's processes go, and one whose pid now belongs to another process (its start time
    differs); a live driver's, an unmarked process and an unreadable mark stay."""
    me = f"{os.getpid()}:{start_time(os.getpid())}"
    orphans = [sleeper(f"{dead_pid()}:123"), sleeper(f"{os.getpid()}:0")]
    kept = [sleeper(me), sleeper(), sleeper("not-a-pid")]
    try:
        stopped = stop_orphans()
        assert {p.pid for p in orphans} <= set(stopped)
        assert not {p.pid for p in kept} & set(stopped)
        assert [p.wait(timeout=10) for p in orphans] == [-signal.SIGKILL] * 2
        assert [p.poll() for p in kept] == [None] * 3
    finally:
        for p in orphans + kept:
            p.kill()
            p.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="starting another user's process needs root")
def test_another_users_process_is_never_stopped():
    """Root reads every process's environment: a dead driver's mark on another user's process is
    still not ours to stop."""
    env = {**os.environ, MARK: f"{dead_pid()}:123"}
    other = subprocess.Popen(["sleep", "60"], env=env, user=65534)
    try:
        assert other.pid not in stop_orphans()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
