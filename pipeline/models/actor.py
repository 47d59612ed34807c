"""The model actor, written once for every family: built from an EmbedSpec, then called on batches
of uint8 `pixels` or `frames` (or of encoded `data` it decodes itself); it drops them and adds the
columns it declares in OUTPUT_COLUMNS. A clip family's `frames` (B, T, H, W, 3) become one `feature`
per clip; an image family's become `frame_features` (T, D) per clip, for the temporal heads.

Pixels arrive as uint8 NHWC and are normalised on the actor's device, so only bytes cross the
object store; the family's module (base.py) maps them to pooled features. Decoding in the actor
(resources.decode_on: actor), GPU decode, failpoints, committer registration and timing are here.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import faults
from ..config import ModelConfig
from ..extract.decode import ImageSpec, decode_batch
from ..extract.device_decode import decode_on_device
from ..rows import error_fields, fail_nonfinite, fail_rows, ragged
from ..timing import timed
from .base import build_module
from .weights import Weights


@dataclass
class EmbedSpec:
    """Everything the model actor needs; built on the driver, shipped to each actor."""

    model: ModelConfig
    weights: Weights
    crop: int
    dim: int
    mean: List[float]
    std: List[float]
    dtype: str = "float16"
    torch_threads: int = 1
    storage_options: Dict[str, Any] = field(default_factory=dict)
    committer: Any = None  # the job's Committer, where the actor registers so a failed job can stop it
    image: Optional[ImageSpec] = None  # decode images in the actor (resources.decode_on: actor)
    clips: bool = False  # the family embeds clips: `frames` (B, T, H, W, 3) -> `feature` (B, D)


class Embedder:
    """Ray Data actor: loads the model of any family once, then maps uint8 pixel batches to features."""

    OUTPUT_COLUMNS = ("feature",)

    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        if spec.committer is not None:
            _register(spec.committer)
        self.device = _device(spec.model.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.torch_threads)
        self.module = build_module(spec.model, spec.weights, spec.storage_options).to(self.device)
        if self.device.type == "cuda" and not spec.clips:  # channels_last is for 4-d tensors
            self.module = self.module.to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1, 1) if spec.clips else (1, 3, 1, 1)  # N, C, (T,) H, W
        self.mean = torch.tensor(spec.mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(spec.std, device=self.device).view(shape) * 255.0
        self.out_dtype = np.float16 if spec.dtype == "float16" else np.float32
        # Decoding here, between forward passes, on the cores the model's threads use: on a node
        # where decode tasks would run beside the model they preempt its threads (each op waits
        # for its slowest thread), so taking turns is faster than sharing the cores. On a GPU the
        # JPEGs are decoded on it (device_decode.py); the threads take the other formats.
        self.decoders = ThreadPoolExecutor(spec.torch_threads) if spec.image else None
        self.decode = partial(decode_on_device, device=self.device) if self.device.type == "cuda" else decode_batch

    def embed(self, pixels) -> np.ndarray:
        """uint8 NHWC, or clips NTHWC (numpy, or a tensor already on the device) -> features (N, D) as
        float32 numpy."""
        x = self.input(pixels)
        on_gpu = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = self.module(x)
        return out.float().cpu().numpy()

    def input(self, pixels) -> torch.Tensor:
        """The model's input: uint8 NHWC (NTHWC) -> normalised float NCHW (NCTHW) on the device."""
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 4, 1, 2, 3) if x.ndim == 5 else x.permute(0, 3, 1, 2)
        x = (x.float() - self.mean) / self.std
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @timed("model")
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        faults.point("embed", lambda: "\n".join(map(str, batch["sample_id"])))
        if "data" in batch:  # bytes: this actor decodes them (resources.decode_on: actor)
            batch = self.decode(batch, self.spec.image, pool=self.decoders, parts=self.spec.torch_threads)
        if "frames" in batch and not self.spec.clips:
            return self._call_frames(batch)
        pixels = batch.pop("frames" if self.spec.clips else "pixels")  # clips: dense (B, T, H, W, 3)
        ok = batch["error_stage"] == ""
        # Rows that failed earlier keep zeros; the sink writes them to the errors table only.
        features = np.zeros((len(ok), self.spec.dim), dtype=np.float32)
        if ok.any():
            try:
                rows = pixels[torch.from_numpy(ok).to(pixels.device)] if torch.is_tensor(pixels) else pixels[ok]
                features[ok] = self.embed(rows)
            except Exception as e:  # the batch's samples become model errors; the job goes on
                fail_rows(batch, ok, error_fields("model", e))
        batch["feature"] = fail_nonfinite(batch, {"feature": features}, self.out_dtype, "model")["feature"]
        return batch

    def _call_frames(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Videos: every frame of every clip in one forward pass -> `frame_features` (T, D) per clip."""
        frames = batch.pop("frames")
        ok = batch["error_stage"] == ""
        clips = [frames[i] for i in range(len(ok))]
        out = [np.zeros((len(c), self.spec.dim), np.float32) for c in clips]
        rows = [i for i in np.flatnonzero(ok) if len(clips[i])]
        if rows:
            try:
                flat = self.embed(np.concatenate([clips[i] for i in rows]))
                for i, part in zip(rows, np.split(flat, np.cumsum([len(clips[i]) for i in rows])[:-1])):
                    out[i] = part
            except Exception as e:
                fail_rows(batch, ok, error_fields("model", e))
        # float32 here: the temporal stage checks them as stored, when they are kept (temporal.py)
        fail_nonfinite(batch, {"frame_features": out}, np.float32, "model")
        if isinstance(frames, np.ndarray) and frames.dtype != object:  # dense: (B, T, D)
            batch["frame_features"] = np.stack(out)
        else:
            batch["frame_features"] = ragged(out)
        return batch


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


REGISTER_TIMEOUT_S = 120  # a live committer answers in milliseconds, even while it publishes


def _register(committer) -> None:
    """Registers this model actor with its job's committer, which stops it when the job ends
    (jobrun.stop). An actor Ray Data was still starting when a failed job was stopped would
    otherwise register with the dead committer (its calls retried without end) and live on,
    holding its CPU or GPU: the next job on the same Ray then never got its actors. So the call is
    waited for, and an actor whose job has gone exits."""
    import os

    import ray

    try:
        ray.get(committer.register.remote(ray.get_runtime_context().current_actor), timeout=REGISTER_TIMEOUT_S)
    except Exception:  # the committer is dead (killed at the job's end) or unreachable
        os._exit(0)
