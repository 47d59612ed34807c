"""Wires the Ray Data pipeline from a prepared job: read -> decode -> embed (-> temporal) -> commit."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any, Dict, Optional

import ray
from ray.data import ActorPoolStrategy, DataContext

from ..config import JobConfig, memory_bytes
from ..interrupt import reclaim_sigterm
from ..jobrun import complete, init_ray, recorded, run_to_end, start_committer, summarize, take_lease, verify
from ..models.actor import Embedder, EmbedSpec
from ..models.temporal import TemporalEmbedder
from ..output.lease import Lease
from ..output.ledger import staging_folder
from ..output.record import Summary, write_job_record
from ..output.root import Workspace, multi_row_units, open_output
from ..output.sink import ParquetCommitSink
from ..progress import nouns_of, starting, watch
from ..redact import logger
from ..timing import breakdown
from .decode import decode_batch
from .layout import Layout, decode_args, model_args, plan_resources, stage_workers
from .plan import split_list_gaps
from .planfile import PlanFile, read_task_files
from .prepare import Prepared, prepare
from .read import read_batch
from .todo_source import read_todo
from .video import decode_video_batch

log = logger(__name__)  # credentials masked in every record


def run_job(job: JobConfig, address: Optional[str] = None, progress: bool = False, verbose: bool = False,
            overwrite: bool = False, retry_failed: bool = False, incremental: bool = False) -> Summary:
    """Run a prepared job. `progress`: the live progress line on stderr (progress.py); `verbose`:
    everything Ray prints, and Ray Data's own progress bars."""
    if address and address.startswith("ray://"):
        return _run_on_head(job, address, progress=progress, verbose=verbose, overwrite=overwrite,
                            retry_failed=retry_failed, incremental=incremental)
    t0 = time.time()
    prepared = prepare(job)  # refuses a bad job before Ray starts
    # OUT's single writer, before anything in OUT is touched
    lease = take_lease(prepared.job.output.uri, prepared.out_options)
    try:
        return _run_leased(prepared, lease, t0, address, progress, verbose, overwrite=overwrite,
                           retry_failed=retry_failed, incremental=incremental)
    finally:
        lease.release()


def _run_leased(prepared: Prepared, lease: Lease, t0: float, address: Optional[str], progress: bool,
                verbose: bool, **modes) -> Summary:
    job = prepared.job
    ws = open_output(prepared, **modes)
    record = partial(write_job_record, prepared, ws)
    if not len(ws.todo):  # all done already: no need for Ray
        verify(ws)
        lease.check()
        return _finish(prepared, ws, record, t0, time.time(), {}, None)
    record(status="running", started_at=t0)  # before Ray starts: a stop from here on is recorded
    with recorded(record, t0, ws.uri):
        earlier = f" ({ws.skipped} committed earlier)" if ws.skipped else ""
        starting(progress, f"{len(ws.todo)} {nouns_of(job).unit} to do{earlier}: Ray and the model's actors")
        init_ray(address, verbose)
        layout = plan_resources(job, len(ws.todo))
        DataContext.get_current().enable_progress_bars = verbose
        committer = start_committer(ws, prepared.job.output.uri, prepared.out_options, lease.run_id)
    sink = ParquetCommitSink(dataclasses.replace(prepared.sink_spec(len(ws.todo)), out_uri=ws.uri,
                                                 staging=staging_folder(ws.job, lease.run_id)), committer)
    t1 = time.time()
    shown = watch(committer, len(ws.plan), ws.skipped, nouns_of(job), progress, stage_workers(layout, job),
                  gpu=layout.gpus_per_actor > 0, live=False if verbose else None)

    def write() -> None:
        with shown:
            build_dataset(prepared, layout, ws.todo, committer).write_datasink(sink, ray_remote_args={"num_cpus": 0})

    windowed = job.is_video and bool(job.video.window_s)
    run_to_end(ws, lease, committer, write, record, t0, check=lambda ws: _check_complete(ws, committer, windowed))
    return _finish(prepared, ws, record, t0, t1, sink.totals, layout)


def _run_on_head(job: JobConfig, address: str, **modes) -> Summary:
    """Through Ray Client, the driver itself runs as a task on the head node: Ray Data's executor
    needs a core worker, which a client process does not have. Ctrl-C here cancels the task, and
    with it the job's actors (they belong to it)."""
    from ..submit import PACKAGE

    _connect_client(address, runtime_env={"py_modules": [str(PACKAGE)]})
    driver = ray.remote(run_job).options(num_cpus=0, max_retries=0, resources={"node:__internal_head__": 0.001})
    ref = driver.remote(job, **modes)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise


def _connect_client(address: str, runtime_env: Dict[str, Any], attempts: int = 2) -> None:
    """Ray Client starts a server process on the head for each connection; on a busy head that
    start can fail ("Starting Ray client server failed"). It is the head's moment, not the job's:
    try once more before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
            reclaim_sigterm()
            return
        except ConnectionAbortedError as e:
            if attempt == attempts or "Starting Ray client server failed" not in str(e):
                raise
            log.warning("%s: the head could not start a client server; trying again", address)
            ray.shutdown()
            time.sleep(2.0)


def _check_complete(ws: Workspace, committer, windowed: bool) -> None:
    """Ray Data finished every write task: every unit this run took up is now committed (recorded
    by the committer, which knows the units done)."""
    ray.get(committer.complete_units.remote(multi_row_units(ws.todo, windowed)))
    verify(ws)


def _finish(prepared: Prepared, ws: Workspace, record, t0: float, t1: float, totals: Dict[str, Any],
            layout: Optional[Layout]) -> Summary:
    summary = summarize(ws, prepared.job.output.uri, t0, t1, totals, layout=vars(layout) if layout else {},
                        split_lists=split_list_gaps(ws.plan), provenance=prepared.provenance())
    if layout is not None:
        summary.stages = breakdown(dict(totals.get("seconds", {})), summary.samples, summary.wall_s,
                                   stage_workers(layout, prepared.job), gpu=layout.gpus_per_actor > 0)
    return complete(ws, record, t0, summary)  # and an --overwrite output replaces the old one now


def build_dataset(prepared: Prepared, layout: Layout, todo: PlanFile, committer=None) -> ray.data.Dataset:
    """The job's dataset: the todo read from the driver's disk a read task's rows at a time (the
    driver never holds it as blocks), then read, decoded and embedded."""
    job, res = prepared.job, prepared.job.resources
    files = read_task_files(todo, layout.rows_per_read_task, os.path.join(os.path.dirname(todo.path), "read"))
    media = "video" if job.is_video else "image"
    task_args = decode_args(layout, res)
    ds = read_todo(files).map_batches(
        read_batch,
        fn_kwargs={"storage_options": job.source.storage_options,
                   "rows_per_batch": min(res.decode_batch_size, layout.rows_per_read_task), "media": media,
                   "read_timeout_s": job.source.read_timeout_s,
                   "max_sample_bytes": memory_bytes(job.source.max_sample_bytes, "source.max_sample_bytes")},
        batch_size=min(res.decode_batch_size, layout.rows_per_read_task),
        batch_format="numpy",
        **task_args,
    )
    if not layout.decode_in_actor:  # else the model actor decodes the bytes itself
        if job.is_video:
            decode, kwargs = decode_video_batch, {"spec": prepared.frames, "cfg": job.video,
                                                  "windowed": bool(job.video.window_s)}
        else:
            decode, kwargs = decode_batch, {"spec": prepared.image}
        ds = ds.map_batches(decode, fn_kwargs=kwargs, batch_size=min(res.decode_batch_size, layout.rows_per_read_task),
                            batch_format="numpy", **task_args)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_args=(dataclasses.replace(_embed_spec(prepared, layout), committer=committer),),
        # a batch of clips holds num_frames images each
        batch_size=max(1, layout.batch_size // job.video.num_frames) if job.is_video else layout.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=layout.actors, max_size=layout.max_actors),
        **model_args(layout, res),
    )
    if not job.is_video or job.clips:  # a clip model's rows have their feature already
        return ds
    # The temporal heads are small next to the CNN: their own single actor, claiming no CPU.
    return ds.map_batches(
        TemporalEmbedder,
        fn_constructor_kwargs={"heads": prepared.heads, "storage_options": job.source.storage_options,
                               "dtype": job.output.dtype, "keep_frame_features": job.output.frame_features},
        batch_size=layout.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=0,
    )


def _embed_spec(prepared: Prepared, layout: Layout) -> EmbedSpec:
    job = prepared.job
    return EmbedSpec(
        model=job.model,
        weights=prepared.weights,
        crop=prepared.image.crop,
        dim=prepared.dim,
        mean=prepared.mean,
        std=prepared.std,
        dtype=job.output.dtype,
        torch_threads=layout.torch_threads,
        storage_options=prepared.model_options,
        image=prepared.image if layout.decode_in_actor else None,
        clips=job.clips,
    )
