"""Weights: resolve a job's `model.weights` to a state dict, its id and its sha256.

Three kinds: a name the model's family resolves from a local cache (torchvision's `IMAGENET1K_V2`,
`DEFAULT`, `ResNet50_Weights.IMAGENET1K_V2`, kept in torch's hub cache and downloaded there when
online; timm's and open_clip's tags, from the Hugging Face cache: offline, an error names the file);
a local or fsspec path to a state dict (`.safetensors`, or a `.pth`/`.pt`/`.bin` read with
`weights_only=True`, never unpickling code); or `none` (random init from `model.seed`, for tests
and demos).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch.hub import get_dir

from ..config import ModelConfig
from ..errors import WeightsError
from ..output.store import filesystem

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Weights:
    kind: str  # torchvision | file | none
    id: str  # what the provenance records
    location: str = ""  # URL (torchvision) or path/URI (file)
    sha256: str = ""
    # Preprocessing the weights were trained with: resize, crop, mean, std
    transforms: Dict[str, Any] = field(default_factory=dict)


def from_file(cfg: ModelConfig, storage_options: Optional[Dict[str, Any]] = None) -> Weights:
    """model.weights names a file: read it once to hash it (and check `weights_sha256`)."""
    data = read_bytes(cfg.weights, storage_options or {})
    return Weights(kind="file", id=cfg.weights, location=cfg.weights, sha256=_verify(cfg, data))


def cached_file(cfg: ModelConfig, path: str, id: str, transforms: Optional[Dict[str, Any]] = None) -> Weights:
    """Weights a family found in a local cache: a file, hashed and checked like a user's own."""
    with open(path, "rb") as f:
        digest = _verify(cfg, f.read())
    return Weights(kind="file", id=id, location=path, sha256=digest, transforms=transforms or {})


def hf_cached(repo: str, filenames: Tuple[str, ...]) -> Optional[str]:
    """The first of `filenames` in the local Hugging Face cache of `repo`, or None; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def not_cached(cfg: ModelConfig, repo: str, filename: str) -> WeightsError:
    return WeightsError(f"model.weights: {cfg.weights!r} of {cfg.arch} is not in the local Hugging Face cache; "
                        f"offline, fetch https://huggingface.co/{repo}/resolve/main/{filename} and set model.weights "
                        f"to that file's path")


def looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or "://" in name or name.lower().endswith(STATE_DICT_SUFFIXES)


def read_bytes(uri: str, storage_options: Dict[str, Any]) -> bytes:
    try:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise WeightsError(f"model.weights: file {uri} not found") from None
    except Exception as e:
        raise WeightsError(f"model.weights: cannot read {uri} ({type(e).__name__}: {e})") from None


def _verify(cfg: ModelConfig, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if cfg.weights_sha256 and digest != cfg.weights_sha256.lower():
        raise WeightsError(
            f"model.weights_sha256: {cfg.weights} has sha256 {digest}, the job expects {cfg.weights_sha256}"
        )
    return digest


def _torchvision_enum(cfg: ModelConfig):
    import torchvision  # here: temporal heads read weights through this module and need none of it (~1.3 s)

    try:
        enum = torchvision.models.get_model_weights(cfg.arch)
    except (ValueError, KeyError):
        raise WeightsError(f"model.arch: {cfg.arch!r} has no torchvision weights") from None
    name = cfg.weights.split(".")[-1]
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *(n for n in enum.__members__ if n != "DEFAULT")])  # DEFAULT is a member too
        raise WeightsError(f"model.weights: {cfg.weights!r} is not a weights name of {cfg.arch} ({names})") from None


def resolve_torchvision(cfg: ModelConfig) -> Weights:
    entry = _torchvision_enum(cfg)
    with open(fetch_torchvision(entry.url), "rb") as f:
        digest = _verify(cfg, f.read())
    return Weights(
        kind="torchvision",
        id=f"{type(entry).__name__}.{entry.name}",
        location=entry.url,
        sha256=digest,
        transforms=transform_defaults(entry),
    )


def fetch_torchvision(url: str) -> str:
    """The file in torch's hub cache, downloaded first if it is not there (on this node)."""
    folder = os.path.join(get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(url))
    if not os.path.exists(path):
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as e:
            raise WeightsError(
                f"model.weights: cannot download {url} ({type(e).__name__}); offline, place the file at {path}"
            ) from None
    return path


def transform_defaults(entry) -> Dict[str, Any]:
    t = entry.transforms()
    out: Dict[str, Any] = {}
    for key, attr in (("resize", "resize_size"), ("crop", "crop_size"), ("mean", "mean"), ("std", "std")):
        value = getattr(t, attr, None)
        if value is not None:
            value = list(value)
            out[key] = value[0] if key in ("resize", "crop") else [float(v) for v in value]
    interpolation = getattr(t, "interpolation", None)
    if interpolation is not None:
        out["interpolation"] = interpolation.value
    return out


def load_state_dict(weights: Weights, storage_options: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict to load into the model, or None for random init."""
    if weights.kind == "none":
        return None
    if weights.kind == "torchvision":
        with open(fetch_torchvision(weights.location), "rb") as f:
            data = f.read()
    else:
        data = read_bytes(weights.location, storage_options)
    if weights.sha256 and hashlib.sha256(data).hexdigest() != weights.sha256:
        raise WeightsError(f"model.weights: {weights.location} changed while the job ran")
    return _parse_state_dict(data, weights.location)


def _parse_state_dict(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    if name.lower().endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:  # random bytes, a truncated download, an HTML error page
            raise WeightsError(f"model.weights: {name} is not a valid safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # includes pickles that would run code: refused, never unpickled
        raise WeightsError(f"model.weights: {name} is not a plain state dict ({_first_line(e)})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"model.weights: {name} holds a {type(obj).__name__}, not a state dict")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise WeightsError(f"model.weights: {name} is not a plain state dict ({odd[0]!r} is not a tensor)")
    return obj


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
