"""model.family: timm: any `timm.list_models()` name (`convnext_tiny`, or with a tag: `resnet50.a1_in1k`).

model.layer: null gives the penultimate features as timm defines them (forward_features, then the
model's own head pooling with pre_logits=True: before the classifier); a named module (a stage such
as `stages.2` or `layer3`, listed by `featurize layers ARCH --family timm`) gives its output pooled
with model.pool. Preprocessing defaults come from the model's pretrained config through timm's
resolve_data_config: input size, crop_pct (resize = floor(crop / crop_pct)), interpolation, mean/std.
Weights names (`DEFAULT`, or a tag such as `a1_in1k`) come from the local Hugging Face cache only.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ...config import ModelConfig
from ...errors import ModelError, WeightsError, did_you_mean
from ..base import Family, Node, fit_state_dict, forward_at_crop, module_layer, module_layers
from ..weights import Weights, cached_file, hf_cached, load_state_dict, not_cached

HF_FILES = ("model.safetensors", "pytorch_model.bin")


class PreLogits(nn.Module):
    """timm's penultimate features: forward_features, then the head's pooling and norm, without the classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _base(arch: str) -> str:
    return arch.split(".", 1)[0]


def _registered(name: str):
    """timm's pretrained config of `name` (arch: its default tag), or None: no such tag, or none registered."""
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag the arch does not have
        return None


def _pretrained_cfg(name: str) -> Dict[str, Any]:
    cfg = _registered(name)
    return cfg.to_dict() if cfg is not None else {"input_size": (3, 224, 224)}  # timm's defaults for the rest


def _without_classifier(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}


def _tagged(cfg: ModelConfig) -> str:
    """The `arch.tag` model.weights names: DEFAULT is the arch's own (default) tag."""
    return cfg.arch if cfg.weights.upper() == "DEFAULT" else f"{_base(cfg.arch)}.{cfg.weights}"


def data_config(name: str) -> Dict[str, Any]:
    """timm's eval preprocessing of `name` (arch or arch.tag) as preprocess.* keys."""
    data = resolve_data_config(pretrained_cfg=_pretrained_cfg(name))
    crop = int(data["input_size"][-1])
    mode = {"center": "shorter"}.get(data.get("crop_mode", "center"), data.get("crop_mode"))
    return {"crop": crop, "resize": math.floor(crop / data.get("crop_pct", 1.0)), "resize_mode": mode,
            "interpolation": data["interpolation"], "mean": [float(v) for v in data["mean"]],
            "std": [float(v) for v in data["std"]]}


class Timm(Family):
    name = "timm"
    about = "any timm backbone (name or name.tag); model.layer: null (pre-logits) or a module of `featurize layers`"

    def names(self) -> List[str]:
        return timm.list_models()

    def check(self, cfg: ModelConfig) -> None:
        names = self.names()
        if _base(cfg.arch) not in names:
            raise ModelError(f"model.arch: {cfg.arch!r} is not a timm model{did_you_mean(_base(cfg.arch), names)} "
                             f"(featurize models --family timm lists them)")

    def weights_by_name(self, cfg: ModelConfig) -> Weights:
        name = _tagged(cfg)
        pcfg = _registered(name)
        if pcfg is None or not pcfg.hf_hub_id:
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{_base(cfg.arch)}.*")]
            raise WeightsError(f"model.weights: {cfg.weights!r} is not a pretrained tag of {_base(cfg.arch)} "
                               f"(DEFAULT, {', '.join(tags) or 'none'}), a weights file, or none")
        files = (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else HF_FILES
        path = hf_cached(pcfg.hf_hub_id, files)
        if path is None:
            raise not_cached(cfg, pcfg.hf_hub_id, files[0])
        return cached_file(cfg, path, id=f"timm:{_base(name)}.{pcfg.tag}", transforms=data_config(name))

    def preprocess_defaults(self, cfg: ModelConfig, weights: Weights) -> Dict[str, Any]:
        return weights.transforms or data_config(cfg.arch)  # a tag's own, else the arch's default tag's

    def build(self, cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
        self.check(cfg)
        torch.manual_seed(cfg.seed)
        # Without the classifier: features never use it, and a checkpoint fine-tuned on any number of
        # classes (or a tag's 21k-class head) fits. The arch.tag of a weights tag brings its own config.
        name = _tagged(cfg) if weights is not None and weights.id.startswith("timm:") else cfg.arch
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()
        state = load_state_dict(weights, storage_options) if weights else None
        if state is not None:
            fit_state_dict(model, _without_classifier(state, model), weights, cfg.arch)
        module = PreLogits(model) if cfg.layer is None else module_layer(model, cfg, forward="forward_features")
        if model.pretrained_cfg.get("fixed_input_size"):
            module.image_size = int(model.pretrained_cfg["input_size"][-1])
        return module.eval()

    def crop_hint(self, arch: str) -> str:
        size = _pretrained_cfg(arch).get("input_size")
        return f"its pretrained config uses crop {size[-1]}" if size else "try a larger crop"

    def layers(self, arch: str, crop: int) -> List[Node]:
        cfg = ModelConfig(arch=arch, family=self.name, weights="none")
        model = self.build(cfg, None, {})
        forward_at_crop(model, cfg, crop, self.crop_hint(arch))
        return module_layers(model.model, crop, forward="forward_features")


FAMILY = Timm()
