"""Run a decoder in a child process with a time limit, so one poisoned file cannot hang or kill
the task that holds many good ones.

One long-lived child per decode task (a spawned process: forking a multi-threaded Ray worker is
unsafe) takes one job at a time over a pipe. A job that outlives its limit kills the child; a
child that dies takes only its current job with it. Either way the next job gets a fresh child.
A child's start (a Python interpreter importing the decoders, seconds on a busy node) is not
charged to any file: the child says it is ready before the first job's clock starts.
Python's ProcessPoolExecutor cannot kill a hung worker, hence this small hand-written pool of one.

`stream` runs a generator in the child one item per request, so neither process holds more than
an item or two of a long stream (a video's windows); the time limit is the whole stream's.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Callable, Iterator, Optional

from ..errors import DecodeFailure


class DecodeTimeout(DecodeFailure):
    """The decoder ran past its time limit on this file."""

    error_type = "timeout"


class DecoderCrashed(DecodeFailure):
    """The decoder's process died on this file (a segfault, an abort, out of memory)."""

    error_type = "crash"


class DecoderUnavailable(RuntimeError):
    """The decoder's process could not start: the node's fault, not a file's, so the task fails."""


class ChildError(DecodeFailure):
    """The decoder raised in the child; `error_type` is its exception's class name."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message, error_type)


def _serve(conn, target: Callable[..., Any], prepare: Optional[Callable[[], Any]]) -> None:
    if prepare is not None:  # `target`'s module was imported while the child unpickled it
        prepare()
    conn.send(("ready", None))
    items: Iterator[Any] = iter(())
    while True:
        try:
            kind, args = conn.recv()
        except EOFError:
            return
        try:
            if kind == "call":
                conn.send(("ok", target(*args)))
                continue
            if kind == "stream":  # a new stream replaces one its consumer left
                items = iter(target(*args))
            conn.send(("ok", next(items)))
        except StopIteration:
            conn.send(("end", None))
        except Exception as e:  # the decoder's own error, by name (exceptions may not pickle)
            items = iter(())
            conn.send(("error", (type(e).__name__, str(e))))


class IsolatedCall:
    """`call(*args)` runs `target(*args)` in the child; `target` must be importable by name, as
    must `prepare`, which a new child runs before its first job (to import what `target` imports
    lazily, for example)."""

    def __init__(self, target: Callable[..., Any], timeout_s: float, start_timeout_s: float = 120.0,
                 prepare: Optional[Callable[[], Any]] = None):
        self.target = target
        self.prepare = prepare
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._proc: Optional[mp.process.BaseProcess] = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self.target, self.prepare), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            ready = parent.poll(self.start_timeout_s) and parent.recv()[0] == "ready"
        except (EOFError, ConnectionResetError):
            ready = False
        if not ready:
            self._proc.join(timeout=1)
            code = self._proc.exitcode
            self.close()
            why = (f"did not start within {self.start_timeout_s:g} s" if code is None
                   else f"died while starting (exit code {code})")
            raise DecoderUnavailable(f"the decoder process {why}")

    def call(self, *args: Any) -> Any:
        return self._ask(("call", args), self.timeout_s)[1]

    def stream(self, *args: Any) -> Iterator[Any]:
        """The items of `target(*args)` (an iterable), each made in the child when asked for: the
        child works only between a request and its answer, so the time the parent waits is the
        child's time, and the limit (`timeout_s`) holds for the whole stream."""
        left, message = self.timeout_s, ("stream", args)
        while True:
            t = time.monotonic()
            status, value = self._ask(message, left)
            if status == "end":
                return
            left -= time.monotonic() - t
            message = ("next", None)
            yield value

    def _ask(self, message: tuple, timeout_s: float) -> tuple:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send(message)
            if not self._conn.poll(max(0.0, timeout_s)):
                self.close()
                raise DecodeTimeout(f"no result within {self.timeout_s:g} s")
            status, value = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self._proc.exitcode if self._proc else None
            self.close()
            raise DecoderCrashed(f"the decoder process died (exit code {code})") from None
        if status == "error":
            raise ChildError(*value)
        return status, value

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def __enter__(self) -> "IsolatedCall":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
