"""Where the time goes: each stage's busy seconds, carried with the rows to the sink, and the stage
that bounds the run, with what to change.

Each stage function is wrapped in `@timed(stage)`. It adds `time_<stage>_s` to the batch: the
seconds the call took, spread evenly over the output rows, so the sum over any set of rows is
the time spent on them whatever the later stages regroup (tar members, video windows). The sink
sums the columns per block (they are not written), and the driver sums the blocks.

Ray Data's own `Dataset.stats()` reports time per operator, but read and decode run fused in one
operator and the sink's time is not split from the commit; these columns keep the stages apart.
"""
from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

STAGES = ("read", "decode", "model", "temporal", "write")
PREFIX, SUFFIX = "time_", "_s"


def column(stage: str) -> str:
    return f"{PREFIX}{stage}{SUFFIX}"


COLUMNS = tuple(column(s) for s in STAGES)


def timed(stage: str) -> Callable:
    """Decorate a map_batches function, generator or `__call__` method with its stage's timing."""
    def decorate(fn: Callable) -> Callable:
        batch_at = 1 if "self" in inspect.signature(fn).parameters else 0

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args, **kwargs):
                carried = _carried(args[batch_at])
                it = fn(*args, **kwargs)
                while True:  # only the generator's own work: the consumer runs between yields
                    t = time.perf_counter()
                    try:
                        out = next(it)
                    except StopIteration:
                        return
                    yield _stamp(out, carried, stage, time.perf_counter() - t)
                    carried = {}  # the input's earlier times go with the first output batch
            return generator

        @functools.wraps(fn)
        def function(*args, **kwargs):
            carried = _carried(args[batch_at])
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t
            # A stage may run another inside it (the model actor decoding its own batch): that
            # one's seconds are in the output already, and are not this stage's own.
            inner = {c: max(v, carried.get(c, 0.0)) for c, v in _carried(out).items()}
            totals = {**carried, **inner}
            nested = sum(totals.values()) - sum(carried.values())
            return _stamp(out, totals, stage, max(0.0, seconds - nested))
        return function
    return decorate


def _carried(batch: Dict[str, np.ndarray]) -> Dict[str, float]:
    return {c: float(np.sum(batch[c])) for c in COLUMNS if c in batch}


def _stamp(out: Dict[str, np.ndarray], carried: Dict[str, float], stage: str, seconds: float):
    n = len(next(iter(out.values()))) if out else 0
    totals = dict(carried)
    totals[column(stage)] = totals.get(column(stage), 0.0) + seconds
    for col, total in totals.items():
        out[col] = np.full(n, total / n if n else 0.0, dtype=np.float64)
    return out


def block_seconds(batch: Dict[str, np.ndarray]) -> Dict[str, float]:
    """{stage: seconds} of a block's rows."""
    return {s: float(np.sum(batch[column(s)])) for s in STAGES if column(s) in batch}


def breakdown(seconds: Dict[str, float], samples: int, wall_s: float, workers: Dict[str, int],
              gpu: bool) -> Dict[str, Any]:
    """Per stage: busy seconds, workers, the rate its workers could sustain alone, the share of the
    run they were busy; the stage with the largest share bounds the run."""
    stages = {}
    for stage in STAGES:
        busy = seconds.get(stage, 0.0)
        if busy <= 0:
            continue
        n = max(1, workers.get(stage, 1))
        stages[stage] = {"busy_s": round(busy, 3), "workers": n,
                         "samples_per_s": round(samples * n / busy, 1),
                         "busy_share": round(busy / n / wall_s, 3) if wall_s > 0 else 0.0}
    bound = max(stages, key=lambda s: stages[s]["busy_share"], default=None)
    return {"stages": stages, "bound": bound, "suggestion": suggestion(bound, gpu)}


def suggestion(bound: Optional[str], gpu: bool) -> str:
    if bound == "read":
        return ("reading bounds the run (the store's latency or bandwidth): more read tasks in flight "
                "(a lower resources.decode_cpus, more CPU nodes), or small files packed into tar shards "
                "(source.format: webdataset)")
    if bound == "decode":
        return ("decoding bounds the run: more CPUs for decode (CPU nodes, resources.max_decode_cpus, "
                "a lower resources.decode_cpus), or a smaller preprocess.resize / video.size"
                + ("; or JPEGs decoded on the GPU itself (resources.decode_on: actor)" if gpu else ""))
    if bound == "model":
        if gpu:
            return ("the model bounds the run: a larger resources.batch_size, more GPUs "
                    "(resources.max_actors), or resources.actors_per_gpu: 2 if a GPU is not kept busy")
        return ("the model bounds the run, as it should on CPUs: GPUs (model.device: cuda), or a smaller "
                "model or crop; more decode CPUs would not help")
    if bound == "temporal":
        return "the temporal heads bound the run: fewer or smaller heads, or a larger resources.batch_size"
    if bound == "write":
        return ("writing bounds the run: the output store is slow; fewer, larger files "
                "(a larger resources.read_block_size) or an output store nearer the cluster")
    return ""
