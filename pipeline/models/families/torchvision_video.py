"""model.family: torchvision_video: torchvision's action-recognition models, one feature per clip.

The 3D CNNs r3d_18, mc3_18 and r2plus1d_18, s3d, and the video transformers mvit_v1_b, mvit_v2_s
and swin3d_t/s/b take a clip (N, 3, T, H, W). No layer means the penultimate one: the pooled vector
the classifier reads (r2plus1d_18's 512, s3d's 1024, mvit's class token of 768). A named layer is
a module of `featurize layers ARCH --family torchvision_video`, its output averaged over time and
space (model.pool).

Weights names (`KINETICS400_V1`, `DEFAULT`) come from torch's hub cache as for the torchvision
family. Preprocessing and the clip length default to the named weights' `transforms()` and docs
(for `none` or a file: the model's DEFAULT weights', its documented input): r2plus1d_18 resizes
every frame to exactly 128x171 (H x W, torchvision's `Resize([128, 171])`), crops 112 and reads
16 frames; s3d squashes to 256x256, crops 224 and reads 128.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import torch
import torchvision
from torch import nn

from ...config import DEFAULT_NUM_FRAMES, ModelConfig
from ..base import Family, Node, Pooled, fit_state_dict, forward_at_crop, module_layer, module_layers
from ..weights import Weights, load_state_dict, resolve_torchvision, transform_defaults
from .torchvision import crop_hint, drop_classifier


def video_models() -> List[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.video))


def weights_entry(arch: str, weights: Optional[Weights] = None):
    """The torchvision weights whose transforms and docs describe the input: the named ones, else DEFAULT."""
    if weights is not None and weights.kind == "torchvision":
        return torchvision.models.get_weight(weights.id)
    return torchvision.models.get_model_weights(arch).DEFAULT


def clip_length(entry) -> int:
    """Frames per clip the weights were evaluated with (their docs' `clip_len`), else their minimum."""
    found = re.search(r"clip_len=`?(\d+)", entry.meta.get("_docs", ""))
    return int(found.group(1)) if found else int(entry.meta.get("min_temporal_size") or DEFAULT_NUM_FRAMES)


def input_defaults(entry) -> Dict[str, Any]:
    """resize, crop, mean, std, interpolation as for images, with torchvision's two-number resize:
    equal sides squash (`resize_mode`), others are the frames' exact size (`frame_size`, H x W)."""
    out = transform_defaults(entry)
    size = list(entry.transforms().resize_size)
    if len(size) == 2 and size[0] == size[1]:
        out["resize_mode"] = "squash"
    elif len(size) == 2:
        out["frame_size"] = (int(size[0]), int(size[1]))
    out["num_frames"] = clip_length(entry)
    return out


def build_backbone(cfg: ModelConfig) -> nn.Module:
    FAMILY.check(cfg)
    torch.manual_seed(cfg.seed)
    return torchvision.models.get_model(cfg.arch, weights=None).eval()


def penultimate(model: nn.Module) -> nn.Module:
    """The classifier replaced by Identity: s3d's is a 1x1x1 convolution (averaged after it), the others' a Linear."""
    if isinstance(getattr(model, "classifier", None), nn.Sequential) and isinstance(model.classifier[-1], nn.Conv3d):
        model.classifier = nn.Identity()
        return model
    return drop_classifier(model)


class TorchvisionVideo(Family):
    name = "torchvision_video"
    about = ("action-recognition clip models (Kinetics-400); one feature per clip (N, 3, T, H, W); "
             "model.layer: null (penultimate) or a module of `featurize layers`")
    default_layer_about = "the classifier's input, pooled over time and space"
    clips = True

    def names(self) -> List[str]:
        return video_models()

    def weights_by_name(self, cfg: ModelConfig) -> Weights:
        return resolve_torchvision(cfg)

    def preprocess_defaults(self, cfg: ModelConfig, weights: Weights) -> Dict[str, Any]:
        return input_defaults(weights_entry(cfg.arch, weights))

    def example(self, crop: int, frames: int) -> torch.Tensor:
        return torch.zeros(1, 3, frames, crop, crop)

    def input_words(self, crop: int, frames: int) -> str:
        return f"clips of {frames} frames at {crop}x{crop}"

    def build(self, cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
        model = build_backbone(cfg)
        state = load_state_dict(weights, storage_options) if weights else None
        if state is not None:
            model = fit_state_dict(model, state, weights, cfg.arch)
        if cfg.layer is not None:
            return module_layer(model, cfg)
        return Pooled(penultimate(model), cfg.pool).eval()

    def crop_hint(self, arch: str) -> str:
        return crop_hint(arch)

    def layers(self, arch: str, crop: int) -> List[Node]:
        cfg = ModelConfig(arch=arch, family=self.name, weights="none")
        model = build_backbone(cfg)
        x = self.example(crop, clip_length(weights_entry(arch)))
        forward_at_crop(model, cfg, crop, crop_hint(arch), x, self.input_words(crop, x.shape[2]))
        return module_layers(model, crop, x=x)


FAMILY = TorchvisionVideo()
