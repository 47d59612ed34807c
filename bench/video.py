"""Video benchmark: decoding alone, the models alone, and the whole pipeline, side by side.

    .venv/bin/python bench/video.py [--clips 120] [--frames 16]
    .venv/bin/python bench/video.py --clip-models r2plus1d_18,s3d --clip-clips 8 --only-clip-models

UCF101-like clips (320x240, 25 fps, 7 s, MPEG-4 Part 2 in AVI) are generated once under
bench/out/. Decoding alone: `decode_video` on every clip, in one process per core. Models alone:
ResNet-18 at crop 112 on the clips' frames already decoded, then an LSTM head, all cores. The
pipeline: the whole job on an embedded local Ray (whole execution, and between the first and
last commit). Prints clips/s and the pipeline's ratio to the slower of the two.

`--clip-models`: clip models (model.family torchvision_video, weights none) on `--clip-clips` of
the same clips, each at its documented input (prepare.py resolves it: r2plus1d_18 16 frames of
128x171 cropped to 112, s3d 128 frames squashed to 256 and cropped to 224): the model alone
(`Embedder.embed` on the clips already decoded) against the pipeline's clip job (one clip per
video, no temporal heads), clips/s and their ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from multiprocessing import get_context

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ModelConfig, TemporalConfig, VideoConfig, parse_job  # noqa: E402
from pipeline.extract.prepare import prepare  # noqa: E402
from pipeline.extract.video import FrameSpec, decode_video  # noqa: E402
from pipeline.models.actor import Embedder, EmbedSpec  # noqa: E402
from pipeline.models.base import feature_dim, resolve  # noqa: E402
from pipeline.models.temporal import TemporalEmbedder, resolve_heads  # noqa: E402
from pipeline.samples import encode_video  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = FrameSpec(resize=128, crop=112)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LSTM = {"kind": "lstm", "name": "lstm", "allow_random_init": True, "hidden_size": 512}


def make_clips(root: str, n: int) -> list:
    paths = []
    for i in range(n):
        path = os.path.join(root, f"Class{i % 5}", f"v_Class{i % 5}_g{i:03d}_c01.avi")
        paths.append(path)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(encode_video(175))
    return paths


def _decode(args):
    path, frames = args
    return decode_video(path, SPEC, VideoConfig(num_frames=frames))[0].pixels


def decode_alone(paths: list, frames: int) -> tuple:
    t = time.perf_counter()
    with get_context("spawn").Pool(os.cpu_count()) as pool:
        clips = pool.map(_decode, [(p, frames) for p in paths], chunksize=4)
    return len(paths) / (time.perf_counter() - t), np.stack(clips)


def models_alone(clips: np.ndarray, batch_clips: int) -> float:
    cfg = ModelConfig(arch="resnet18", weights="none")
    dim = feature_dim(cfg, SPEC.crop)
    cnn = Embedder(EmbedSpec(cfg, resolve(cfg), SPEC.crop, dim, MEAN, STD, torch_threads=os.cpu_count() or 1))
    # torch's thread count is per process: the heads get every core too, as the CNN does
    heads = TemporalEmbedder(resolve_heads([TemporalConfig(**LSTM)], dim), dtype="float16",
                             torch_threads=os.cpu_count() or 1)
    n, frames = clips.shape[:2]
    cnn.embed(clips[:1].reshape(-1, *clips.shape[2:]))  # warm-up
    t = time.perf_counter()
    for i in range(0, n, batch_clips):
        part = clips[i : i + batch_clips]
        feats = cnn.embed(part.reshape(-1, *clips.shape[2:])).reshape(len(part), frames, -1)
        heads.clip_features(feats, np.full(len(part), frames))
    return n / (time.perf_counter() - t)


def pipeline(root: str, n: int, frames: int) -> dict:
    from pipeline.extract.runner import run_job

    out = os.path.join(HERE, "out", "run-video")
    shutil.rmtree(out, ignore_errors=True)
    job = parse_job({
        "name": "bench-video", "source": {"uri": root, "format": "video_folder", "split": "bench"},
        "preprocess": {"resize": SPEC.resize, "crop": SPEC.crop}, "video": {"num_frames": frames},
        "model": {"arch": "resnet18", "weights": "none"}, "temporal": [LSTM], "output": {"uri": out},
    })
    s = run_job(job)
    assert s.features == n, s
    return {"execution": s.throughput, "steady": s.steady_throughput, "startup": s.startup_s, "first": s.first_commit_s}


def clip_job(root: str, arch: str, out: str):
    return parse_job({"name": f"bench-{arch}", "source": {"uri": root, "format": "video_folder", "split": "bench"},
                      "model": {"family": "torchvision_video", "arch": arch, "weights": "none"},
                      "output": {"uri": out}})


def clip_model(root: str, paths: list, arch: str) -> dict:
    """One clip model: alone on the decoded clips, then the pipeline's job on the same videos."""
    from pipeline.extract.runner import run_job

    out = os.path.join(HERE, "out", f"run-{arch}")
    shutil.rmtree(out, ignore_errors=True)
    prepared = prepare(clip_job(root, arch, out))
    frames = prepared.job.video.num_frames
    clips = np.stack([decode_video(p, prepared.frames, prepared.job.video)[0].pixels for p in paths])
    model = Embedder(EmbedSpec(prepared.job.model, prepared.weights, prepared.image.crop, prepared.dim, prepared.mean,
                               prepared.std, torch_threads=os.cpu_count() or 1, clips=True))
    batch = max(1, 32 // frames)  # as runner.py batches clips: a batch of model inputs over the clip length
    model.embed(clips[:1])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(clips), batch):
        model.embed(clips[i : i + batch])
    alone = len(clips) / (time.perf_counter() - t)
    s = run_job(prepared.job)
    assert s.features == len(paths), s
    return {"arch": arch, "input": f"{frames}x{clips.shape[2]}", "alone": alone, "execution": s.throughput,
            "steady": s.steady_throughput, "startup": s.startup_s, "first": s.first_commit_s}


def clip_models(archs: list, n: int) -> None:
    root = os.path.join(HERE, "out", f"clips-{n}")
    paths = make_clips(root, n)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {n} clips 320x240 25 fps 7 s MPEG-4/AVI, "
          "clip models with random weights (weights: none)")
    for arch in archs:
        r = clip_model(root, paths, arch)
        print(f"{r['arch']} ({r['input']}) | model alone {r['alone']:.2f} clips/s | pipeline {r['execution']:.2f} "
              f"clips/s ({r['execution'] / r['alone']:.2f}), steady {r['steady']:.2f} ({r['steady'] / r['alone']:.2f}) "
              f"| Ray start {r['startup']:.1f} s, first commit {r['first']:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--clip-models", default="", help="comma-separated, e.g. r2plus1d_18,s3d")
    parser.add_argument("--clip-clips", type=int, default=16, help="clips for the clip models' rows")
    parser.add_argument("--only-clip-models", action="store_true", help="skip the ResNet-18 + LSTM rows")
    args = parser.parse_args()
    archs = [a for a in args.clip_models.split(",") if a]
    if args.only_clip_models:
        return clip_models(archs, args.clip_clips)
    root = os.path.join(HERE, "out", f"clips-{args.clips}")
    paths = make_clips(root, args.clips)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {args.clips} clips 320x240 25 fps 7 s MPEG-4/AVI, "
          f"{args.frames} frames at 112, ResNet-18 + LSTM")
    decode_rate, clips = decode_alone(paths, args.frames)
    model_rate = models_alone(clips, batch_clips=max(1, 32 // args.frames))
    run = pipeline(root, len(paths), args.frames)
    slower = min(decode_rate, model_rate)
    print(f"decode alone {decode_rate:.1f} clips/s | models alone {model_rate:.1f} clips/s | pipeline "
          f"{run['execution']:.1f} clips/s ({run['execution'] / slower:.2f} of the slower), steady "
          f"{run['steady']:.1f} ({run['steady'] / slower:.2f}) | Ray start {run['startup']:.1f} s, "
          f"first commit {run['first']:.1f} s")
    if archs:
        clip_models(archs, args.clip_clips)


if __name__ == "__main__":
    main()
