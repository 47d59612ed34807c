"""Failpoints for the fault-injection tests, in the manner of etcd's gofail or TiKV's fail-rs.

A stage calls `point(name, key)` where a fault can strike. A test arms a point by writing
`<name>.json` into the folder that FEATURIZE_FAULTS names, for example
`{"action": "exit", "after": 3}`: the process that reaches the point for the third time exits.
Actions: exit, crash (SIGSEGV), hang, sleep (`seconds`), raise, and record (append the key to
`<name>.log`, so a test can count what a stage processed).
A point fires once (the file is claimed by an atomic rename, so one process wins) unless the
spec says `"once": false`; `"match"` limits it to keys (sample URIs) containing that text. The
file may hold a list of specs: the first that matches applies. `after` counts the hits in one
process since the point was armed: arming it again (a new file) starts the count afresh, also
in the long-lived processes (a test session's driver, Ray's pooled workers) that saw an earlier one.
With `"across": true` it counts the hits of every process instead (which of Ray's pooled workers
runs a task, and so how many hits one process sees, is Ray's choice).
With the variable unset, the normal case, a point costs one environment lookup.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from typing import Callable, Union

ENV = "FEATURIZE_FAULTS"
_hits: Counter = Counter()


class InjectedFault(RuntimeError):
    """Raised by a point armed with `"action": "raise"`."""


def point(name: str, key: Union[str, Callable[[], str]] = "") -> None:
    """`key` may be a function, called only when the point is armed (it costs nothing otherwise)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = os.path.join(folder, f"{name}.json")
    try:
        with open(path) as f:
            specs = json.load(f)
            armed = os.fstat(f.fileno())
    except (FileNotFoundError, ValueError):  # not armed, or being written
        return
    arming = (name, armed.st_ino, armed.st_mtime_ns)
    if callable(key):
        key = key()
    for spec in specs if isinstance(specs, list) else [specs]:  # a list: the first that matches
        if spec.get("match") and spec["match"] not in key:
            continue
        hits = _count_across(path, armed) if spec.get("across") else _count_here(arming)
        if hits < spec.get("after", 1):
            return
        if spec.get("once", True):
            try:
                os.rename(path, f"{path}.fired")
            except FileNotFoundError:  # another process fired it first
                return
        _act(name, spec, path, key)
        return


def _count_here(arming: tuple) -> int:
    _hits[arming] += 1
    return _hits[arming]


def _count_across(path: str, armed: os.stat_result) -> int:
    """One byte appended a hit (O_APPEND: no hit lost between processes); the file's size counts them."""
    fd = os.open(f"{path}.{armed.st_ino}-{armed.st_mtime_ns}.hits", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _act(name: str, spec: dict, path: str, key: str) -> None:
    action = spec["action"]
    if action == "record":
        with open(path[: -len(".json")] + ".log", "a") as f:
            f.write(key + "\n")
        return
    if action == "exit":
        os._exit(13)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "hang":
        time.sleep(10**6)
    if action == "sleep":
        time.sleep(float(spec.get("seconds", 1.0)))
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at {name}")
    raise ValueError(f"unknown fault action {action!r}")
