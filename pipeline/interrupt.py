"""SIGTERM (what schedulers and kubectl send) stops a `featurize` command the way Ctrl-C does.

The CLI turns SIGTERM into KeyboardInterrupt, so the job records itself as failed in _job.json,
stops its actors, and the process exits 130 with the usual one line; Ray's atexit hooks then stop
the local Ray it started. ray.init installs its own SIGTERM handlers (sys.exit, or for a node it
started: kill its processes under the still-connected driver, which aborts with a C++ stack dump),
so the runner takes SIGTERM back right after each ray.init.
"""
from __future__ import annotations

import signal
import threading

_wanted = False  # only the CLI asks; a library caller keeps whatever handler it has
_received = False


def sigterm_as_interrupt() -> None:
    """Called by the CLI before anything starts: from now on SIGTERM is an interrupt."""
    global _wanted
    _wanted = True
    reclaim_sigterm()


def reclaim_sigterm() -> None:
    """Put our handler back after a library (ray.init) replaced it; a no-op unless the CLI asked."""
    if _wanted and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _received
    if _received:  # already stopping: a second SIGTERM must not break the cleanup
        return
    _received = True
    raise KeyboardInterrupt("SIGTERM")
