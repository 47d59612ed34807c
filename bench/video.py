"""Video benchmark: decoding alone, the models alone, and the whole pipeline, side by side.

    .venv/bin/python bench/video.py [--clips 120] [--frames 16]

UCF101-like clips (320x240, 25 fps, 7 s, MPEG-4 Part 2 in AVI) are generated once under
bench/out/. Decoding alone: `decode_video` on every clip, in one process per core. Models alone:
ResNet-18 at crop 112 on the clips' frames already decoded, then an LSTM head, all cores. The
pipeline: the whole job on an embedded local Ray (whole execution, and between the first and
last commit). Prints clips/s and the pipeline's ratio to the slower of the two.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
