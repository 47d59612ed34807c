"""Processes by id: whether one is still the process it was (the lease's holder), and the Ray
processes that a driver killed with SIGKILL left behind.

Why those are left: ray.init starts Ray's head processes (GCS, raylet ...) so that they die with
the driver, and workers die with the raylet; but the raylet's agents (ray::DashboardAgent,
ray::RuntimeEnvAgent) outlive it. They notice that the raylet is gone, then try to tell the GCS,
which died too, and wait up to 60 s for it (Ray 2.x, ray/_private/process_watcher.py) or longer.

So the embedded Ray starts with a mark in its environment naming its driver (pid and start
time); every process Ray starts (head processes, agents, workers, and what those start) inherits
it. The next local start stops the marked processes whose driver is gone (stop_orphans). Only
those: only this user's processes are read, a Ray the user started with `ray start` carries no
mark, and a live run's driver is alive. Linux only (/proc); elsewhere nothing
is found and nothing is stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Dict, Iterator, List, Optional

MARK = "FEATURIZE_RAY_DRIVER"  # "<driver pid>:<its start time>"


def start_time(pid: int) -> Optional[str]:
    """The process's start time from /proc (Linux), None where unknown; a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] == "Z" else fields[19]


def alive(pid: Any, started: Any) -> bool:
    """Whether the process is running and is the one that started at `started` (not a reused pid)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or a record we cannot judge: assume alive
    now = start_time(int(pid))
    return now is None or started is None or now == started


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value for the block, then as it was (unset where it was unset)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def marked_environment():
    """This driver's mark in os.environ while Ray starts its processes, and only then: what the
    driver starts later on its own is no part of its Ray."""
    return environ(MARK, f"{os.getpid()}:{start_time(os.getpid())}")


def _mark(pid: int) -> Optional[str]:
    """The process's mark; None when it has none, is gone, or is another user's (root reads all)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{MARK}=".encode()
    return next((e[len(prefix):].decode(errors="replace") for e in entries if e.startswith(prefix)), None)


def _driver_gone(mark: str) -> bool:
    pid, _, started = mark.partition(":")
    return not alive(pid, None if started in ("", "None") else started)


def orphans() -> Dict[int, str]:
    """{pid: mark} of the processes whose mark names a driver that is gone."""
    found = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit() and int(name) != os.getpid():
            mark = _mark(int(name))
            if mark and _driver_gone(mark):
                found[int(name)] = mark
    return found


def stop_orphans(wait_s: float = 5.0) -> List[int]:
    """SIGKILL every orphan (see the module's docstring); returns their pids once they are gone."""
    stopped = [pid for pid in orphans() if _kill(pid)]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(start_time(pid) not in (None, "zombie") for pid in stopped):
        time.sleep(0.05)
    return stopped


def _kill(pid: int) -> bool:
    """SIGKILL `pid` if it is still an orphan. Through a pidfd where there is one: the mark is read
    again after the pidfd is open, and a pidfd never signals a later process that reuses the pid."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        mark = _mark(pid)
        if not mark or not _driver_gone(mark):
            return False
        if fd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:  # gone meanwhile
        return False
    finally:
        if fd is not None:
            os.close(fd)
