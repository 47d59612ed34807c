"""Image benchmark: the model alone on pre-decoded tensors (the ceiling) vs the whole pipeline.

    .venv/bin/python bench/images.py [--images 2000] [--arch resnet18] [--crop 112 224]

Generates JPEGs of ImageNet-like sizes (500x375) once under bench/out/, then in one run times
the model alone (Embedder.embed on uint8 batches already in memory, all cores) and the
pipeline from JPEG files to committed Parquet on an embedded local Ray. Prints images/s and the
ratio for the whole execution (actor start and model load included; planning and Ray start
excluded, reported apart) and at steady state (between the first and the last commit; flattered
by whatever decoding ran ahead while the actor started, so use enough images).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ModelConfig, parse_job  # noqa: E402
from pipeline.extract.decode import ImageSpec, decode_image  # noqa: E402
from pipeline.models.actor import Embedder, EmbedSpec  # noqa: E402
from pipeline.models.base import feature_dim, resolve  # noqa: E402
from pipeline.samples import photo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_jpegs(root: str, n: int) -> list:
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(root, f"c{i % 10}", f"{i:06d}.jpg")
        paths.append(path)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            photo(500, 375, seed=i).save(path, quality=90)
    return paths


def family_arch(arch: str):
    """`timm/convnext_tiny` -> ("timm", "convnext_tiny"); a bare name is torchvision's."""
    family, _, name = arch.rpartition("/")
    return family or "torchvision", name


def model_alone(arch: str, crop: int, paths: list, batch: int, seconds: float = 8.0) -> float:
    """The ceiling: the same embedder on uint8 batches already in memory, all cores, ~`seconds` long."""
    spec = ImageSpec(resize=int(crop * 256 / 224), crop=crop)
    pixels = np.stack([decode_image(open(p, "rb").read(), spec)[0] for p in paths[: batch * 8]])
    family, name = family_arch(arch)
    cfg = ModelConfig(arch=name, family=family, weights="none")
    embedder = Embedder(EmbedSpec(cfg, resolve(cfg), crop, feature_dim(cfg, crop), MEAN, STD,
                                     torch_threads=os.cpu_count() or 1))
    embedder.embed(pixels[:batch])  # warm-up
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        i = (done % len(pixels)) // batch * batch
        embedder.embed(pixels[i : i + batch])
        done += batch
    return done / (time.perf_counter() - t)


def pipeline(arch: str, crop: int, root: str, n: int, batch: int, overrides: list) -> dict:
    from pipeline.extract.runner import run_job

    family, name = family_arch(arch)
    out = os.path.join(HERE, "out", f"run-{family}-{name}-{crop}")
    shutil.rmtree(out, ignore_errors=True)
    job = parse_job({
        "name": f"bench-{family}-{name}-{crop}",
        "source": {"uri": root, "split": "bench"},
        # torchvision: resize 256/224 of the crop; other families: the model's own preprocessing at that crop
        "preprocess": {"resize": int(crop * 256 / 224), "crop": crop} if family == "torchvision" else {"crop": crop},
        "model": {"arch": name, "family": family, "weights": "none"},
        "output": {"uri": out},
        "resources": {"batch_size": batch},
    }, overrides)
    summary = run_job(job)
    assert summary.features == n, summary
    return {"steady": summary.steady_throughput, "execution": summary.throughput,
            "startup_s": summary.startup_s, "first_commit_s": summary.first_commit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--crop", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a job override for the pipeline run, as in featurize run")
    args = parser.parse_args()
    root = os.path.join(HERE, "out", f"jpegs-{args.images}")
    paths = make_jpegs(root, args.images)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {args.images} JPEGs 500x375, {args.arch}")
    print(f"{'crop':>5} {'model alone':>12} {'pipeline':>10} {'ratio':>6} {'steady':>10} {'ratio':>6} "
          f"{'Ray start':>9} {'1st commit':>10}")
    for crop in args.crop:
        # The machine's speed drifts (shared hosts): measure the ceiling before and after the run.
        before = model_alone(args.arch, crop, paths, args.batch)
        run = pipeline(args.arch, crop, root, len(paths), args.batch, args.overrides)
        ceiling = (before + model_alone(args.arch, crop, paths, args.batch)) / 2
        print(f"{crop:>5} {ceiling:>10.1f}/s {run['execution']:>8.1f}/s {run['execution'] / ceiling:>6.2f} "
              f"{run['steady']:>8.1f}/s {run['steady'] / ceiling:>6.2f} {run['startup_s']:>8.1f}s "
              f"{run['first_commit_s']:>9.1f}s", flush=True)


if __name__ == "__main__":
    main()
