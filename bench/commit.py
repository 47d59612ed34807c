"""The commit path's throughput: files/s and rows/s published through the job's Committer actor.

    .venv/bin/python bench/commit.py                        # 192 files of 256 rows, 1/8/32 writers
    .venv/bin/python bench/commit.py --files 96 --writers 8 --stores s3

On local disk and on an S3 endpoint (a moto server on 127.0.0.1, behind a counting proxy), for 1, 8
and 32 concurrent writers. Each writer does what a write task of the sink does (sink.py): on local
disk it stages the file whole under OUT/_staging, on S3 it carries the file's bytes, then it calls
the Committer actor (started as jobrun.start_committer starts it: a threaded actor, fenced by OUT's
lease) and waits for the answer. Rows: the files' rows (256 a file, a 512-dim float16 feature each,
~260 KB a file, as a ResNet-18 job writes them).

Each row is measured against the store's own ceiling in the same run: the same files written by the
same number of threads with nothing else (plain PUTs on S3, plain writes on disk). On S3 the table also
gives the requests a published file costs (counted at the proxy, the lease's own requests included),
and the protocol before this change for comparison (`staged copy`: the writer PUTs a staged file, the
committer checks the name with a HEAD and a listing, copies it server-side and deletes the staged one).

The proxy and moto run in this process's threads, on the same 2 cores as Ray: the S3 figures are
those of a slow local endpoint, where a request costs ~5-20 ms of CPU; what carries over to real S3
is the requests a file and the ratio to the ceiling, not the files/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from pipeline.jobrun import start_committer  # noqa: E402
from pipeline.output.lease import Lease  # noqa: E402
from pipeline.output.ledger import Staged, parquet_bytes, part_name, write_atomic  # noqa: E402
from pipeline.output.store import filesystem, with_connections  # noqa: E402

BUCKET, KEY, SECRET = "bench-commit", "bench-key", "bench-secret"


def make_files(n: int, rows: int, dim: int) -> List[Dict[str, Any]]:
    """n Parquet files as the sink writes them: (ids, bytes)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ids = [f"c{i:05d}/{j:04d}.jpg" for j in range(rows)]
        feature = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(rows * dim).astype(np.float16)), dim)
        table = pa.table({"sample_id": ids, "uri": [f"s3://src/{s}" for s in ids], "label": ["c"] * rows,
                          "split": ["train"] * rows, "feature": feature})
        out.append({"ids": ids, "data": parquet_bytes(table)})
    return out


def workspace(uri: str) -> SimpleNamespace:
    """What start_committer reads of a run: the output's URI, the job's fingerprint, what OUT held."""
    return SimpleNamespace(uri=uri, job="benchjob", committed=(0, 0))


def committed(files, writers: int, uri: str, options: Dict[str, Any], mode: str) -> float:
    """Seconds to publish every file through a fresh Committer with `writers` at once."""
    import ray

    fs, root = filesystem(uri, options)
    lease = Lease(fs, root, uri, uuid.uuid4().hex[:16]).acquire()
    committer = start_committer(workspace(uri), uri, options, lease.run_id)
    ray.get(committer.progress.remote())  # started: it has read OUT

    def one(f) -> None:
        rel = f"features/split=train/{part_name(f['ids'])}"
        if mode == "carried":
            staged = Staged("", rel, f["ids"], data=f["data"])
        else:  # staged: as local disk always does, and object stores did before
            path = f"{root}/_staging/benchjob/{lease.run_id}/{uuid.uuid4().hex}/{rel}"
            write_atomic(fs, path, f["data"])
            staged = Staged(path, rel, f["ids"])
        result = ray.get(committer.commit.remote([staged], {}))
        assert result["features"] == len(f["ids"]), result

    t = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(one, files))
    seconds = time.perf_counter() - t
    ray.kill(committer)
    lease.release()
    return seconds


def ceiling(files, writers: int, uri: str, options: Dict[str, Any]) -> float:
    """Seconds to write the same files with `writers` threads and nothing else."""
    fs, root = filesystem(uri, with_connections(uri, options, writers))  # as the committer's own client
    local = not uri.startswith("s3://")

    def one(f) -> None:
        path = f"{root}/{part_name(f['ids'])}"
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(f["data"])
        else:
            fs.pipe_file(path, f["data"])

    t = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - t


def s3_endpoint():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    from faultproxy import FaultProxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    time.sleep(0.5)
    proxy = FaultProxy(f"http://127.0.0.1:{port}").start()
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": proxy.endpoint}}
    fs, _ = filesystem(f"s3://{BUCKET}", options)
    fs.mkdir(BUCKET)
    return server, proxy, options


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=192)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--stores", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    p.add_argument("--no-before", action="store_true", help="skip the staged-copy rows on S3")
    args = p.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    files = make_files(args.files, args.rows, args.dim)
    size = np.mean([len(f["data"]) for f in files]) / 1024
    print(f"{args.files} files of {args.rows} rows ({size:.0f} KiB each), writers {args.writers}")
    rows_out = []
    tmp = tempfile.mkdtemp(prefix="bench-commit-")
    server = proxy = None
    try:
        for store in args.stores:
            options: Dict[str, Any] = {}
            if store == "s3":
                server, proxy, options = s3_endpoint()
            modes = ["carried"] + ([] if args.no_before else ["staged"]) if store == "s3" else ["staged"]
            for writers in args.writers:
                base = f"s3://{BUCKET}/w{writers}" if store == "s3" else os.path.join(tmp, f"w{writers}")
                limit = ceiling(files, writers, f"{base}/ceiling", options)
                for mode in modes:
                    if proxy:
                        proxy.kinds.clear()
                    seconds = committed(files, writers, f"{base}/{mode}", options, mode)
                    kinds = dict(proxy.kinds) if proxy else {}
                    rows_out.append(row(store, writers, mode, args, seconds, limit, kinds))
                    print(rows_out[-1]["line"], flush=True)
                if store == "local":
                    shutil.rmtree(base, ignore_errors=True)
    finally:
        if proxy:
            proxy.stop()
        if server:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    print()
    print("| store | writers | path | files/s | rows/s | ceiling files/s | of the ceiling | requests a file |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(r["line"])


def row(store, writers, mode, args, seconds, limit, kinds) -> Dict[str, Any]:
    rate, top = args.files / seconds, args.files / limit
    per = sum(kinds.values()) / args.files if kinds else 0.0
    detail = ", ".join(f"{k} {v / args.files:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    name = {"carried": "bytes in the call, one PUT", "staged": "staged, then linked" if store == "local"
            else "staged copy (before)"}[mode]
    requests = f"{per:.2f} ({detail})" if kinds else "-"
    line = (f"| {store} | {writers} | {name} | {rate:.1f} | {rate * args.rows:,.0f} | {top:.1f} | "
            f"{rate / top:.2f} | {requests} |")
    return {"line": line}


if __name__ == "__main__":
    main()
