"""Planning on the driver: time and memory to plan a large local folder and a manifest, and to
turn the plan into the run's todo.

    .venv/bin/python bench/plan.py [--files 1281167] [--kinds folder manifest] [--repo PATH ...]
                                   [--python-peak] [--audit]

Makes an ImageNet-shaped source under --scratch (1,000 class folders of empty `.JPEG` files, only
when the folder kind is asked for, and a Parquet manifest of the same relative paths with a
`label` column, beside them), then, for each checkout in --repo (default: this one), plans each
kind in a fresh Python process. A checkout whose plan streams (`plan.write_plan`): the plan
listed and sorted out of core into a local file (`write_plan`), saved to OUT (`root.save_plan`)
and taken back (`root.local_plan`), the todo of a fresh run (`root.todo_of`), the files Ray Data
reads it from (`planfile.read_task_files`, 256-row read tasks), and the todo of a resumed run with
every other sample committed (in 1,000-row files under OUT/features). An older checkout:
`plan_source` in memory, `saved_plan`+`parquet_bytes`, `load_plan`, and its fresh todo.
Each step reports its wall time, and the process's peak RSS (`resource.getrusage` maxrss) and
RSS after it, both above its RSS before planning; with --python-peak a second process per kind
runs the planning under tracemalloc for Python's own peak (tracemalloc slows Python, so its time
is not reported). Arrow's peak is the default memory pool's `max_memory()` (DuckDB's memory is
its own: in the RSS only). With --audit, a fresh process then audits that resumed output as a
run's end does (`ledger.audit` against the saved plan: half the samples missing), its own peak
RSS reported.
The scratch folder is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_source(root: str, files: int, folder: bool, classes: int = 1000, chunk: int = 1_000_000) -> None:
    """`root/train/<class>/<class>_<i>.JPEG` (empty; when `folder`) and `root/manifest.parquet`
    naming them, a million rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    make_files = folder and not os.path.isdir(f"{root}/train")
    for c in range(classes if make_files else 0):
        os.makedirs(f"{root}/train/n{c:08d}")
    schema = pa.schema([("uri", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(f"{root}/manifest.parquet", schema) as manifest:
        for start in range(0, files, chunk):
            rel = [f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG" for i in range(start, min(files, start + chunk))]
            for r in rel if make_files else []:
                os.close(os.open(f"{root}/train/{r}", os.O_CREAT | os.O_WRONLY, 0o644))
            manifest.write_table(pa.table({"uri": [f"train/{r}" for r in rel],
                                           "label": [r.split("/", 1)[0] for r in rel]}, schema=schema))


def child(kind: str, root: str, trace: bool) -> dict:
    """One kind planned in this (fresh) process; run with the checkout's root first on sys.path."""
    import gc
    import resource
    import tracemalloc

    import pyarrow as pa

    from pipeline.config import SourceConfig
    from pipeline.extract.plan import plan_source
    from pipeline.output import root as out_root
    from pipeline.output.store import parquet_bytes
    from pipeline.redact import saved_plan

    cfg = (SourceConfig(uri=f"{root}/train", format="image_folder") if kind == "folder"
           else SourceConfig(uri=f"{root}/manifest.parquet", format="manifest"))
    gc.collect()
    rss0 = _rss()
    if kind == "audit":  # the end of a run's audit, alone in its process, of the output the last kind left
        return _audit(root, rss0)
    pool = pa.default_memory_pool()
    out = {"kind": kind, "rss_before_mb": rss0 / 2**20}
    from pipeline.extract import plan as planning

    streams = hasattr(planning, "write_plan")
    if trace:
        tracemalloc.start()
        rows = len(planning.write_plan(cfg, _fresh(f"{root}/work")) if streams else plan_source(cfg))
        return {**out, "rows": rows, "python_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}

    def step(name, fn):
        t = time.perf_counter()
        value = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out[name] = {"s": round(time.perf_counter() - t, 2), "peak_rss_mb": round((peak - rss0) / 2**20),
                     "rss_mb": round((_rss() - rss0) / 2**20),
                     "arrow_peak_mb": round(pool.max_memory() / 2**20)}
        return value

    os.makedirs(f"{root}/out", exist_ok=True)
    if streams:
        return _streamed(out, step, cfg, root)
    plan = step("plan_source", lambda: plan_source(cfg))
    out["rows"], out["plan_mb"] = len(plan), round(plan.nbytes / 2**20)
    saved = step("save", lambda: _save(parquet_bytes(saved_plan(plan)), f"{root}/out/_plan.parquet"))
    out["plan_file_mb"] = round(saved / 2**20)
    del plan
    plan = step("load_plan", lambda: out_root.load_plan(_local(), f"{root}/out"))
    step("todo", lambda: _todo(out_root, plan, f"{root}/out"))
    return out


def _streamed(out: dict, step, cfg, root: str) -> dict:
    """The steps of a checkout whose plan stays on disk (plan.write_plan)."""
    from pipeline.extract.plan import write_plan
    from pipeline.extract.planfile import read_task_files
    from pipeline.output import root as out_root

    fs, work, dest = _local(), _fresh(f"{root}/work"), _fresh(f"{root}/out")
    plan = step("write_plan", lambda: write_plan(cfg, work))
    out["rows"], out["plan_file_mb"] = len(plan), round(os.path.getsize(plan.path) / 2**20)
    step("save_plan", lambda: out_root.save_plan(fs, dest, plan))
    plan = step("local_plan", lambda: out_root.local_plan(fs, dest, work))
    todo = step("todo", lambda: out_root.todo_of(fs, dest, plan, work)[0])
    files = step("read_task_files", lambda: read_task_files(todo, 256, f"{work}/read"))
    out["read_files"] = len(files)
    _commit_every_other(plan, f"{dest}/features")
    todo = step("todo_resumed", lambda: out_root.todo_of(fs, dest, plan, work)[0])
    out["todo_resumed_rows"] = len(todo)
    return out


def _audit(root: str, rss0: int) -> dict:
    import resource

    from pipeline.output import root as out_root
    from pipeline.output.ledger import audit

    t = time.perf_counter()
    found = audit(_local(), f"{root}/out", out_root.local_plan(_local(), f"{root}/out", _fresh(f"{root}/work")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": "audit", "s": round(time.perf_counter() - t, 2), "peak_rss_mb": round((peak - rss0) / 2**20),
            "missing": found["missing"], "rows": found["rows"], "duplicates": len(found["duplicates"])}


def _commit_every_other(plan, folder: str, per_file: int = 1000) -> None:
    """OUT/features as a run that committed every other planned sample leaves it (ids only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    n = 0
    for batch in plan.batches(["sample_id"]):
        ids = batch.column(0).take(pa.array(range(0, batch.num_rows, 2)))
        for i in range(0, len(ids), per_file):
            pq.write_table(pa.table({"sample_id": ids.slice(i, per_file)}), f"{folder}/part-{n:07d}.parquet")
            n += 1


def _fresh(folder: str) -> str:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def _todo(out_root, plan, root: str):
    """A fresh run's todo, as root._ready makes it (todo_of; a checkout before it had none)."""
    from pipeline.output.ledger import remaining

    if hasattr(out_root, "todo_of"):
        return out_root.todo_of(_local(), root, plan, set(), set())
    return out_root._with_attempts(_local(), root, out_root._with_skip(remaining(plan, set(), set()), set()))


def _save(data: bytes, path: str) -> int:
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _local():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(repo: str, kind: str, root: str, trace: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--scratch", root]
    cmd += ["--trace"] if trace else []
    done = subprocess.run(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{repo} {kind}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_281_167)
    parser.add_argument("--kinds", nargs="+", default=["folder", "manifest"], choices=["folder", "manifest"])
    parser.add_argument("--repo", nargs="+", default=[HERE], help="checkouts whose pipeline/ is planned with")
    parser.add_argument("--scratch", default="/tmp/featurize-plan-bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated source")
    parser.add_argument("--python-peak", action="store_true", help="also plan under tracemalloc")
    parser.add_argument("--audit", action="store_true",
                        help="then audit each kind's output (every other sample committed) in a fresh process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.scratch, args.trace)))
        return
    t = time.time()
    make_source(args.scratch, args.files, folder="folder" in args.kinds)
    print(f"source: {args.files} files under {args.scratch} ({time.time() - t:.0f} s)", flush=True)
    try:
        for repo in args.repo:
            for kind in args.kinds:
                result = run_child(repo, kind, args.scratch, trace=False)
                if args.python_peak:
                    result["python_peak_mb"] = round(run_child(repo, kind, args.scratch, trace=True)["python_peak_mb"])
                print(json.dumps({"repo": repo, **result}), flush=True)
                if args.audit and "todo_resumed" in result:
                    print(json.dumps({"repo": repo, **run_child(repo, "audit", args.scratch, trace=False)}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
