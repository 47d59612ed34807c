"""The similarity index on synthetic tables: recall@10 against exact search, query latency, build
time and peak memory, and dedup's time, precision and recall on planted near-duplicates.

    .venv/bin/python bench/index.py --rows 1000000            # the issue's case: 1M random unit vectors, D=512
    .venv/bin/python bench/index.py --rows 100000 --kinds ivf hnsw
    .venv/bin/python bench/index.py --rows 1000000 --clusters 1000 --no-dedup   # clustered, as embeddings are

Each step (write the table, build, query, dedup) runs in its own process; its peak resident memory
is that process's ru_maxrss (os.wait4), which counts faiss's own allocations. Tables go under
bench/out/index/ (git-ignored) and are reused when present with the same shape.

Tables: random unit vectors (float16, as featurize writes them) in 50k-row files. The dedup table
adds planted near-duplicates: copies of random rows plus noise, cosine ~0.97-0.99 to their source.
Queries are fresh random unit vectors (not rows of the table); exact search is faiss's flat
search over the same float16 values.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
FILE_ROWS, CHUNK = 50_000, 50_000


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


SPREAD = 0.5  # --clusters: a point's distance from its cluster's centre, against the centres' ~1.4


def points(rng, n, d, clusters=0):
    """n unit vectors: uniform on the sphere, or (clusters > 0) around `clusters` fixed random centres,
    a shape closer to real embeddings (classes, near-identical scenes) than the uniform worst case."""
    if not clusters:
        return unit(rng, n, d)
    centres = unit(np.random.default_rng(12345), clusters, d)
    x = centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, d), dtype=np.float32) * (SPREAD / d ** 0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def table_vectors(rows, dim, dups, start, stop, clusters=0):
    """Rows start..stop of the synthetic table (deterministic per 50k chunk). With dups, the last
    `dups` rows of each chunk are near copies of earlier rows of that chunk."""
    out = []
    for c in range(start // CHUNK, (stop - 1) // CHUNK + 1):
        n = min(CHUNK, rows - c * CHUNK)
        rng = np.random.default_rng(c)
        x = points(rng, n, dim, clusters)
        if dups:
            src = rng.choice(n - dups, dups, replace=False)
            noise = rng.standard_normal((dups, dim), dtype=np.float32) * rng.uniform(0.004, 0.008, (dups, 1))
            x[n - dups:] = x[src] + noise
            x[n - dups:] /= np.linalg.norm(x[n - dups:], axis=1, keepdims=True)
        out.append(x[max(0, start - c * CHUNK): stop - c * CHUNK])
    return np.concatenate(out)


def planted_pairs(rows, dim, dups, clusters=0):
    pairs = set()
    for c in range(0, (rows - 1) // CHUNK + 1):
        n = min(CHUNK, rows - c * CHUNK)
        rng = np.random.default_rng(c)
        points(rng, n, dim, clusters)  # the same draws as table_vectors, to reach the same choice
        src = rng.choice(n - dups, dups, replace=False)
        for k, s in enumerate(src):
            pairs.add((c * CHUNK + int(s), c * CHUNK + n - dups + k))
    return pairs


def step_write(a):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(a.table, "features", "split_dir=train")
    os.makedirs(folder, exist_ok=True)
    for f, start in enumerate(range(0, a.rows, FILE_ROWS)):
        stop = min(a.rows, start + FILE_ROWS)
        x = table_vectors(a.rows, a.dim, a.dups, start, stop, a.clusters).astype(np.float16)
        ids = [f"r{i:08d}" for i in range(start, stop)]
        t = pa.table({"sample_id": ids, "uri": [f"file:///synthetic/{i}" for i in ids],
                      "label": [str(i % 1000) for i in range(start, stop)], "split": ["train"] * (stop - start),
                      "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), a.dim)})
        pq.write_table(t, os.path.join(folder, f"part-{f:05d}.parquet"), compression="none")
    with open(os.path.join(a.table, "_job.json"), "w") as fh:
        json.dump({"name": "bench-index", "status": "complete", "rows": a.rows, "dim": a.dim, "dups": a.dups,
                   "clusters": a.clusters}, fh)
    return {}


def step_build(a):
    from pipeline.index import build_index

    t0 = time.time()
    meta = build_index(a.table, kind=a.kind)
    return {"build_s": round(time.time() - t0, 1), "kind": meta["kind"], "params": meta["params"],
            "search": meta["search"], "stated_recall": (meta["recall"] or {}).get("value", 1.0)}


def step_query(a):
    import faiss

    from pipeline.index import open_index

    t0 = time.time()
    index = open_index(a.table)
    load_s = time.time() - t0
    q = points(np.random.default_rng(99), a.queries, a.dim, a.clusters)
    got, lat = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        hits = index.search(q[i:i + 1], 10)[0]
        lat.append((time.perf_counter() - t) * 1000)
        got.append([int(h["sample_id"][1:]) for h in hits])
    t = time.perf_counter()
    index.search(q, 10)
    batch_ms = (time.perf_counter() - t) * 1000 / len(q)
    heap = faiss.ResultHeap(len(q), 10, keep_max=True)
    for start in range(0, a.rows, CHUNK):
        x = table_vectors(a.rows, a.dim, a.dups, start, min(a.rows, start + CHUNK), a.clusters).astype(np.float16)
        x = x.astype(np.float32)
        faiss.normalize_L2(x)
        d, i = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, i + start)
    heap.finalize()
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, heap.I.tolist())])
    return {"recall_at_10": round(float(recall), 4), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "batched_ms_per_query": round(batch_ms, 3),
            "load_s": round(load_s, 1)}


def step_dedup(a):
    from pipeline.index import find_duplicates

    t0 = time.time()
    groups = find_duplicates(a.table, threshold=a.threshold)
    took = time.time() - t0
    found = set()
    members = {}
    for g, sid in zip(groups["group"].to_pylist(), groups["sample_id"].to_pylist()):
        members.setdefault(g, []).append(int(sid[1:]))
    for m in members.values():
        found |= {(min(i, j), max(i, j)) for i in m for j in m if i < j}
    truth = planted_pairs(a.rows, a.dim, a.dups, a.clusters)
    hit = len(found & truth)
    return {"dedup_s": round(took, 1), "groups": len(members), "rows_in_groups": len(groups),
            "planted_pairs": len(truth), "found_pairs": len(found),
            "precision": round(hit / max(len(found), 1), 4), "recall": round(hit / max(len(truth), 1), 4)}


STEPS = {"write": step_write, "build": step_build, "query": step_query, "dedup": step_dedup}


def run_step(step, a, **extra):
    """One step in a fresh process: (its JSON result, peak RSS in GB, wall seconds)."""
    argv = [sys.executable, __file__, "--step", step, "--rows", str(a.rows), "--dim", str(a.dim),
            "--dups", str(extra.get("dups", 0)), "--table", extra["table"], "--kind", extra.get("kind", "auto"),
            "--queries", str(a.queries), "--threshold", str(a.threshold), "--clusters", str(a.clusters)]
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"step {step} failed ({status})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {**result, "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2), "wall_s": round(time.time() - t0, 1)}


def table_path(a, dups):
    shape = f"t{a.rows}x{a.dim}{f'-c{a.clusters}' if a.clusters else ''}"
    return os.path.join(a.work, f"{shape}{'-dups' if dups else ''}")


def ensure_table(a, dups):
    path = table_path(a, dups)
    if not os.path.exists(os.path.join(path, "_job.json")):
        print(json.dumps({"write": path, **run_step("write", a, table=path, dups=dups)}), flush=True)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", nargs="+", default=["auto"], help="auto, flat, ivf, hnsw")
    p.add_argument("--clusters", type=int, default=0,
                   help="vectors around this many random centres (0: uniform on the sphere, the worst case)")
    p.add_argument("--dups", type=int, default=1000, help="planted near-duplicates per 50k rows (dedup table)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--one-table", action="store_true",
                   help="recall, latency and dedup on the table with planted duplicates (one build, not two)")
    p.add_argument("--work", default=os.path.join(HERE, "out", "index"))
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="auto", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step:
        print(json.dumps(STEPS[a.step](a)))
        return
    table = ensure_table(a, a.dups if a.one_table else 0)
    for kind in a.kinds:
        build = run_step("build", a, table=table, kind=kind)
        print(json.dumps({"rows": a.rows, "dim": a.dim, "build": build}), flush=True)
        query = run_step("query", a, table=table, dups=a.dups if a.one_table else 0)
        print(json.dumps({"rows": a.rows, "kind": build["kind"], "query": query}), flush=True)
    if not a.no_dedup and not a.one_table:
        table = ensure_table(a, a.dups)
        build = run_step("build", a, table=table, kind=a.kinds[-1])
        print(json.dumps({"rows": a.rows, "dups_table_build": build}), flush=True)
    if not a.no_dedup:
        print(json.dumps({"rows": a.rows, "dedup": run_step("dedup", a, table=table, dups=a.dups)}), flush=True)


if __name__ == "__main__":
    main()
