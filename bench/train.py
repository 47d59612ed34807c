"""Training and apply throughput on CPU: samples/s per epoch for each head, and apply's rows/s
against the loader's on the same table.

    .venv/bin/python bench/train.py [--rows 20000] [--clips 4000] [--dim 512] [--frames 16] [--epochs 3]

Generates two tables in a run's layout under bench/out/train/ (once): `feature` vectors (rows x
dim, float16) and `frame_features` clips (clips x frames x dim, float16), labels in 10 classes.
Each head trains `--epochs` epochs through `featurize train`'s code (Ray Train, one CPU worker, the
table cached in Ray's object store as it is under data.cache); the figure is the mean of the
epochs after the first (the first includes Ray Data's start), with the whole command's wall time
beside it. Then a linear head is applied to the vector table (`featurize apply`), and the same
table is read through FeatureDataset (the loader a training loop would use), both in rows/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from tables import write_table  # noqa: E402

OUT = os.path.join(HERE, "out", "train")
HEADS = [("linear", "feature", {}), ("mlp", "feature", {"hidden": 256}), ("autoencoder", "feature", {"code_dim": 64}),
         ("lstm", "frame_features", {"hidden": 256}), ("attention", "frame_features", {"hidden": 256})]


def tables(rows: int, clips: int, dim: int, frames: int):
    rng = np.random.default_rng(0)
    vec, seq = os.path.join(OUT, f"vectors-{rows}x{dim}"), os.path.join(OUT, f"clips-{clips}x{frames}x{dim}")
    if not os.path.exists(vec):
        labels = [f"c{i % 10}" for i in range(rows)]
        write_table(vec, ["train" if i % 5 else "test" for i in range(rows)], labels,
                    feature=rng.normal(size=(rows, dim)).astype(np.float32), rows_per_file=2000)
    if not os.path.exists(seq):
        labels = [f"c{i % 10}" for i in range(clips)]
        x = rng.normal(size=(clips, frames, dim)).astype(np.float32)
        write_table(seq, ["train" if i % 5 else "test" for i in range(clips)], labels, frames=x, rows_per_file=500)
    return vec, seq


def bench_head(kind: str, column: str, head: dict, uri: str, epochs: int):
    from pipeline.train.loop import train
    from pipeline.train.trainfile import parse_training

    out = os.path.join(OUT, f"head-{kind}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = parse_training({"name": f"bench-{kind}", "data": {"uri": uri, "column": column, "val_split": "test"},
                          "head": {"kind": kind, **head}, "train": {"epochs": epochs, "batch_size": 256},
                          "output": {"uri": out}})
    t = time.time()
    result = train(cfg, say=lambda line: None)
    wall = time.time() - t
    steady = [m["samples_per_s"] for m in result.metrics[1:]] or [result.metrics[0]["samples_per_s"]]
    return float(np.mean(steady)), wall, result.metrics[-1]


def bench_apply(vec: str):
    from torch.utils.data import DataLoader

    from pipeline.train.apply import apply_head
    from pipeline.train.loader import FeatureDataset

    out = os.path.join(OUT, "applied")
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    summary = apply_head(os.path.join(OUT, "head-linear"), vec, out)
    apply_wall = time.time() - t
    t = time.time()
    rows = sum(len(b["y"]) for b in DataLoader(FeatureDataset(vec, "feature", batch_size=1024), batch_size=None))
    loader_s = time.time() - t
    return summary, apply_wall, rows / loader_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--clips", type=int, default=4000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--apply-rows", type=int, default=200000, help="rows of the table apply and the loader read")
    p.add_argument("--only", choices=["train", "apply"], default=None)
    args = p.parse_args()
    vec, seq = tables(args.rows, args.clips, args.dim, args.frames)
    from pipeline.jobrun import init_ray

    init_ray(None)
    if args.only != "apply":
        train_heads(args, vec, seq)
    if not os.path.exists(os.path.join(OUT, "head-linear", "config.json")):
        bench_head("linear", "feature", {}, vec, 1)
    if args.only != "train":
        summary, wall, loader_rate = bench_apply(tables(args.apply_rows, args.clips, args.dim, args.frames)[0])
        print(f"\napply (linear, {summary.samples} rows): {summary.samples / summary.wall_s:,.0f} rows/s over "
              f"{summary.wall_s:.1f} s of execution ({wall:.1f} s with planning and start), "
              f"{summary.steady_throughput:,.0f} rows/s after its first commit ({summary.first_commit_s:.1f} s); "
              f"loader (FeatureDataset, same table): {loader_rate:,.0f} rows/s")


def train_heads(args, vec: str, seq: str) -> None:
    print("| head | column | rows (train) | samples/s per epoch | wall (all epochs, start-up included) |")
    print("|---|---|---|---|---|")
    for kind, column, head in HEADS:
        rate, wall, last = bench_head(kind, column, head, vec if column == "feature" else seq, args.epochs)
        n = int(0.8 * (args.rows if column == "feature" else args.clips))
        print(f"| {kind} | {column} | {n} | {rate:,.0f} | {wall:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
