"""What a run shows on the console besides its own lines: Ray's chatter kept off it.

Ray still writes every record to its session's log files (`ray_log_dir`, which the summary
names); only the console handlers of the `ray` and `ray.data` loggers are filtered, and only
for lines that say nothing a user of this tool can act on. `--verbose` removes the filter.
"""
from __future__ import annotations

import logging
from typing import Optional

# Substrings of the lines kept off the console, each with why it says nothing here.
NOISE = (
    # the embedded Ray turns token authentication on by default, as it should; nobody opted out
    "Token authentication is enabled for this Ray cluster",
    # Ray Data's progress bars are replaced by the job's own progress line (progress.py)
    "Progress bars disabled. To enable",
    "Progress bars for operators disabled",
    "Progress will be logged because stdout is a non-interactive terminal",
    "A new progress UI is available",
)


class RayNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format itself is not ours to hide
            return True
        return not any(n in message for n in NOISE)


_FILTER = RayNoise()

# Messages the raylet publishes to the driver, which Ray prints to *stdout* with print() (the
# driver's error listener, ray._private.worker.listen_error_messages), so no logging filter sees
# them and they land among the summary's lines. Only these are dropped; a worker killed for
# memory, a dead actor and the like still print.
RAYLET_NOISE = (
    # a job's first actors and tasks start several workers at once on a small machine; Ray
    # says so at warning level, and nothing is wrong (the line stays in the raylet's log)
    "worker processes have been started on node",
)


def quiet_ray(quiet: bool = True) -> None:
    """Filter (or with quiet=False, stop filtering) Ray's console handlers. Idempotent."""
    import ray.data  # noqa: F401 - configures the `ray.data` logger's handlers

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue  # a file keeps every line
            if quiet:
                handler.addFilter(_FILTER)
            else:
                handler.removeFilter(_FILTER)
    _filter_raylet_messages(quiet)


def _filter_raylet_messages(quiet: bool) -> None:
    """Wraps Ray's printer of raylet messages (no public hook exists) to drop RAYLET_NOISE."""
    from ray._private import worker

    original = getattr(worker.print_to_stdstream, "featurize_original", worker.print_to_stdstream)
    if not quiet:
        worker.print_to_stdstream = original
        return

    def printer(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAYLET_NOISE)]
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    printer.featurize_original = original
    worker.print_to_stdstream = printer


def ray_log_dir() -> Optional[str]:
    """The folder of this process's Ray session logs (the driver's node), if Ray runs here."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API names the session folder
        return node.get_logs_dir_path() if node is not None else None
    except Exception:
        return None


# Lines Ray's C++ core worker writes straight to file descriptor 2, which no logging filter sees.
NATIVE_NOISE = (
    # Ray Data passes its actor pools' arguments (the data context, the map function) as object
    # refs and restarts their actors; the core worker says so at error level, for every job
    # (ray-project/ray#53727). Nothing for a user to do; the line stays in Ray's core driver log.
    b"has constructor arguments in the object store and max_restarts > 0",
)


class NativeStderr:
    """Keeps the NATIVE_NOISE lines off the console; a context manager, for the CLI and for the API's
    calls that start Ray (a notebook's kernel shows what reaches descriptor 2 as the cell's stderr).

    Descriptor 2, where native code writes, becomes a pipe whose lines a thread passes on to what
    descriptor 2 was, less the noise. Python's own stderr (tracebacks, the progress line, Ray's Python
    loggers) is untouched: where it writes to descriptor 2 (a terminal, a file) it moves to a copy of
    the console's descriptor; elsewhere (a notebook's stream, a test capturing it) it stays as it is."""

    def __init__(self, noise=NATIVE_NOISE):
        self.noise = noise
        self.saved: Optional[int] = None
        self.old_stderr = None

    def __enter__(self) -> "NativeStderr":
        import io
        import os
        import sys
        import threading

        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, ValueError, io.UnsupportedOperation):
            on_fd2 = False
        try:
            if on_fd2:
                sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, ValueError):  # no descriptor 2 (a closed console)
            return self
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        if on_fd2:
            self.old_stderr = sys.stderr
            sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(self.saved), "wb", buffering=0),
                                          encoding=sys.stderr.encoding, errors="backslashreplace",
                                          line_buffering=True, write_through=True)
        # the pump has a descriptor of its own: it outlives the context while a child started in it
        # (Ray's processes) holds the pipe, and each call of the API's must leave no descriptor behind
        self.thread = threading.Thread(target=self._pump, args=(read, os.dup(self.saved)), name="featurize-stderr",
                                       daemon=True)
        self.thread.start()
        return self

    def _pump(self, read: int, out: int) -> None:
        import os

        pending = b""
        while True:
            try:
                chunk = os.read(read, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not any(n in line for n in self.noise))
            if kept:
                os.write(out, kept)
        if pending:
            os.write(out, pending)
        os.close(read)
        os.close(out)

    def __exit__(self, *exc) -> None:
        import os
        import sys

        if self.saved is None:
            return
        ours = None
        if self.old_stderr is not None:
            sys.stderr.flush()
            try:
                self.old_stderr.flush()
            except Exception:
                pass
            ours, sys.stderr = sys.stderr, self.old_stderr
        os.dup2(self.saved, 2)  # the pipe's last writer gone (unless a child holds it): the pump ends
        os.close(self.saved)
        self.saved = None
        self.thread.join(timeout=1)
        if ours is not None:
            ours.close()
