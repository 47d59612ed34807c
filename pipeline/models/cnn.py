"""Torchvision CNN feature extractor: any classification backbone, any layer, pooled.

The layer is chosen by torchvision's feature-extraction node names (`layer3`, `features.29`);
no layer means the penultimate one, the input of the final classifier. Pixels arrive as uint8
NHWC and are normalised on the actor's device, so only bytes cross the object store; or they
arrive still encoded and the actor decodes them itself (resources.decode_on: actor).
"""
from __future__ import annotations

import contextlib
import difflib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .. import faults
from ..config import ModelConfig
from ..decode import ImageSpec, decode_batch
from ..device_decode import decode_on_device
from ..errors import Refused
from ..read import ERROR_COLUMNS, error_fields, ragged
from ..timing import timed
from .weights import Weights, WeightsError, load_state_dict


class ModelError(Refused, ValueError):
    """An unknown architecture or layer; raised on the driver before any work."""


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


def classification_models() -> List[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def did_you_mean(name: str, choices: List[str]) -> str:
    """`; did you mean a, b?` with the names closest to a mistyped one, or nothing when none is close."""
    near = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def check_arch(cfg: ModelConfig) -> None:
    names = classification_models()
    if cfg.arch not in names:
        raise ModelError(f"model.arch: {cfg.arch!r} is not a torchvision classification model"
                         f"{did_you_mean(cfg.arch, names)} (featurize models lists them)")


def build_backbone(cfg: ModelConfig) -> nn.Module:
    check_arch(cfg)
    torch.manual_seed(cfg.seed)
    kwargs = {"aux_logits": False} if cfg.arch in ("googlenet", "inception_v3") else {}
    if kwargs and cfg.arch == "googlenet":
        kwargs["init_weights"] = True
    return torchvision.models.get_model(cfg.arch, weights=None, **kwargs).eval()


def feature_module(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The part of `model` whose output is the requested feature map."""
    layer = cfg.layer
    if layer is None:
        return _drop_classifier(model)
    names = layer_names(get_graph_node_names(model)[1])
    if layer not in names:
        raise ModelError(f"model.layer: {layer!r} is not a node of {cfg.arch}{did_you_mean(layer, names)} "
                         f"(featurize layers {cfg.arch} lists them)")
    return create_feature_extractor(model, return_nodes={layer: "feature"}).eval()


def layer_names(nodes: List[str]) -> List[str]:
    """What model.layer accepts: the nodes, and the modules holding them (`layer3` stands for its last
    node, as create_feature_extractor allows)."""
    modules = {node.rsplit(".", i)[0] for node in nodes for i in range(1, node.count(".") + 1)}
    return list(nodes) + sorted(modules - set(nodes))


def forward_at_crop(module: nn.Module, cfg: ModelConfig, crop: int, model: nn.Module) -> Any:
    """One forward of a zero image at the crop; a model that cannot take it is refused, naming the crop it needs."""
    try:
        with torch.inference_mode():
            return module(torch.zeros(1, 3, crop, crop))
    except Exception as e:  # ViT's `Wrong image height!`, a kernel larger than a tiny input ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise ModelError(f"preprocess.crop: {cfg.arch} does not take {crop}x{crop} images ({reason}); "
                         f"{_crop_hint(cfg.arch, model)}") from None


def _crop_hint(arch: str, model: nn.Module) -> str:
    size = getattr(model, "image_size", None)  # the transformers that take one size only
    if isinstance(size, int):
        return f"it needs crop {size}"
    try:
        return f"its weights use crop {torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]}"
    except Exception:  # no weights, or transforms without a crop
        return "try a larger crop"


def _drop_classifier(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer (the classifier) with Identity: the penultimate features."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ModelError("model.layer: this model has no Linear classifier; name a layer")
    parent_name, _, child = last[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def pool(x: Any, how: str) -> torch.Tensor:
    if isinstance(x, dict):
        x = x["feature"]
    if x.ndim == 4:  # N, C, H, W
        dims = (2, 3)
    elif x.ndim == 3:  # N, tokens, D (transformers)
        dims = (1,)
    else:
        return x.flatten(1)
    if how == "avg":
        return x.mean(dim=dims)
    if how == "max":
        return x.amax(dim=dims)
    return x.flatten(1)


def load_model(cfg: ModelConfig, weights: Weights, storage_options: Dict[str, Any]) -> nn.Module:
    """The backbone with its weights loaded; weights that do not fit it are refused."""
    model = build_backbone(cfg)
    state = load_state_dict(weights, storage_options)
    if state is None:
        return model
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: name the first, count the rest, on one line
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else str(e)
        raise WeightsError(
            f"model.weights: {weights.id} does not fit {cfg.arch} ({len(problems)} mismatches; first: {first})"
        ) from None
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {weights.id} does not fit {cfg.arch} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


def feature_dim(cfg: ModelConfig, crop: int, weights: Optional[Weights] = None,
                storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Checks arch, layer, crop and (when given) that the weights fit; returns D after one forward pass."""
    model = load_model(cfg, weights, storage_options or {}) if weights else build_backbone(cfg)
    module = feature_module(model, cfg)
    return int(pool(forward_at_crop(module, cfg, crop, model), cfg.pool).shape[1])


class CnnEmbedder:
    """Ray Data actor: loads the model once, then maps uint8 pixel batches to features."""

    OUTPUT_COLUMNS = ("feature",)

    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        if spec.committer is not None:
            import ray

            spec.committer.register.remote(ray.get_runtime_context().current_actor)
        self.device = _device(spec.model.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.torch_threads)
        model = load_model(spec.model, spec.weights, spec.storage_options)
        self.module = feature_module(model, spec.model).to(self.device)
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
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
        """uint8 NHWC (numpy, or a tensor already on the device) -> features (N, D) as float32 numpy."""
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = (x.float() - self.mean) / self.std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        on_gpu = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = pool(self.module(x), self.spec.model.pool)
        return out.float().cpu().numpy()

    @timed("model")
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        faults.point("embed", lambda: "\n".join(map(str, batch["sample_id"])))
        if "data" in batch:  # bytes: this actor decodes them (resources.decode_on: actor)
            batch = self.decode(batch, self.spec.image, pool=self.decoders, parts=self.spec.torch_threads)
        if "frames" in batch:
            return self._call_frames(batch)
        pixels = batch.pop("pixels")
        ok = batch["error_stage"] == ""
        # Rows that failed earlier keep zeros; the sink writes them to the errors table only.
        batch["feature"] = np.zeros((len(ok), self.spec.dim), dtype=self.out_dtype)
        if ok.any():
            try:
                rows = pixels[torch.from_numpy(ok).to(pixels.device)] if torch.is_tensor(pixels) else pixels[ok]
                batch["feature"][ok] = self.embed(rows)
            except Exception as e:  # the batch's samples become model errors; the job goes on
                _fail_rows(batch, ok, e)
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
                _fail_rows(batch, ok, e)
        if isinstance(frames, np.ndarray) and frames.dtype != object:  # dense: (B, T, D)
            batch["frame_features"] = np.stack(out)
        else:
            batch["frame_features"] = ragged(out)
        return batch


def _fail_rows(batch: Dict[str, np.ndarray], ok: np.ndarray, exc: BaseException) -> None:
    fields = error_fields("model", exc)
    for col in ERROR_COLUMNS:
        batch[col] = batch[col].copy()
        batch[col][ok] = fields[col]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
