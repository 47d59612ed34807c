"""Video decoding: sampled frames at the model's input size, with decord and PyAV as fallback.

decord resizes inside the decoder, so a 4K or 1080p frame is never held at full size; frame
indices are chosen by the sampling mode from the container's frame count and fps and recorded as
timestamps. A file decord cannot read is tried once with PyAV, which scales each frame as it is
converted; the decoder used is returned with the frames. Both can hang or crash on hostile
files: `pipeline.extract.isolate` runs this module in a child process with a time limit.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import faults
from ..config import DEFAULT_NUM_FRAMES, VideoConfig
from ..errors import DecodeFailure
from ..rows import ERROR_COLUMNS, OK, PLAN_COLUMNS, SAMPLE_COLUMNS, error_fields, ragged
from ..timing import timed
from .geometry import crop_offsets, resized_size
from .isolate import DecoderUnavailable, IsolatedCall


@dataclass(frozen=True)
class FrameSpec:
    resize: int  # shorter side the decoder scales to
    crop: int  # then a center crop to crop x crop
    squash: bool = False  # both sides to `resize` (preprocess.resize_mode squash)
    size: Optional[Tuple[int, int]] = None  # (height, width) exactly, whatever the video's: Resize([128, 171])

    def scaled(self, width: int, height: int) -> Tuple[int, int]:
        """(width, height) the decoder scales a width x height video to."""
        return (self.size[1], self.size[0]) if self.size else scaled_size(width, height, self.resize, self.squash)


@dataclass
class Window:
    """One output row's frames: which frames of the video, and when."""

    index: int
    start_s: float
    end_s: float
    frames: np.ndarray  # frame indices to decode, len == num_frames asked (repeats when short)
    real_frames: int  # distinct frames behind them
    count: int = 1  # windows the video has


@dataclass
class Clip:
    window: Window
    pixels: np.ndarray  # (T, crop, crop, 3) uint8
    fps: float
    decoder: str


class VideoDecodeError(DecodeFailure):
    """A video neither decoder can read; the message says why."""


def plan_windows(total: int, fps: float, cfg: VideoConfig) -> List[Window]:
    """The windows of a video of `total` frames at `fps`, each with its sampled frame indices."""
    if total < 1 or not fps > 0:
        raise VideoDecodeError(f"no frames (frame count {total}, fps {fps})")
    duration = total / fps
    bounds = _window_bounds(duration, cfg)
    out = []
    for k, (start, end) in enumerate(bounds):
        first, last = int(round(start * fps)), min(total, max(int(round(end * fps)), int(round(start * fps)) + 1))
        frames = _sample(first, last, fps, cfg)
        out.append(Window(k, start, end, frames, int(len(np.unique(frames))), len(bounds)))
    return out


def _window_bounds(duration: float, cfg: VideoConfig) -> List[Tuple[float, float]]:
    if not cfg.window_s or duration <= cfg.window_s:
        return [(0.0, duration)]
    stride = cfg.stride_s or cfg.window_s
    count = int(math.floor((duration - cfg.window_s) / stride + 1e-9)) + 1
    return [(k * stride, k * stride + cfg.window_s) for k in range(count)]


def _sample(first: int, last: int, fps: float, cfg: VideoConfig) -> np.ndarray:
    """Frame indices in [first, last) for the sampling mode, at most cfg.max_frames of them."""
    count = last - first
    if cfg.sampling == "uniform":
        # Centres of num_frames equal segments; a short clip repeats frames.
        n = frames_per_clip(cfg)
        idx = first + ((np.arange(n) + 0.5) * count / n).astype(np.int64)
    elif cfg.sampling == "fps":
        idx = first + np.floor(np.arange(0, count, fps / cfg.fps)).astype(np.int64)
    elif cfg.sampling == "every":
        idx = np.arange(first, last, cfg.every, dtype=np.int64)
    else:  # all
        idx = np.arange(first, last, dtype=np.int64)
    idx = np.clip(idx, first, last - 1)
    if len(idx) > cfg.max_frames:  # the memory bound: spread max_frames over the same span
        idx = idx[np.linspace(0, len(idx) - 1, cfg.max_frames).round().astype(np.int64)]
    return idx


def frames_per_clip(cfg: VideoConfig) -> int:
    """video.num_frames; unset (a job resolves it in prepare.py), the per-frame default."""
    return cfg.num_frames or DEFAULT_NUM_FRAMES


def decode_video(source, spec: FrameSpec, cfg: VideoConfig) -> List[Clip]:
    """All windows of one video (a path or bytes): stream_video's clips in a list."""
    return list(stream_video(source, spec, cfg))


def stream_video(source, spec: FrameSpec, cfg: VideoConfig) -> Iterator[Clip]:
    """The windows of one video (a path or bytes) in order, one clip at a time, so that a long
    video's windows are never held at once. decord first; PyAV if decord cannot open the video
    (PyAV plans the windows again from its own probe), or from the window where decord failed on
    (decord's plan: the windows given already stay as they are)."""
    faults.point("decode", source if isinstance(source, str) else "")  # runs in the isolated child
    if isinstance(source, (bytes, bytearray)) and not source:
        raise VideoDecodeError("empty file (0 bytes)")
    given, plan = 0, None
    try:
        plan = _decord_plan(source, cfg)
        for clip in _decord_clips(source, spec, plan):
            yield clip
            given += 1
        return
    except Exception as e:  # decord's errors are plain RuntimeErrors (or worse): try PyAV
        first = e
    try:
        yield from _pyav_clips(source, spec, plan.after(given) if given else _pyav_plan(source, cfg))
    except Exception as second:
        raise VideoDecodeError(f"decord: {_short(first)}; pyav: {_short(second)}") from None


def import_decoders() -> None:
    """Imported by a new decoder process before its first file, so no file's limit pays for it."""
    import av  # noqa: F401
    import decord  # noqa: F401


def _short(exc: BaseException) -> str:
    text = (str(exc) or type(exc).__name__).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def scaled_size(width: int, height: int, resize: int, squash: bool = False) -> Tuple[int, int]:
    """(width, height) the decoder scales to: torchvision's Resize(resize) (geometry.py)."""
    return resized_size(width, height, resize, squash)


def center_crop(frames: np.ndarray, crop: int) -> np.ndarray:
    """torchvision's CenterCrop(crop) of (T, H, W, 3) frames: its offsets, rounded as it rounds."""
    h, w = frames.shape[1:3]
    left, top = crop_offsets(w, h, crop)
    return np.ascontiguousarray(frames[:, top : top + crop, left : left + crop])


def _open_source(source):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


@dataclass
class Plan:
    """One video's windows and what decoding them needs: its fps and size (width, height)."""

    windows: List[Window]
    fps: float
    size: Tuple[int, int]

    def after(self, given: int) -> "Plan":
        return Plan(self.windows[given:], self.fps, self.size)


def _decord_plan(source, cfg: VideoConfig) -> Plan:
    import decord

    probe = decord.VideoReader(_open_source(source), num_threads=1)
    height, width = probe[0].shape[:2] if len(probe) else (0, 0)
    total, fps = len(probe), float(probe.get_avg_fps())
    return Plan(plan_windows(total, fps, cfg), fps, (width, height))


def _decord_clips(source, spec: FrameSpec, plan: Plan) -> Iterator[Clip]:
    import decord

    w, h = spec.scaled(*plan.size)
    reader = decord.VideoReader(_open_source(source), width=w, height=h, num_threads=1)
    for window in plan.windows:
        frames = reader.get_batch(window.frames.tolist()).asnumpy()
        yield Clip(window, center_crop(frames, spec.crop), plan.fps, "decord")


def _decode_pyav(source, spec: FrameSpec, cfg: VideoConfig) -> List[Clip]:
    """All windows of one video by PyAV alone."""
    return list(_pyav_clips(source, spec, _pyav_plan(source, cfg)))


def _pyav_plan(source, cfg: VideoConfig) -> Plan:
    total, fps, size = _pyav_probe(source)
    return Plan(plan_windows(total, fps, cfg), fps, size)


def _pyav_clips(source, spec: FrameSpec, plan: Plan) -> Iterator[Clip]:
    """The windows' clips in order, decoding the video once: a window is given as soon as its last
    frame is decoded, and only the frames of windows not given yet are kept (scaled as they are
    converted). Frames past the video's real end (a header's count too high) repeat the last one."""
    import av

    w, h = spec.scaled(*plan.size)
    pending = list(plan.windows)
    wanted = {int(i) for wdw in pending for i in wdw.frames}
    kept: Dict[int, np.ndarray] = {}
    last = None
    with av.open(_open_source(source)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = last = frame.to_ndarray(format="rgb24", width=w, height=h)
            while pending and i >= pending[0].frames.max():
                yield _pyav_clip(pending.pop(0), kept, last, spec, plan.fps)
                first = min((int(p.frames.min()) for p in pending), default=i + 1)
                kept = {k: v for k, v in kept.items() if k >= first}
            if not pending:
                break
    if last is None:
        raise VideoDecodeError("no frame could be decoded")
    for wdw in pending:
        yield _pyav_clip(wdw, kept, last, spec, plan.fps)


def _pyav_clip(wdw: Window, kept: Dict[int, np.ndarray], last: np.ndarray, spec: FrameSpec, fps: float) -> Clip:
    return Clip(wdw, center_crop(np.stack([kept.get(int(i), last) for i in wdw.frames]), spec.crop), fps, "pyav")


def _pyav_probe(source) -> Tuple[int, float, Tuple[int, int]]:
    """Frame count (by counting packets when the header has none), fps and size."""
    import av

    with av.open(_open_source(source)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        size = (stream.codec_context.width, stream.codec_context.height)
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    return int(total), fps, size



# ---------------------------------------------------------------- the Ray Data stage

_DECODER = None  # one isolated decoder process per Ray worker, reused across batches
BATCH_BYTES = 64 << 20  # an output batch's frames, at most (and at least one row): the stage's memory bound


@timed("decode")
def decode_video_batch(
    batch: Dict[str, np.ndarray], spec: FrameSpec, cfg: VideoConfig, windowed: bool, batch_bytes: int = BATCH_BYTES
) -> Iterator[Dict[str, np.ndarray]]:
    """Ray Data map_batches generator: one input row per video -> one output row per window.

    Each video is decoded in the isolated child with `cfg.decode_timeout_s` (for all its windows);
    a timeout, a crash or an unreadable file becomes that video's error row, or, once some of its
    windows are out, one error row per window left. The windows stream from the child one at a
    time and leave in batches of at most `batch_bytes` of frames, so a long video's windows are
    never all held. `frames` is one dense array when every row has `num_frames` frames (uniform
    sampling), else one array per row.
    """
    global _DECODER
    if _DECODER is None:
        _DECODER = IsolatedCall(stream_video, timeout_s=cfg.decode_timeout_s, prepare=import_decoders)
    _DECODER.timeout_s = cfg.decode_timeout_s  # a pooled worker may have served a job with another limit
    rows: List[Dict[str, Any]] = []
    held = 0  # bytes of frames in `rows`
    for i in range(len(batch["sample_id"])):
        base = {"unit": batch["sample_id"][i], "unit_rows": 1, "attempts": 0,  # when not read by read.py
                **{k: batch[k][i] for k in SAMPLE_COLUMNS if k in batch}}
        if windowed and base["unit"] != base["sample_id"]:
            base["unit_rows"] = -1  # windows of a tar member: the shard's row count is unknowable
        if batch["error_stage"][i]:
            rows.append(_error_row(base, {k: batch[k][i] for k in ERROR_COLUMNS}))
            continue
        for row in _video_rows(base, _source(batch["data"][i], str(base["uri"])), spec, cfg, windowed):
            rows.append(row)
            held += row["frames"].nbytes if row["frames"] is not None else 0
            if held >= batch_bytes:
                yield _to_columns(rows, spec, cfg)
                rows, held = [], 0
    if rows:
        yield _to_columns(rows, spec, cfg)


def _video_rows(base: Dict[str, Any], source, spec: FrameSpec, cfg: VideoConfig,
                windowed: bool) -> Iterator[Dict[str, Any]]:
    """One video's rows as its windows come from the decoder."""
    given = count = 0
    try:
        for clip in _DECODER.stream(source, spec, cfg):
            count = clip.window.count
            if windowed and base["unit_rows"] == 1:  # the video is a unit of `count` rows
                base = {**base, "unit_rows": count}
            yield _clip_row(base, clip, windowed)
            given += 1
    except DecoderUnavailable:  # no file's fault: the task fails and Ray retries it
        raise
    except Exception as e:  # this video's error row(s); the task goes on with the next
        error = error_fields("decode", e)
        if not given:
            yield _error_row(base, error)
        for k in range(given, count):  # some windows are out: the others are each an error row
            yield _error_row({**base, "sample_id": f"{base['sample_id']}#w{k}"}, error)


def _source(data: bytes, uri: str):
    if data:
        return data
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _clip_row(base: Dict[str, Any], clip: Clip, windowed: bool) -> Dict[str, Any]:
    w = clip.window
    return {
        **base,
        "sample_id": f"{base['sample_id']}#w{w.index}" if windowed else base["sample_id"],
        "start_s": w.start_s, "end_s": w.end_s, "num_frames": w.real_frames, "fps": clip.fps,
        "frame_timestamps_s": (w.frames / clip.fps).astype(np.float32),
        "decoder": clip.decoder, "frames": clip.pixels, **OK,
    }


def _error_row(base: Dict[str, Any], error: Dict[str, str]) -> Dict[str, Any]:
    empty = np.zeros(0, np.float32)
    return {**base, "start_s": 0.0, "end_s": 0.0, "num_frames": 0, "fps": 0.0,
            "frame_timestamps_s": empty, "decoder": "", "frames": None, **error}


def _to_columns(rows: List[Dict[str, Any]], spec: FrameSpec, cfg: VideoConfig) -> Dict[str, np.ndarray]:
    out = {k: np.array([r[k] for r in rows], dtype=object) for k in (*PLAN_COLUMNS, "unit", "decoder", *ERROR_COLUMNS)}
    out["unit_rows"] = np.array([r["unit_rows"] for r in rows], np.int64)
    out["attempts"] = np.array([r["attempts"] for r in rows], np.int64)
    out["start_s"] = np.array([r["start_s"] for r in rows], np.float64)
    out["end_s"] = np.array([r["end_s"] for r in rows], np.float64)
    out["num_frames"] = np.array([r["num_frames"] for r in rows], np.int32)
    out["fps"] = np.array([r["fps"] for r in rows], np.float32)
    out["frame_timestamps_s"] = ragged([r["frame_timestamps_s"] for r in rows])
    if cfg.sampling == "uniform":  # every clip has num_frames frames: one dense array
        shape = (frames_per_clip(cfg), spec.crop, spec.crop, 3)
        out["frames"] = np.stack([r["frames"] if r["frames"] is not None else np.zeros(shape, np.uint8) for r in rows])
    else:
        empty = np.zeros((0, spec.crop, spec.crop, 3), np.uint8)
        out["frames"] = ragged([r["frames"] if r["frames"] is not None else empty for r in rows])
    return out

