"""Peak memory of decoding one long video: a 60 s 1080p H.264 video, and a 10-minute one.

    .venv/bin/python bench/video_memory.py            # both parts
    .venv/bin/python bench/video_memory.py --windows  # the windowed part only

Each decode runs in a fresh process (as the pipeline's isolated decoder does) and reports its
peak RSS, for uniform sampling of 16 frames and for `all` frames capped by `max_frames`. The
bound should not depend on the video's length: frames are scaled by the decoder and at most
`max_frames` of them are kept.

`--windows`: a 2-minute and a 10-minute 160x120 video cut into 1 s windows of 16 frames, through
the decode stage itself (`decode_video_batch`, its isolated decoder process): the peak RSS of the
stage's process and of its decoder's, which should not grow with the number of windows either.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from multiprocessing import get_context

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import VideoConfig  # noqa: E402
from pipeline.extract.video import FrameSpec, decode_video  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def make_video(path: str, seconds: int, width: int, height: int, fps: int = 25) -> str:
    import av

    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    base = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for k in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.roll(base, k * 8, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode(path: str, cfg: VideoConfig) -> tuple:
    t = time.perf_counter()
    clips = decode_video(path, FrameSpec(resize=128, crop=112), cfg)
    frames = sum(len(c.pixels) for c in clips)
    return frames, clips[0].decoder, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage(path: str, cfg: VideoConfig, results) -> None:
    """decode_video_batch on one windowed video, its output batches consumed as Ray Data would:
    (windows, output batches, seconds, the stage's peak RSS, its decoder process's peak RSS) in MB."""
    from pipeline.extract import video

    row = {"sample_id": os.path.basename(path), "uri": path, "label": "a", "split": "all", "data": b"",
           "error_stage": "", "error_type": "", "error_message": ""}
    t = time.perf_counter()
    out = video.decode_video_batch({k: np.array([v], dtype=object) for k, v in row.items()},
                                   FrameSpec(resize=128, crop=112), cfg, windowed=True)
    windows = batches = 0
    for batch in [out] if isinstance(out, dict) else out:  # one dict before windows streamed
        windows, batches = windows + len(batch["sample_id"]), batches + 1
        del batch
    out = None
    with open(f"/proc/{video._DECODER._proc.pid}/status") as f:  # the decoder's VmHWM: its peak RSS
        child = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    video._DECODER.close()
    results.put((windows, batches, time.perf_counter() - t,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, child))


def windowed() -> None:
    cfg = VideoConfig(num_frames=16, window_s=1.0)
    ctx = get_context("spawn")
    for seconds in (120, 600):
        path = make_video(os.path.join(HERE, "out", f"long-160x120-{seconds}s.mp4"), seconds, 160, 120)
        results = ctx.Queue()
        proc = ctx.Process(target=_stage, args=(path, cfg, results))  # not a Pool's: it starts a decoder process
        proc.start()
        windows, batches, took, peak, child = results.get()
        proc.join()
        print(f"{seconds:4d} s 160x120 | 1 s windows, uniform 16 | {windows} windows in {batches} batches "
              f"in {took:5.1f} s | stage peak RSS {peak:6.0f} MB | decoder peak RSS {child:6.0f} MB", flush=True)


def main() -> None:
    if "--windows" in sys.argv:
        return windowed()
    videos = [("60 s 1080p", make_video(os.path.join(HERE, "out", "long-1080p-60s.mp4"), 60, 1920, 1080)),
              ("10 min 480p", make_video(os.path.join(HERE, "out", "long-480p-600s.mp4"), 600, 854, 480))]
    modes = [("uniform 16", VideoConfig(num_frames=16)),
             ("all, max_frames 512", VideoConfig(sampling="all", max_frames=512))]
    ctx = get_context("spawn")
    for name, path in videos:
        for label, cfg in modes:
            with ctx.Pool(1) as pool:  # a fresh process each time: its peak RSS is this decode's
                frames, decoder, seconds, peak = pool.apply(_decode, (path, cfg))
            print(f"{name:>12} ({os.path.getsize(path) / 1e6:6.1f} MB) | {label:<20} | {frames:4d} frames by {decoder} "
                  f"in {seconds:5.1f} s | peak RSS {peak:6.0f} MB", flush=True)
    windowed()


if __name__ == "__main__":
    main()
