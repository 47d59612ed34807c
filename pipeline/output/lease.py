"""OUT's single writer: a lease in `OUT/_lease.json` that one run holds while it writes.

A run takes the lease before it touches OUT, with an exclusive create (local disk: a hard link,
which never replaces a file; object stores: a PUT with `If-None-Match: *`), renews its heartbeat
from a thread while it runs, and removes it at the end, also on failure or interrupt. Another run
into the same OUT refuses (exit 2), naming the holder and since when. A lease whose holder is
gone is taken over: its heartbeat is older than its expiry ($FEATURIZE_LEASE_EXPIRY_S, default
60 s), or it names a process of this host that no longer exists (a driver killed with SIGKILL),
so that a rerun on the same machine need not wait.

Taking over: two runs may see the same stale lease at once. Each exclusive-creates a token named
for that lease's exact bytes (`_lease.takeover/<hash>`); one wins and writes its own lease, the
other reads the new one and refuses. The committer checks before each commit that the lease still
names its run (Fence), so a run that lost its lease (its heartbeat stalled past the expiry and
another run took over) fails instead of publishing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from typing import Any, Dict, Optional, Tuple

from ..errors import LeaseHeld, OutputExists
from ..procs import alive, start_time
from ..redact import logger
from .store import is_local, write_atomic

LEASE_FILE, TAKEOVER = "_lease.json", "_lease.takeover"
EXPIRY_ENV, DEFAULT_EXPIRY_S = "FEATURIZE_LEASE_EXPIRY_S", 60.0
log = logger(__name__)  # credentials masked in every record
_HELD: set = set()  # run ids whose lease this process holds now


class LeaseLost(RuntimeError):
    """This run no longer holds the output root's lease: another run took it over."""


def expiry_s() -> float:
    text = os.environ.get(EXPIRY_ENV, "")
    try:
        value = float(text) if text else DEFAULT_EXPIRY_S
    except ValueError:
        raise OutputExists(f"{EXPIRY_ENV}={text!r}: not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):  # an infinite expiry would make a dead run's lease last forever
        raise OutputExists(f"{EXPIRY_ENV}={text!r}: must be a finite number of seconds, more than 0")
    return value


def read(fs, root: str) -> Tuple[bytes, Optional[Dict[str, Any]]]:
    """(the lease file's bytes, its record): (b"", None) when there is none; {} when unreadable."""
    try:
        raw = fs.cat_file(f"{root}/{LEASE_FILE}")
    except FileNotFoundError:
        return b"", None
    try:
        record = json.loads(raw)
    except ValueError:
        record = {}
    return raw, record if isinstance(record, dict) else {}


def describe(uri: str, held: Dict[str, Any]) -> str:
    return (f"output.uri {uri} is in use by run {held.get('run_id')} (pid {held.get('pid')} on "
            f"{held.get('host')}) since {_iso(held.get('started', 0))}, last heartbeat {_ago(held)}; "
            f"wait for it to end (its lease is taken over once its heartbeat is older than "
            f"{held.get('expiry_s')} s or its process is gone)")


def _ago(held: Dict[str, Any]) -> str:
    """The heartbeat's age in words, never negative (another host's clock may run ahead of ours)."""
    try:
        age = time.time() - float(held.get("heartbeat"))
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(age):
        return "unknown"
    return f"{age:.0f} s ago" if age >= 0 else f"{-age:.0f} s ahead of this host's clock"


def stale(held: Dict[str, Any]) -> Optional[str]:
    """Why a lease's holder is gone, or None while it is alive."""
    age, expiry, why = _heartbeat(held)
    if why:
        return why
    if age > expiry:
        return f"its heartbeat is {age:.0f} s old (expiry {expiry:g} s)"
    if -age > expiry:  # a live holder renews it to its own clock's now: this one cannot be
        return f"its heartbeat lies {-age:.0f} s in the future (more than the expiry {expiry:g} s)"
    if held.get("host") != socket.gethostname():
        return None
    if not alive(held.get("pid"), held.get("pid_start")):
        return f"its process {held.get('pid')} on this host is gone"
    if held.get("pid") == os.getpid() and held.get("run_id") not in _HELD:
        return "an earlier run of this process that has ended (its release failed)"
    return None


def _heartbeat(held: Dict[str, Any]) -> Tuple[float, float, Optional[str]]:
    """(the heartbeat's age, the expiry, None), or a reason to take the lease over when the record
    cannot be judged: a heartbeat that is not a finite number never ages, so it would hold OUT forever."""
    try:
        heartbeat = float(held["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return 0.0, 0.0, "the lease file is unreadable (no heartbeat time)"
    if not math.isfinite(heartbeat):
        return 0.0, 0.0, f"its heartbeat {held['heartbeat']!r} is not a finite time"
    try:
        expiry = float(held.get("expiry_s"))
    except (TypeError, ValueError):
        expiry = math.nan
    if not (math.isfinite(expiry) and expiry > 0):  # its own expiry cannot be trusted: this host's
        expiry = expiry_s()
    return time.time() - heartbeat, expiry, None


class Lease:
    """This run's hold on OUT: acquire(), start_heartbeat(), release()."""

    def __init__(self, fs, root: str, uri: str, run_id: str, expiry: Optional[float] = None):
        self.fs, self.root, self.uri, self.run_id = fs, root.rstrip("/"), uri, run_id
        now = time.time()
        self.record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": start_time(os.getpid()), "started": now, "heartbeat": now,
                       "expiry_s": expiry or expiry_s()}
        self.lost: Optional[str] = None  # why the heartbeat found the lease gone
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._made_root = False  # a local OUT that the lease's folder created

    @property
    def path(self) -> str:
        return f"{self.root}/{LEASE_FILE}"

    def acquire(self, tries: int = 5) -> "Lease":
        _HELD.add(self.run_id)  # before the lease can be seen: this process's other runs read it as live
        try:
            return self._acquire(tries)
        except BaseException:
            _HELD.discard(self.run_id)
            raise

    def _acquire(self, tries: int) -> "Lease":
        self._made_root = is_local(self.fs) and not os.path.exists(self.root)
        for _ in range(tries):
            try:
                write_atomic(self.fs, self.path, self._bytes(), exclusive=True)
                return self
            except FileExistsError:
                pass
            raw, held = read(self.fs, self.root)
            if held is None:  # released in the meantime
                continue
            if held.get("run_id") == self.run_id:  # our own PUT, retried by the client after a lost reply
                return self
            reason = stale(held)
            if reason is None:
                raise LeaseHeld(describe(self.uri, held))
            if self._take_over(raw):
                log.warning("%s: took over the lease of run %s: %s", self.uri, held.get("run_id"), reason)
                return self
        raise LeaseHeld(f"output.uri {self.uri}: other runs keep taking its lease; try again later")

    def _take_over(self, raw: bytes) -> bool:
        """One run wins the token for this stale lease's exact bytes; it alone replaces the lease."""
        token = f"{self.root}/{TAKEOVER}/{hashlib.sha256(raw).hexdigest()[:32]}"
        try:
            write_atomic(self.fs, token, self._bytes(), exclusive=True)
        except FileExistsError:
            if json.loads(self.fs.cat_file(token)).get("run_id") != self.run_id:  # not our own retried PUT
                return False
        if read(self.fs, self.root)[0] != raw:  # released or replaced since we read it: start over
            return False
        write_atomic(self.fs, self.path, self._bytes())
        return True

    def check(self) -> None:
        Fence(self.fs, self.root, self.run_id)()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="featurize-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.record["expiry_s"] / 4):
            try:
                held = read(self.fs, self.root)[1]
                if not held or held.get("run_id") != self.run_id:
                    self.lost = f"run {held.get('run_id') if held else None} holds it now"
                    log.error("%s: this run lost the output's lease (%s)", self.uri, self.lost)
                    return
                self.record["heartbeat"] = time.time()
                write_atomic(self.fs, self.path, self._bytes())
            except Exception as e:  # a store hiccup: the next beat tries again
                log.warning("%s: could not renew the lease: %s", self.uri, e)

    def release(self) -> None:
        _HELD.discard(self.run_id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            held = read(self.fs, self.root)[1]
            if held and held.get("run_id") == self.run_id:
                self.fs.rm(self.path)
                # takeover tokens can go: a late contender re-reads the lease after winning one
                if self.fs.exists(f"{self.root}/{TAKEOVER}"):
                    self.fs.rm(f"{self.root}/{TAKEOVER}", recursive=True)
                if self._made_root and not os.listdir(self.root):  # a run refused before it wrote: leave no trace
                    os.rmdir(self.root)
        except Exception as e:  # the run's own outcome matters more; a stale lease is taken over
            log.warning("%s: could not release the lease: %s", self.uri, e)

    def _bytes(self) -> bytes:
        return json.dumps(self.record, sort_keys=True).encode()


class Fence:
    """Raises LeaseLost unless OUT's lease names this run: one small read, before a commit.

    A read that finds the lease ours with a fresh heartbeat (younger than half the expiry) stands
    for the next `expiry / 8` seconds: no other run may take the lease over before our heartbeat
    is older than the whole expiry, so for that long the answer cannot change, with a margin of
    three eighths of the expiry for clocks and slow requests. With a committer publishing tens of
    files a second this is a few reads a minute instead of one a file. (A lease taken over because
    the driver's process is gone, on its own host, needs no margin: the run's actors die with it.)"""

    def __init__(self, fs, root: str, run_id: str, clock=time.monotonic):
        self.fs, self.root, self.run_id, self.clock = fs, root.rstrip("/"), run_id, clock
        self.valid_until = -math.inf
        self.reads = 0
        self.lock = threading.Lock()  # the committer's threads: one reads, the others wait for its answer

    def __call__(self) -> None:
        if self.clock() < self.valid_until:
            return
        with self.lock:
            if self.clock() >= self.valid_until:
                self._read()

    def _read(self) -> None:
        started = self.clock()
        held = read(self.fs, self.root)[1]
        self.reads += 1
        if not held or held.get("run_id") != self.run_id:
            self.valid_until = -math.inf
            holder = f"run {held.get('run_id')}" if held else "no run"
            raise LeaseLost(f"{self.root}: this run ({self.run_id}) no longer holds the output's lease "
                            f"({holder} does); it stops without publishing")
        age, expiry, why = _heartbeat(held)
        if why is None and abs(age) < expiry / 2:
            self.valid_until = started + expiry / 8


def _iso(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError):
        return "?"
