"""The live progress of a run, built from what its committer knows (output/ledger.py: Tally).

A driver thread asks the committer for its tally about once a second. In a terminal (or a
notebook) one line is redrawn in place by tqdm; elsewhere (a pipe, CI, a Ray Jobs log, `featurize
submit --wait`) a plain line is printed every FEATURIZE_PROGRESS_INTERVAL seconds (10 by
default). Both go to stderr: stdout holds the summary only.

    featurize  45%|████▌     | 68/150 samples, 2 errors, bound: model [0:07<0:09, 9.10 samples/s]
    progress     68/150 samples (45%), 2 errors, 9.1 samples/s, ETA 0:09, bound: model

Counts are of plan rows (an image, a video, a tar shard) with the rows they yield beside them
when those differ (a shard's members, a video's clips); a resumed run starts from what earlier
runs had committed. The bound is the stage whose workers were busiest so far (timing.py), from
the busy seconds of the rows committed: cheap, since the rows carry them to the committer.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, TextIO

from .redact import logger, redact_text
from .timing import breakdown

INTERVAL_ENV = "FEATURIZE_PROGRESS_INTERVAL"
log = logger(__name__)


@dataclass
class Counts:
    """What a progress line says."""

    done: int  # plan rows done, earlier runs' included
    planned: int
    before: int  # plan rows earlier runs had done
    rows: int  # rows this run committed (features and errors)
    errors: int
    elapsed: float  # seconds since this run's execution began
    bound: Optional[str] = None
    recent: Optional[float] = None  # plan rows per second over the last WINDOW_S (Rate)

    @property
    def rate(self) -> float:
        """Plan rows per second, this run's only: the recent rate, else the run's average."""
        if self.recent is not None:
            return self.recent
        return (self.done - self.before) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> Optional[float]:
        return (self.planned - self.done) / self.rate if self.rate > 0 else None


WINDOW_S = 60.0


class Rate:
    """Plan rows per second over the last WINDOW_S seconds, or since execution began while the run
    is younger than that. Rows are committed a file at a time, so a rate between two polls jumps
    from nothing to a file's rows in a second, and tqdm's smoothed rate read 38.7 samples/s right
    after a first commit, then 0.8. A window this long spans many commits once the pipeline is
    full, and keeps the start-up in the first commit's rate, as the run's own average does."""

    def __init__(self, started: float, done: int, window: float = WINDOW_S):
        self.window = window
        self.points = collections.deque([(started, done)])

    def add(self, t: float, done: int) -> float:
        self.points.append((t, done))
        while len(self.points) > 2 and self.points[1][0] <= t - self.window:  # keep one point at or before the window
            self.points.popleft()
        t0, done0 = self.points[0]
        return (done - done0) / (t - t0) if t > t0 else 0.0


@dataclass
class Nouns:
    """What a plan row and a committed row are called: samples; videos and clips; shards and samples."""

    unit: str = "samples"
    row: Optional[str] = None  # None: one row per plan row, so the row count says nothing more


def nouns_of(job) -> Nouns:
    """A job's nouns: its plan rows are tar shards, videos or samples."""
    video = job.is_video
    windowed = video and bool(job.video.window_s)
    if job.source.format == "webdataset":
        return Nouns("shards", "clips" if windowed else "samples")
    if video:
        return Nouns("videos", "clips" if windowed else None)
    return Nouns("samples")


def interval() -> float:
    """Seconds between plain lines: FEATURIZE_PROGRESS_INTERVAL, else 10."""
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, "10")))
    except ValueError:
        return 10.0


def clock(seconds: Optional[float]) -> str:
    """0:09, 12:04, 3:02:45; "?" when not known."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def details(c: Counts, nouns: Nouns) -> str:
    """The rows and errors part of a line: "130 clips, 2 errors"."""
    parts = [f"{c.rows} {nouns.row}"] if nouns.row else []
    parts.append(f"{c.errors} error{'' if c.errors == 1 else 's'}")
    return ", ".join(parts)


def plain_line(c: Counts, nouns: Nouns) -> str:
    """One line for a log: `progress     68/150 samples (45%), 2 errors, 9.1 samples/s, ETA 0:09, bound: model`."""
    share = f" ({c.done / c.planned:.0%})" if c.planned else ""
    line = (f"progress     {c.done}/{c.planned} {nouns.unit}{share}, {details(c, nouns)}, "
            f"{c.rate:.1f} {nouns.unit}/s, ETA {clock(c.eta)}")
    return line + (f", bound: {c.bound}" if c.bound else "")


def bar_format(nouns: Nouns) -> str:
    """tqdm's line: `featurize  45%|████▌     | 68/150 samples, 2 errors, bound: model [0:07<0:09, 9.10 samples/s]`
    (the postfix holds the details, the bound, and the times and rate: ours, not tqdm's, see Rate)."""
    return "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}" + f" {nouns.unit}" + "{postfix}"


def postfix(c: Counts, nouns: Nouns) -> str:
    return (details(c, nouns) + (f", bound: {c.bound}" if c.bound else "")
            + f" [{clock(c.elapsed)}<{clock(c.eta)}, {c.rate:.2f} {nouns.unit}/s]")


def describe_job(job) -> str:
    """`job demo: resnet18 over /data/images into out/demo` (no credentials)."""
    return (f"job {job.name}: {job.model.arch} over {redact_text(job.source.uri)} "
            f"into {redact_text(job.output.uri)}")


def applying(checkpoint: str, table: str, out: str) -> str:
    return f"apply {redact_text(checkpoint)} to {redact_text(table)} into {redact_text(out)}"


def starting(enabled: bool, what: str, stream: Optional[TextIO] = None) -> None:
    """A line saying what a run is starting, before its progress can say anything (imports, the
    listing and Ray's start take seconds to tens of seconds, which a blank console hides)."""
    if enabled:
        print(f"starting     {what}", file=stream or sys.stderr, flush=True)


def live_bar(total: int, initial: int, nouns: Nouns, stream: TextIO):
    """The tqdm bar of a terminal or a notebook (tqdm.auto picks the widget there)."""
    from tqdm.auto import tqdm

    try:  # a terminal that does not say its size (0 x 0: a bare pty) gets a fixed one, or tqdm hides the bar
        sized = os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):
        sized = False
    return tqdm(total=total, initial=initial, desc="featurize", unit=f" {nouns.unit}", file=stream,
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                mininterval=0.5,
                bar_format=bar_format(nouns))


def in_terminal(stream: TextIO) -> bool:
    """A terminal, or a notebook (whose cells redraw a tqdm widget or a carriage return)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    return "ipykernel" in sys.modules


class Progress:
    """Polls the committer from a daemon thread and shows the run's progress; a context manager.

    `bound` maps the committer's busy seconds per stage and the elapsed time to the stage that
    bounds the run (None: no bound shown)."""

    def __init__(self, committer: Any, planned: int, before: int, nouns: Nouns,
                 bound: Optional[Callable[[Dict[str, float], int, float], Optional[str]]] = None,
                 stream: Optional[TextIO] = None, live: Optional[bool] = None, every: Optional[float] = None):
        self.committer, self.planned, self.before, self.nouns, self.bound = committer, planned, before, nouns, bound
        self.stream = stream or sys.stderr
        self.live = in_terminal(self.stream) if live is None else live
        self.every = every if every is not None else (1.0 if self.live else interval())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="featurize-progress", daemon=True)
        self.started = 0.0
        self.bar = None
        self.last: Optional[Counts] = None
        self.rate: Optional[Rate] = None
        self.printed = 0
        self.last_line = ""

    def __enter__(self) -> "Progress":
        self.started = time.time()
        self.rate = Rate(self.started, self.before)
        if self.live:
            try:
                self.bar = live_bar(self.planned, self.before, self.nouns, self.stream)
            except ImportError:  # tqdm is a dependency, but an environment may lack it: plain lines then
                self.live, self.every = False, interval()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        # the last count (a log gets it only if it had a line before: a short run needs none);
        # a failed run's would only delay its error line
        if exc[0] is None and (self.bar is not None or self.printed):
            last = self.poll(timeout=10)
            if last is not None:
                # Ray Data finished every write task, so every plan row is committed: the units the
                # committer could not see end (a shard's last rows skipped as committed) included
                last.done = self.planned
                self._show(last, final=True)
        if self.bar is not None:
            self.bar.close()

    def poll(self, timeout: float = 5.0) -> Optional[Counts]:
        """The committer's tally as Counts; None if it did not answer (restarting, or gone)."""
        import ray

        try:
            tally = ray.get(self.committer.progress.remote(), timeout=timeout)
        except Exception:
            return None
        elapsed = time.time() - self.started
        bound = self.bound(tally.seconds, tally.rows, elapsed) if self.bound and tally.seconds else None
        done = min(self.planned, self.before + tally.units)
        if self.last is not None and done < self.last.done:  # a restarted committer undercounts; never go back
            done = self.last.done
        recent = self.rate.add(self.started + elapsed, done) if self.rate is not None else None
        return Counts(done, self.planned, self.before, tally.rows, tally.errors, elapsed, bound, recent)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self._show(self.poll())

    def _show(self, c: Optional[Counts], final: bool = False) -> None:
        if c is None:
            return
        try:
            if self.bar is not None:
                self.bar.set_postfix_str(postfix(c, self.nouns), refresh=False)
                self.bar.update(c.done - self.bar.n)  # redraws (polls are further apart than mininterval)
            elif not (final and plain_line(c, self.nouns) == self.last_line):  # the same last line once
                self.last_line = plain_line(c, self.nouns)
                print(self.last_line, file=self.stream, flush=True)
                self.printed += 1
        except Exception as e:  # the console went away: the run matters more than its progress line
            log.debug("progress line: %s", e)
        self.last = c


def watch(committer: Any, planned: int, before: int, nouns: Nouns, enabled: bool,
          workers: Optional[Dict[str, int]] = None, gpu: bool = False, live: Optional[bool] = None):
    """A Progress for a run, or a context that does nothing when progress is off. `workers` per
    stage (layout.stage_workers) let the line name the bound; without them it is left out.
    `live`: None for a redrawn line in a terminal, plain lines elsewhere; False for plain lines."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    bound = None
    if workers:
        def bound(seconds: Dict[str, float], rows: int, elapsed: float) -> Optional[str]:
            return breakdown(seconds, rows, elapsed, workers, gpu)["bound"]
    return Progress(committer, planned, before, nouns, bound, live=live)
