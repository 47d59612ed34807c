"""What every Ray job that writes an output root shares: Ray's start, OUT's lease, the committer
actor, and the end of the job (run_to_end, summarize, complete: the final audit, the record in
_job.json, the summary, what a command says when it failed). `featurize run` (runner.py) and
`featurize apply` (train/apply.py) both build on it, so neither imports the other.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .console import quiet_ray, ray_log_dir
from .errors import OutputExists
from .interrupt import reclaim_sigterm
from .output.committer import CONCURRENCY, Committer
from .output.lease import Lease
from .output.ledger import audit
from .output.record import Summary
from .output.root import Workspace, finish
from .output.store import filesystem
from .procs import marked_environment, stop_orphans
from .redact import logger

log = logger(__name__)  # credentials masked in every record
Record = Callable[..., None]  # record(status=, started_at=, summary=, error=): writes the job's OUT/_job.json


class IncompleteOutput(RuntimeError):
    """The run ended with planned samples neither committed nor in the errors table."""


class NotExactlyOnce(IncompleteOutput):
    """Some sample id is committed more than once: running again cannot mend it, --overwrite can."""


# Ray Train's controller polls its workers every 2 s and a worker's report waits for the poll, so an
# epoch of a small head took 2 s whatever its size; polling every 0.2 s costs next to nothing. Its
# preemption watcher (an actor a training, a process: ~1.5 s of a training's start on 2 cores) looks
# for cloud nodes about to be reclaimed, which one machine's embedded Ray has none of.
# Its placement group cleaner asks the state API whether the controller lives; without an address
# that API takes the cluster /tmp/ray/ray_current_cluster names, and where that is a `ray start`
# cluster long gone, the ask hangs and every training waited 12 s for the cleaner to stop (a small
# fit: 22 s, 10.5 s with this). The embedded Ray has no dashboard, so no state API: say so at once.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}


def init_ray(address: Optional[str], verbose: bool = False) -> None:
    """Start (or join) Ray once per process. Its chatter stays in its session's log files, off the
    console (console.py), unless `verbose`: then the console gets all of it, the workers' too."""
    quiet_ray(not verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
    else:  # "local": a new embedded Ray, never a cluster `ray start` left on this machine
        stop_left_behind()
        with marked_environment():  # its processes carry this driver's mark (procs.py)
            ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=verbose,
                     runtime_env={"env_vars": LOCAL_RAY_ENV})
    reclaim_sigterm()  # ray.init replaced the CLI's SIGTERM handler (pipeline/interrupt.py)


def stop_left_behind() -> None:
    """Stop the processes of local Rays whose driver was killed (SIGKILL leaves some running)."""
    stopped = stop_orphans()
    if stopped:
        log.warning("stopped %d processes of a local Ray left running by a run that was killed (pids %s)",
                    len(stopped), ", ".join(map(str, sorted(stopped))))


def take_lease(uri: str, storage_options: Dict[str, Any], key: str = "output.uri") -> Lease:
    """OUT's single writer, taken before anything in OUT is touched; its heartbeat started."""
    fs, root = filesystem(uri, storage_options)
    try:
        lease = Lease(fs, root, uri, uuid.uuid4().hex[:16]).acquire()
    except OutputExists:
        raise
    except Exception as e:
        raise OutputExists(f"{key} {uri}: cannot be reached ({type(e).__name__}: {e})") from None
    lease.start_heartbeat()
    return lease


def start_committer(ws: Workspace, out_uri: str, storage_options: Dict[str, Any], run_id: str):
    """The job's one Committer, on the driver's node (workers may come and go), restarted on failure;
    it publishes only while this run holds OUT's lease (`out_uri`'s). Its arguments are small and
    inline: it reads what OUT holds itself (see Committer)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(Committer).options(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here,
                                          max_concurrency=CONCURRENCY)
    return actor.remote(ws.uri, storage_options, job=ws.job, lease=(out_uri, run_id), base=ws.committed)


def stop(committer) -> None:
    """Free the job's actors and their CPUs now, also after a failure (see Committer.register)."""
    try:
        for actor in ray.get(committer.registered.remote(), timeout=30):
            ray.kill(actor)
        ray.kill(committer)
    except Exception as e:  # the job's own outcome matters more
        log.warning("could not stop the job's actors: %s", e)


def verify(ws: Workspace) -> None:
    """A run ends well only if the files on the store (not the committer's tally) hold every
    planned sample, and none twice across features and errors."""
    found = audit(ws.fs, ws.root, ws.plan)
    ws.rows = found["rows"]  # the summary's output rows: no second read of every file
    if found["duplicates"]:
        dup = found["duplicates"]
        raise NotExactlyOnce(f"{len(dup)} sample ids are committed more than once in {ws.uri} (first: {dup[0]!r}); "
                             "the output is not exactly once: rebuild it with --overwrite")
    if found["missing"]:
        raise IncompleteOutput(f"{found['missing']} planned samples were neither committed nor recorded as errors "
                               f"(first: {found['first_missing']!r}); run the same command again to finish them")


def run_to_end(ws: Workspace, lease: Lease, committer, write: Callable[[], None], record: Record, t0: float,
               check: Callable[[Workspace], None] = verify) -> None:
    """Run the job's pipeline (`write`: the Ray Data job into the sink), then see that it ended whole:
    the ledger as the committer left it, every planned sample committed once (`check`), OUT's lease
    still this run's. A failure or an interrupt is recorded in _job.json (`recorded`) and goes on up;
    the job's actors are stopped either way."""
    try:
        with recorded(record, t0, ws.uri):
            write()
            check(ws)  # from the files on the store: the committer's id set never travels to the driver
            lease.check()  # still OUT's writer: only then record it complete (and swap an overwrite in)
    finally:
        stop(committer)


@contextlib.contextmanager
def recorded(record: Record, t0: float, uri: str) -> Iterator[None]:
    """A job that stops inside says so in _job.json, then the exception goes on up: `interrupted`
    for Ctrl-C or SIGTERM (pipeline/interrupt.py), `failed` for anything else."""
    try:
        yield
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        try:
            record(status=status, started_at=t0, error=f"{type(e).__name__}: {e}"[:2000])
        except Exception as e2:  # the store itself may be what failed; the job's own error matters more
            log.warning("could not record the %s job in %s: %s", status, uri, e2)
        raise


def summarize(ws: Workspace, out_uri: str, t0: float, t1: float, totals: Dict[str, Any], **fields) -> Summary:
    """The summary of a job that ended whole: this run's counts (the sink's `totals`, empty when
    there was nothing to do and Ray never started), OUT's rows, timings from `t0` (start) and `t1`
    (execution start); `fields`: what only one kind of job tells."""
    commits = totals.get("commits", [])
    return Summary(
        out_uri=out_uri, planned=len(ws.plan), features=totals.get("features", 0),
        errors=dict(sorted(totals.get("errors", {}).items())), wall_s=time.time() - t1, startup_s=t1 - t0,
        skipped=ws.skipped, added=ws.added, gone=ws.gone, duplicates=totals.get("duplicates", 0),
        output_rows=dict(ws.rows or {}),  # as the run's audit (verify, before every summary) read them
        ray_logs=(ray_log_dir() or "") if totals else "",
        progress=progress_series(commits, t1), **steady_state(commits, t1), **fields)


def complete(ws: Workspace, record: Record, t0: float, summary: Summary) -> Summary:
    """Record the job complete in _job.json, then put an overwrite's new output in place of the old."""
    record(status="complete", started_at=t0, summary=summary)
    finish(ws)
    return summary


def failure_lines(what: str, e: BaseException) -> List[str]:
    """What a command says when its job failed midway: the reason in one line (the details are in
    Ray's logs), then how to go on, unless the reason says it itself."""
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    lines = [f"featurize: {what} failed: {type(e).__name__}: {reason}"]
    if not isinstance(e, NotExactlyOnce):
        lines.append("featurize: what was committed is kept; run the same command again to resume")
    return lines


def steady_state(commits: List[Tuple[float, int]], started: float) -> Dict[str, float]:
    """Throughput once the pipeline is full: samples committed after the first commit."""
    if not commits:
        return {}
    commits = sorted(commits)
    first, last = commits[0][0], commits[-1][0]
    after_first = sum(n for _, n in commits[1:])
    rate = after_first / (last - first) if last > first else 0.0
    return {"first_commit_s": first - started, "steady_throughput": rate}


def progress_series(commits: List[Tuple[float, int]], started: float, points: int = 300) -> List[List[float]]:
    """The run's rows committed over time, [[seconds since execution began, rows so far], ...],
    for the report's throughput chart: one point per commit, evenly thinned to at most `points`
    (the first and the last kept), so _job.json stays small however long the run."""
    if not commits:
        return []
    series, total = [[0.0, 0]], 0
    for t, n in sorted(commits):
        total += n
        series.append([round(max(0.0, t - started), 2), total])
    if len(series) > points:
        step = (len(series) - 1) / (points - 1)
        series = [series[round(i * step)] for i in range(points)]
    return series
