"""The training loader against a plain pyarrow scan: rows/s of float16 feature vectors into float32.

    .venv/bin/python bench/loader.py [--rows 100000 1000000] [--dims 512 2048] [--workers 0 2] [--repeat 3]
                                     [--file-size 64MiB | --per-file 10000]

Writes a features table under --dir (kept for the next run; 4 GB for 1M rows at D=2048), either
as a run writes it now (--file-size, the default: blocks of 256 rows, as the read tasks make them,
through the job's sink, ParquetCommitSink, and committer on a local Ray, partitioned by split, so
the files are output.file_size's) or directly with pyarrow in files of --per-file rows and one row
group each (OUT/features/split_dir=train/label_dir=<l>/part-*.parquet: how the sink wrote a block
before files were sized, at 255 rows), zstd, `feature` fixed_size_list<float16, D>. It prints the
files' layout, then times, each in a fresh process whose peak RSS it reports:

- **scan**: `pyarrow.dataset(files).to_batches(columns=["feature"])`, each batch through
  `tensors.vectors` to float32 numpy: the ceiling;
- **loader**: `DataLoader(FeatureDataset(OUT, "feature"), batch_size=None, num_workers=W)`, batches
  of 256 as float32 tensors with their int64 labels.

Contenders run interleaved --repeat times; the table gives each one's median rate, its range and
its ratio to the scan's median.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.output.store import parquet_bytes, parquet_files  # noqa: E402
from pipeline.output.tensors import vectors  # noqa: E402

if "--one" in sys.argv and "loader" in sys.argv:  # only the loader's process pays for torch
    from torch.utils.data import DataLoader  # noqa: E402

    from pipeline.train.loader import FeatureDataset  # noqa: E402

LABELS, BLOCK = 10, 256


def make_table(out: str, rows: int, dim: int, per_file: int) -> None:
    """`rows` rows of random float16 vectors, files of `per_file` rows (the same block in every file)."""
    if os.path.exists(f"{out}/_done"):
        return
    block = np.random.default_rng(0).standard_normal((per_file, dim), dtype=np.float32).astype(np.float16)
    for k, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        label = f"l{k % LABELS}"
        table = pa.table({
            "sample_id": [f"{label}/{i:08d}.jpg" for i in range(start, start + n)],
            "uri": [f"s3://bucket/{label}/{i:08d}.jpg" for i in range(start, start + n)],
            "label": [label] * n, "split": ["train"] * n,
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(block[:n].ravel()), dim),
        })
        folder = f"{out}/features/split_dir=train/label_dir={label}"
        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}/part-{k:05d}.parquet", "wb") as f:
            f.write(parquet_bytes(table))  # as the sink writes its files
    open(f"{out}/_done", "w").close()


def _rows(batch: dict, dim: int) -> dict:
    """Model rows as the sink receives them, for the ids in batch["id"]."""
    ids = batch["id"]
    text = lambda values: np.array(values, dtype=object)  # noqa: E731
    rng = np.random.default_rng(int(ids[0]))
    return {"sample_id": text([f"l{i % LABELS}/{i:08d}.jpg" for i in ids]),
            "uri": text([f"s3://bucket/l{i % LABELS}/{i:08d}.jpg" for i in ids]),
            "label": text([f"l{i % LABELS}" for i in ids]), "split": text(["train"] * len(ids)),
            "feature": rng.standard_normal((len(ids), dim), dtype=np.float32).astype(np.float16),
            "width": np.full(len(ids), 500, np.int32), "height": np.full(len(ids), 375, np.int32),
            "error_stage": text([""] * len(ids)), "error_type": text([""] * len(ids)),
            "error_message": text([""] * len(ids))}


def write_as_a_run(out: str, rows: int, dim: int, file_size: str) -> None:
    """`rows` rows through the job's sink and committer on a local Ray, from blocks of BLOCK rows."""
    if os.path.exists(f"{out}/_done"):
        return
    import ray

    from pipeline.config import file_bytes
    from pipeline.output.committer import CONCURRENCY, Committer
    from pipeline.output.sink import ParquetCommitSink, SinkSpec, image_columns

    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    committer = ray.remote(Committer).options(max_concurrency=CONCURRENCY).remote(out, {}, job="bench")
    spec = SinkSpec(out, {}, ["split"], image_columns("float16", dim), staging="bench/run",
                    file_bytes=file_bytes(file_size, "--file-size"))
    ds = ray.data.range(rows, override_num_blocks=-(-rows // BLOCK)).map_batches(
        _rows, fn_kwargs={"dim": dim}, batch_size=BLOCK, batch_format="numpy")
    ds.write_datasink(ParquetCommitSink(spec, committer), ray_remote_args={"num_cpus": 0})
    open(f"{out}/_done", "w").close()


def layout(out: str) -> str:
    """Files, rows and MB a file (median), row groups a file (median)."""
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("file")
    files = parquet_files(fs, f"{out}/features")
    metas = [pq.read_metadata(f) for f in files]
    rows = statistics.median(m.num_rows for m in metas)
    mb = statistics.median(os.path.getsize(f) for f in files) / 1e6
    groups = statistics.median(m.num_row_groups for m in metas)
    return f"{len(files):,} files, {rows:,.0f} rows and {mb:.1f} MB a file, {groups:g} row groups a file (medians)"


def scan(out: str, workers: int) -> int:
    files = parquet_files(fsspec.filesystem("file"), f"{out}/features")
    rows = 0
    for batch in pads.dataset(files, format="parquet").to_batches(columns=["feature"]):
        rows += len(vectors(batch.column(0)))
    return rows


def loader(out: str, workers: int) -> int:
    ds = FeatureDataset(out, "feature", batch_size=256)  # timed: open the table, count labels, read footers
    rows = 0
    for batch in DataLoader(ds, batch_size=None, num_workers=workers):
        rows += len(batch["x"])
        assert batch["x"].dtype.is_floating_point and batch["x"].element_size() == 4
    return rows


def one(kind: str, out: str, workers: int) -> None:
    """In a fresh process: time one contender (not its imports), print rows, seconds and peak RSS as JSON."""
    started = time.perf_counter()
    rows = {"scan": scan, "loader": loader}[kind](out, workers)
    seconds = time.perf_counter() - started
    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"rows": rows, "seconds": seconds, "rss_mb": rss / 1024}))


def measure(kind: str, out: str, workers: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, "--dir", out, "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/tmp/featurize-bench-loader")
    p.add_argument("--file-size", default="64MiB", help="write as a run does, files of this size (the default)")
    p.add_argument("--per-file", type=int, help="write directly, files of this many rows and one row group")
    p.add_argument("--one", choices=["scan", "loader"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one, args.dir, args.workers[0])
    tables = []
    for dim in args.dims:
        for rows in args.rows:
            if args.per_file:
                out = f"{args.dir}/d{dim}-r{rows}-p{args.per_file}"
                make_table(out, rows, dim, args.per_file)
            else:
                out = f"{args.dir}/d{dim}-r{rows}-s{args.file_size}"
                write_as_a_run(out, rows, dim, args.file_size)
            print(f"D={dim}, {rows:,} rows: {layout(out)}", flush=True)
            tables.append((dim, rows, out))
    print("| D | rows | contender | rows/s (median) | range | ratio to scan | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for dim, rows, out in tables:
        runs: dict = {}
        contenders = [("scan", "scan", 0)] + [(f"loader, {w} workers", "loader", w) for w in args.workers]
        for _ in range(args.repeat):  # interleaved, so the host's drift falls on every contender alike
            for name, kind, w in contenders:
                r = measure(kind, out, w)
                assert r["rows"] == rows, (name, r)
                runs.setdefault(name, []).append(r)
        ceiling = statistics.median(rows / r["seconds"] for r in runs["scan"])
        for name, rs in runs.items():
            rates = [rows / r["seconds"] for r in rs]
            rate = statistics.median(rates)
            print(f"| {dim} | {rows:,} | {name} | {rate:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
                  f"{rate / ceiling:.2f} | {max(r['rss_mb'] for r in rs):,.0f} MB |", flush=True)

if __name__ == "__main__":
    main()
