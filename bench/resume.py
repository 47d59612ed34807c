"""Resume overhead: plan and skip a fully committed job of 100k planned samples.

    .venv/bin/python bench/resume.py [--samples 100000] [--per-file 1000]

Generates tiny files under bench/out/resume/ (once), plans the job into a fresh OUT, fills OUT
with committed features for every sample through the real commit protocol (as a finished job
would have; the model is not run), leaves `_job.json` saying `running` (as a killed driver
leaves it), then removes the source, so that the resume could not list it if it tried, and times
the same job run again: load the plan, read the committed ids back, find nothing to do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import parse_job  # noqa: E402
from pipeline.extract.prepare import prepare  # noqa: E402
from pipeline.extract.runner import run_job  # noqa: E402
from pipeline.output.ledger import Ledger, Staged, parquet_bytes, part_name, write_atomic  # noqa: E402
from pipeline.output.partitions import partition_folder  # noqa: E402
from pipeline.output.record import write_job_record  # noqa: E402
from pipeline.output.root import open_output
from pipeline.output.sink import features_schema  # noqa: E402
from pipeline.output.status import status  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "resume")


def make_files(root: str, n: int) -> None:
    for i in range(n):
        folder = os.path.join(root, f"c{i % 100:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(b"\xff\xd8tiny")


def commit_everything(prepared, ws, per_file: int) -> None:
    """What a finished job leaves: every planned sample in a committed features file."""
    schema = features_schema(prepared.sink_spec())
    plan, rng = ws.plan, np.random.default_rng(0)
    ledger = Ledger(ws.fs, ws.root)
    for start in range(0, len(plan), per_file):
        part = plan.slice(start, per_file)
        n, dim = len(part), prepared.dim
        feature = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * dim).astype(np.float16)), dim)
        columns = {"sample_id": part["sample_id"], "uri": part["uri"], "label": part["label"], "split": part["split"],
                   "feature": feature,
                   "width": pa.array(np.full(n, 500, np.int32)), "height": pa.array(np.full(n, 375, np.int32))}
        table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        ids = table["sample_id"].to_pylist()
        rel = f"features/{partition_folder(['split'], ['all'])}/{part_name(ids)}"
        staged = f"{ws.root}/_staging/bench/{rel}"
        write_atomic(ws.fs, staged, parquet_bytes(table))
        ledger.commit([Staged(staged, rel, ids)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--per-file", type=int, default=1000, help="samples per committed file")
    args = parser.parse_args()
    src, out = os.path.join(HERE, f"src-{args.samples}"), os.path.join(HERE, "out")
    shutil.rmtree(out, ignore_errors=True)
    if not os.path.isdir(src):
        make_files(src, args.samples)
    job = parse_job({"name": "resume-bench", "source": {"uri": src}, "output": {"uri": out},
                     "model": {"arch": "resnet18", "weights": "none"}, "preprocess": {"resize": 128, "crop": 112}})
    t = time.time()
    prepared = prepare(job)
    ws = open_output(prepared)  # the first run's planning: lists the source once
    first_plan_s = time.time() - t
    commit_everything(prepared, ws, args.per_file)
    write_job_record(prepared, ws, status="running", started_at=time.time())
    shutil.rmtree(src)  # the resume must not need it

    t0 = time.time()
    summary = run_job(job)
    resume_s = time.time() - t0
    t1 = time.time()
    st = status(out)
    status_s = time.time() - t1
    assert summary.skipped == args.samples and summary.samples == 0 and st["complete"]
    files = sum(len(names) for _, _, names in os.walk(os.path.join(out, "features")))
    print(f"planned samples         {args.samples} in {files} committed files")
    print(f"first run's planning    {first_plan_s:.2f} s (listing {args.samples} files)")
    print(f"resume of the done job  {resume_s:.2f} s (model check, saved plan, committed ids, nothing to do;"
          f" the source was deleted first)")
    print(f"featurize status        {status_s:.2f} s")


if __name__ == "__main__":
    main()
