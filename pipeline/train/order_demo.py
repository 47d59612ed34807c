"""The end of `featurize demo`: frames in, a trained LSTM head and a new table out, and the proof
that it earned its place: on held-out clips whose class is the order of two events, the trained
LSTM's clip features separate the classes while the mean over frames stays at chance."""
from __future__ import annotations

import os
from typing import Callable, Dict, List

from ..config import load_job
from .probe import centroid_accuracy
from .trainfile import load_training


def order_loop(job_path: str, train_path: str, data: str, videos: int, run: Callable, say: Callable[[str], None],
               overrides: List[str] = ()) -> Dict[str, float]:
    """Generate the clips into `data`, extract (via `run`, the CLI's job runner), train, apply, and
    return the held-out accuracy of each clip feature. Outputs go where the two files say."""
    from ..samples import make_order_videos
    from .apply import apply_head
    from .loop import train

    info = make_order_videos(data, n=videos)
    say(f"sample data  {data}: {info['videos']} clips, 2 classes told apart only by the order of two shapes")
    job = load_job(job_path)
    splits = [f"source.split_files.{s}={os.path.abspath(p)}" for s, p in info["split_files"].items()]
    run(job_path, [f"source.uri={data}", *splits])
    cfg = load_training(train_path, [f"data.uri={job.output.uri}", *overrides])
    say(f"\ntraining     {cfg.head.kind} on {cfg.data.column} of {cfg.data.uri}, {cfg.train.epochs} epochs")
    from .summary import format_training

    say(format_training(cfg, train(cfg, say=say)))
    applied = f"{cfg.output.uri.rstrip('/')}-applied"
    say(f"applying     {cfg.output.uri} to {job.output.uri} -> {applied}")
    apply_head(cfg.output.uri, job.output.uri, applied, name=cfg.head.kind)
    return {"mean": centroid_accuracy(job.output.uri, "clip_mean"),
            cfg.head.kind: centroid_accuracy(applied, f"clip_{cfg.head.kind}")}
