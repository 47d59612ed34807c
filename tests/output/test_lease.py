"""OUT's lease without Ray: one writer at a time, refusals that name the holder, safe takeover."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import LeaseHeld, OutputExists
from pipeline.output.lease import LEASE_FILE, Fence, Lease, LeaseLost, read
from pipeline.output.store import write_atomic

from conftest import S3_BUCKET

FS = LocalFileSystem()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(fs, root, **fields):
    """A lease some other run left: alive on another host unless told otherwise."""
    now = time.time()
    record = {"run_id": "other-run", "host": "elsewhere", "pid": 1, "pid_start": None, "started": now - 30,
              "heartbeat": now, "expiry_s": 60.0, **fields}
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(record).encode())


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return FS, str(tmp_path / "out")
    fs, _ = request.getfixturevalue("s3")
    return fs, f"{S3_BUCKET}/out"


def test_a_live_lease_refuses_a_second_run_naming_its_holder(store):
    fs, root = store
    first = Lease(fs, root, "OUT", "run-one").acquire()
    with pytest.raises(LeaseHeld, match=r"in use by run run-one \(pid \d+ on .+\) since \d{4}-") as e:
        Lease(fs, root, "OUT", "run-two").acquire()
    assert isinstance(e.value, OutputExists)  # the CLI's exit 2
    first.release()
    assert read(fs, root)[1] is None
    Lease(fs, root, "OUT", "run-two").acquire().release()  # free again once released


@pytest.mark.parametrize("why", ["dead pid", "expired heartbeat"])
def test_a_lease_whose_holder_is_gone_is_taken_over(store, why):
    fs, root = store
    if why == "dead pid":  # a driver killed with SIGKILL on this host: no need to wait for the expiry
        plant(fs, root, host=socket.gethostname(), pid=dead_pid())
    else:  # another host that stopped renewing it
        plant(fs, root, heartbeat=time.time() - 120)
    lease = Lease(fs, root, "OUT", "mine").acquire()
    assert read(fs, root)[1]["run_id"] == "mine"
    lease.check()
    lease.release()


@pytest.mark.parametrize("heartbeat,why", [
    (time.time() + 315360000, r"heartbeat lies \d+ s in the future"),  # ten years ahead
    (float("inf"), "heartbeat inf is not a finite time"),
    (float("nan"), "heartbeat nan is not a finite time"),
    ("yesterday", "no heartbeat time"),
    (None, "no heartbeat time"),
], ids=["future", "inf", "nan", "text", "null"])
def test_a_lease_whose_heartbeat_cannot_age_is_taken_over(tmp_path, caplog, heartbeat, why):
    """A heartbeat in the future, infinite or unreadable never grows older than the expiry: such a
    lease would hold OUT forever, so it counts as stale, and the takeover says why."""
    root = str(tmp_path)
    plant(FS, root, heartbeat=heartbeat)  # another host's, so only the heartbeat can free it
    lease = Lease(FS, root, "OUT", "mine").acquire()
    assert read(FS, root)[1]["run_id"] == "mine"
    assert re.search(f"took over the lease of run other-run: .*{why}", caplog.text)
    lease.release()


@pytest.mark.parametrize("expiry", [float("inf"), float("nan"), -5, "never"])
def test_a_lease_with_a_bad_expiry_ages_by_this_hosts_expiry(tmp_path, expiry):
    root = str(tmp_path)
    plant(FS, root, heartbeat=time.time() - 120, expiry_s=expiry)  # older than the default 60 s
    Lease(FS, root, "OUT", "mine").acquire().release()
    plant(FS, root, heartbeat=time.time() - 5, expiry_s=expiry)  # a live one stays held
    with pytest.raises(LeaseHeld, match="other-run"):
        Lease(FS, root, "OUT", "mine").acquire()


def test_the_refusal_never_shows_a_negative_age(tmp_path):
    """Another host's clock 20 s ahead: within the expiry, so held; said without a negative age."""
    root = str(tmp_path)
    plant(FS, root, heartbeat=time.time() + 20)
    with pytest.raises(LeaseHeld) as e:
        Lease(FS, root, "OUT", "mine").acquire()
    assert re.search(r"last heartbeat \d+ s ahead of this host's clock", str(e.value))
    assert not re.search(r"-\d+ s", str(e.value))


def test_a_live_lease_on_another_host_is_not_taken_over(tmp_path):
    root = str(tmp_path)
    plant(FS, root, pid=dead_pid())  # that pid means nothing on another host
    with pytest.raises(LeaseHeld, match="other-run"):
        Lease(FS, root, "OUT", "mine").acquire()


@pytest.mark.parametrize("stale", [False, True])
def test_of_runs_acquiring_at_once_exactly_one_wins(store, stale):
    fs, root = store
    if stale:  # all of them see the same stale lease and try to take it over
        plant(fs, root, host=socket.gethostname(), pid=dead_pid())
    winners, refused, start = [], [], threading.Barrier(6)

    def contend(i):
        start.wait()
        try:
            winners.append(Lease(fs, root, "OUT", f"run-{i}").acquire())
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 5
    assert read(fs, root)[1]["run_id"] == winners[0].run_id


def test_the_heartbeat_renews_and_a_run_that_lost_its_lease_is_fenced(tmp_path, monkeypatch):
    root = str(tmp_path)
    monkeypatch.setenv("FEATURIZE_LEASE_EXPIRY_S", "0.4")
    lease = Lease(FS, root, "OUT", "slow-run").acquire()
    first = read(FS, root)[1]["heartbeat"]
    lease.start_heartbeat()
    time.sleep(0.5)
    assert read(FS, root)[1]["heartbeat"] > first
    lease._stop.set()  # its driver stalls: the heartbeat stops, the lease expires
    lease._thread.join()
    time.sleep(0.5)
    other = Lease(FS, root, "OUT", "new-run").acquire()
    with pytest.raises(LeaseLost, match="new-run"):
        Fence(FS, root, "slow-run")()
    lease.release()  # does not remove the new holder's lease
    assert read(FS, root)[1]["run_id"] == "new-run"
    other.release()


def test_a_bad_expiry_setting_is_refused(tmp_path, monkeypatch):
    for value in ("soon", "inf", "nan", "0"):
        monkeypatch.setenv("FEATURIZE_LEASE_EXPIRY_S", value)
        with pytest.raises(OutputExists, match="FEATURIZE_LEASE_EXPIRY_S"):
            Lease(FS, str(tmp_path), "OUT", "r")


def test_a_lease_this_process_failed_to_release_does_not_block_its_next_run(tmp_path, monkeypatch):
    """A run that failed in a store outage could not remove its lease; the same process (a
    notebook, a test session) runs again once the store is back."""
    root = str(tmp_path)
    first = Lease(FS, root, "OUT", "failed-run").acquire()
    with monkeypatch.context() as m:
        m.setattr(FS, "rm", lambda *a, **k: (_ for _ in ()).throw(OSError("store down")))
        first.release()  # logs, does not raise
    assert read(FS, root)[1]["run_id"] == "failed-run"
    Lease(FS, root, "OUT", "next-run").acquire().release()


def test_a_run_refused_before_writing_leaves_no_output_folder(tmp_path):
    out = tmp_path / "out"
    Lease(FS, str(out), "OUT", "refused-later").acquire().release()
    assert not out.exists()  # it made the folder for the lease alone
    out.mkdir()
    Lease(FS, str(out), "OUT", "r2").acquire().release()
    assert out.exists()  # a folder the user made stays


def test_the_fence_reads_the_lease_once_a_window_and_still_catches_a_takeover(tmp_path, monkeypatch):
    """A fresh confirmation stands for expiry / 8 seconds; after that the fence reads again and a run
    that lost its lease stops."""
    root = str(tmp_path)
    monkeypatch.setenv("FEATURIZE_LEASE_EXPIRY_S", "80")
    lease = Lease(FS, root, "OUT", "run-a").acquire()
    now = [100.0]
    fence = Fence(FS, root, "run-a", clock=lambda: now[0])
    for _ in range(50):
        fence()
        now[0] += 0.1
    assert fence.reads == 1  # 5 s: inside the 10 s window
    record = read(FS, root)[1]
    write_atomic(FS, f"{root}/_lease.json", json.dumps({**record, "run_id": "run-b"}).encode())  # taken over
    now[0] += 5.1
    with pytest.raises(LeaseLost, match="run-b"):
        fence()
    assert fence.reads == 2
    with pytest.raises(LeaseLost):  # and every call after it
        fence()
    lease.release()


def test_a_stale_heartbeat_is_never_trusted_for_a_window(tmp_path, monkeypatch):
    """A lease whose heartbeat is already half the expiry old could be taken over soon: read each time."""
    root = str(tmp_path)
    monkeypatch.setenv("FEATURIZE_LEASE_EXPIRY_S", "80")
    lease = Lease(FS, root, "OUT", "run-a").acquire()
    record = read(FS, root)[1]
    write_atomic(FS, f"{root}/_lease.json", json.dumps({**record, "heartbeat": time.time() - 50}).encode())
    fence = Fence(FS, root, "run-a")
    fence()
    fence()
    assert fence.reads == 2
    lease.release()
