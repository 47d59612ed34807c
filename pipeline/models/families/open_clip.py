"""model.family: open_clip: a CLIP image tower (`ViT-B-32`, `ViT-L-14`, `RN50` ...: open_clip.list_models()).

Only the image tower is built (open_clip's own `_build_vision_tower` from the model's config); a
checkpoint's text tower is dropped on loading and never held by an image actor. Text search queries
build the text tower alone (text_encoder, `_build_text_tower`) from the same config and weights. model.layer: null
gives the image embedding, L2-normalised as CLIP search expects; a named module of the tower gives
its output pooled with model.pool (not normalised). model.weights: a pretrained tag (`openai`,
`laion2b_s34b_b79k`: `featurize models` shows the names, open_clip.list_pretrained_tags_by_model the
tags), found in the local Hugging Face or ~/.cache/clip cache only (offline: an error names the file);
a whole-model or image-tower state dict file; or none. Preprocessing is the model's own (open_clip's
preprocess config merged with the tag's): resize the shorter side to the input size, center crop,
mean/std of the tag, and its resize_mode (`squash` as open_clip does; `longest`, which pads, is refused
unless preprocess.resize_mode chooses an approximation).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import nn

from ...config import ModelConfig
from ...errors import WeightsError
from ..base import Family, Node, fit_state_dict, forward_at_crop, module_layer, module_layers
from ..weights import Weights, cached_file, hf_cached, load_state_dict, not_cached

HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class Embedding(nn.Module):
    """The image tower's output, L2-normalised (open_clip's encode_image(normalize=True))."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)


def _tag(cfg: ModelConfig) -> Dict[str, Any]:
    """open_clip's pretrained config of model.weights as a tag; {} when it is a file or none."""
    if cfg.weights.lower() == "none" or "/" in cfg.weights or "\\" in cfg.weights or "://" in cfg.weights:
        return {}
    return open_clip.get_pretrained_cfg(cfg.arch, cfg.weights)


def _image_size(model_cfg: Dict[str, Any]) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[-1])


def preprocess(arch: str, tag: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip's preprocessing of the model (and tag) as preprocess.* keys."""
    model_cfg = open_clip.get_model_config(arch)
    merged = merge_preprocess_dict(vars(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    merged = merge_preprocess_dict(merged, tag)
    size = _image_size(model_cfg)
    mode = {"shortest": "shorter"}.get(merged.get("resize_mode", "shortest"), merged.get("resize_mode"))
    return {"resize": size, "crop": size, "interpolation": merged["interpolation"], "resize_mode": mode,
            "mean": [float(v) for v in merged["mean"]], "std": [float(v) for v in merged["std"]]}


class OpenClip(Family):
    name = "open_clip"
    about = "CLIP image towers (model.weights: a pretrained tag, a file or none); the L2-normalised embedding"
    default_layer = "embedding"
    default_layer_about = "the image embedding, L2-normalised"

    def names(self) -> List[str]:
        return open_clip.list_models()

    def weights_by_name(self, cfg: ModelConfig) -> Weights:
        tag = open_clip.get_pretrained_cfg(cfg.arch, cfg.weights)
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
            raise WeightsError(f"model.weights: {cfg.weights!r} is not a pretrained tag of {cfg.arch} "
                               f"({', '.join(tags) or 'it has none'}), a weights file, or none")
        path, where = None, ""
        if tag.get("hf_hub"):
            repo, filename = os.path.split(tag["hf_hub"])  # `org/name/` (default files) or `org/name/file`
            files = (filename,) if filename else HF_FILES
            path = hf_cached(repo, files)
            where = (repo, files[0])
        if path is None and tag.get("url"):
            cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(tag["url"]))
            path = cached if os.path.exists(cached) else None
        if path is None:
            if where:
                raise not_cached(cfg, *where)
            raise WeightsError(f"model.weights: {cfg.weights!r} of {cfg.arch} is not in the local cache; offline, "
                               f"place {os.path.basename(tag['url'])} in ~/.cache/clip or set model.weights to a file")
        return cached_file(cfg, path, id=f"open_clip:{cfg.arch}:{cfg.weights}", transforms=preprocess(cfg.arch, tag))

    def preprocess_defaults(self, cfg: ModelConfig, weights: Weights) -> Dict[str, Any]:
        return weights.transforms or preprocess(cfg.arch, {})

    def build(self, cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
        self.check(cfg)
        model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.arch))
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False  # never a download from inside the tower
        torch.manual_seed(cfg.seed)
        visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                     quick_gelu=_quick_gelu(cfg, model_cfg)).eval()
        state = load_state_dict(weights, storage_options) if weights else None
        if state is not None:
            fit_state_dict(visual, image_tower(state), weights, cfg.arch)
        module = Embedding(visual) if cfg.layer is None else module_layer(visual, cfg)
        module.image_size = _image_size(model_cfg)
        return module.eval()

    def crop_hint(self, arch: str) -> str:
        return f"it needs crop {_image_size(open_clip.get_model_config(arch))}"

    def layers(self, arch: str, crop: int) -> List[Node]:
        cfg = ModelConfig(arch=arch, family=self.name, weights="none")
        module = self.build(cfg, None, {})
        forward_at_crop(module, cfg, crop, self.crop_hint(arch))
        return module_layers(module.visual, crop)


def _quick_gelu(cfg: ModelConfig, model_cfg: Dict[str, Any]) -> bool:
    """A tag trained with QuickGELU (OpenAI's) gets it even under the plain model name."""
    return bool(model_cfg.get("quick_gelu", False) or _tag(cfg).get("quick_gelu", False))


class TextEmbedding(nn.Module):
    """Token ids (N, context) -> the text tower's output, L2-normalised (encode_text(normalize=True))."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)


def text_encoder(cfg: ModelConfig, weights: Weights, storage_options: Dict[str, Any]) -> nn.Module:
    """The text tower of model.arch with the text entries of the job's whole-model weights, for search
    queries only (no image actor builds it); refused when the weights hold no text tower."""
    FAMILY.check(cfg)
    model_cfg = open_clip.get_model_config(cfg.arch)
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise WeightsError(f"model.arch: {cfg.arch}'s text tower is a Hugging Face model, which text search "
                           "does not build (offline)")
    if weights.kind == "none":
        raise WeightsError(f"model.weights: none (random init) of {cfg.arch} has no text tower trained with its "
                           "image tower; text search needs the CLIP weights the table was made with")
    state = text_tower(load_state_dict(weights, storage_options))
    if not state:
        raise WeightsError(f"model.weights: {weights.id} holds an image tower only; text search needs the whole "
                           "CLIP model's weights")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; leave the caller's RNG alone
        text = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=_quick_gelu(cfg, model_cfg))
    fit_state_dict(text, state, weights, cfg.arch)
    return TextEmbedding(text).eval()


def tokenize(arch: str, texts: List[str]) -> torch.Tensor:
    """open_clip's own tokenizer of the model (its context length), as token ids (N, context)."""
    return open_clip.get_tokenizer(arch)(texts)


def _unwrapped(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if next(iter(state), "").startswith("module."):  # saved from DistributedDataParallel
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def text_tower(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The text tower's entries of a whole-model state dict, named as the tower names them; {} for an
    image tower's own state dict. CLIP keeps them at the top level, CustomTextCLIP (CoCa ...) under text."""
    state = _unwrapped(state)
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    if not any(k.startswith("visual.") for k in state):
        return {}
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def image_tower(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image tower's entries of a whole-model state dict (the text tower's are dropped); a tower's own as is."""
    state = _unwrapped(state)
    if not any(k.startswith("visual.") for k in state):
        return state
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


FAMILY = OpenClip()
