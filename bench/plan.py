"""Planning on the driver: time and memory to plan a large local folder and a manifest, and to
turn the plan into the run's todo.

    .venv/bin/python bench/plan.py [--files 1281167] [--kinds folder manifest] [--repo PATH ...]

Makes an ImageNet-shaped source under --scratch (1,000 class folders of empty `.JPEG` files, and
a Parquet manifest of the same relative paths with a `label` column, beside them), then, for each
checkout in --repo (default: this one), plans each kind in a fresh Python process: `plan_source`,
the plan as OUT saves it (`saved_plan`, `parquet_bytes`) and read back (`load_plan`), and the
todo of a fresh run (`root.todo_of`, as `root._ready` makes it).
Each step reports its wall time, and the process's peak RSS (`resource.getrusage` maxrss) and
RSS after it, both above its RSS before planning; a second process per kind runs `plan_source` under tracemalloc for
Python's own peak (tracemalloc slows Python, so its time is not reported). Arrow's peak is the
default memory pool's `max_memory()`. The scratch folder is deleted at the end unless --keep.
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


def make_source(root: str, files: int, classes: int = 1000) -> None:
    """`root/train/<class>/<class>_<i>.JPEG` (empty) and `root/manifest.parquet` naming them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for i in range(files) for c in [i % classes]]
    if not os.path.isdir(f"{root}/train"):
        for c in range(classes):
            os.makedirs(f"{root}/train/n{c:08d}", exist_ok=True)
        for r in rel:
            os.close(os.open(f"{root}/train/{r}", os.O_CREAT | os.O_WRONLY, 0o644))
    labels = [r.split("/", 1)[0] for r in rel]
    pq.write_table(pa.table({"uri": [f"train/{r}" for r in rel], "label": labels}), f"{root}/manifest.parquet")


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
    pool = pa.default_memory_pool()
    out = {"kind": kind, "rss_before_mb": rss0 / 2**20}
    if trace:
        tracemalloc.start()
        rows = len(plan_source(cfg))
        return {**out, "rows": rows, "python_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}

    def step(name, fn):
        t = time.perf_counter()
        value = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out[name] = {"s": round(time.perf_counter() - t, 2), "peak_rss_mb": round((peak - rss0) / 2**20),
                     "rss_mb": round((_rss() - rss0) / 2**20),
                     "arrow_peak_mb": round(pool.max_memory() / 2**20)}
        return value

    plan = step("plan_source", lambda: plan_source(cfg))
    out["rows"], out["plan_mb"] = len(plan), round(plan.nbytes / 2**20)
    os.makedirs(f"{root}/out", exist_ok=True)
    saved = step("save", lambda: _save(parquet_bytes(saved_plan(plan)), f"{root}/out/_plan.parquet"))
    out["plan_file_mb"] = round(saved / 2**20)
    del plan
    plan = step("load_plan", lambda: out_root.load_plan(_local(), f"{root}/out"))
    step("todo", lambda: _todo(out_root, plan, f"{root}/out"))
    return out


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.scratch, args.trace)))
        return
    t = time.time()
    make_source(args.scratch, args.files)
    print(f"source: {args.files} files under {args.scratch} ({time.time() - t:.0f} s)", flush=True)
    try:
        for repo in args.repo:
            for kind in args.kinds:
                result = run_child(repo, kind, args.scratch, trace=False)
                result["python_peak_mb"] = round(run_child(repo, kind, args.scratch, trace=True)["python_peak_mb"])
                print(json.dumps({"repo": repo, **result}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
