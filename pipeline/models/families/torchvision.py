"""model.family: torchvision (the default): any classification backbone, any layer, pooled.

The layer is chosen by torchvision's feature-extraction node names (`layer3`, `features.29`);
no layer means the penultimate one, the input of the final classifier. Weights names
(`IMAGENET1K_V2`, `DEFAULT`) come from torch's hub cache and bring their preprocessing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ...config import ModelConfig
from ...errors import ModelError, did_you_mean
from ..base import Family, Node, Pooled, fit_state_dict, forward_at_crop
from ..weights import Weights, load_state_dict, resolve_torchvision


def classification_models() -> List[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_backbone(cfg: ModelConfig) -> nn.Module:
    FAMILY.check(cfg)
    torch.manual_seed(cfg.seed)
    kwargs = {"aux_logits": False} if cfg.arch in ("googlenet", "inception_v3") else {}
    if kwargs and cfg.arch == "googlenet":
        kwargs["init_weights"] = True
    return torchvision.models.get_model(cfg.arch, weights=None, **kwargs).eval()


def feature_module(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The part of `model` whose output is the requested feature map."""
    layer = cfg.layer
    if layer is None:
        return drop_classifier(model)
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


def crop_hint(arch: str) -> str:
    try:
        return f"its weights use crop {torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]}"
    except Exception:  # no weights, or transforms without a crop
        return "try a larger crop"


def drop_classifier(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer (the classifier) with Identity: the penultimate features."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ModelError("model.layer: this model has no Linear classifier; name a layer")
    parent_name, _, child = last[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def load_model(cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
    """The backbone with its weights loaded; weights that do not fit it are refused."""
    model = build_backbone(cfg)
    state = load_state_dict(weights, storage_options) if weights else None
    return model if state is None else fit_state_dict(model, state, weights, cfg.arch)


class Torchvision(Family):
    name = "torchvision"
    about = "classification backbones; model.layer: any of `featurize layers ARCH`"

    def names(self) -> List[str]:
        return classification_models()

    def weights_by_name(self, cfg: ModelConfig) -> Weights:
        return resolve_torchvision(cfg)

    def build(self, cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
        model = load_model(cfg, weights, storage_options)
        module = Pooled(feature_module(model, cfg), cfg.pool).eval()
        module.image_size = getattr(model, "image_size", None)  # forward_at_crop's hint for ViTs
        return module

    def crop_hint(self, arch: str) -> str:
        return crop_hint(arch)

    def layers(self, arch: str, crop: int) -> List[Node]:
        cfg = ModelConfig(arch=arch, weights="none")
        model = build_backbone(cfg)
        forward_at_crop(model, cfg, crop, crop_hint(arch))  # a crop it cannot take is refused in the model's words
        train_nodes, nodes = get_graph_node_names(model)
        # Only the eval graph matters; train mode is traced too, asked for its output alone.
        extractor = create_feature_extractor(model, train_return_nodes=train_nodes[-1:],
                                             eval_return_nodes=nodes).eval()
        with torch.inference_mode():
            outputs: Dict[str, Any] = extractor(torch.zeros(1, 3, crop, crop))
        last = {}  # module name -> its last node, which the module's name stands for
        for node in nodes:
            for i in range(1, node.count(".") + 1):
                last[node.rsplit(".", i)[0]] = node
        held: Dict[str, List[str]] = {}
        for module, node in last.items():
            if module not in outputs:
                held.setdefault(node, []).append(module)
        return [Node(name, tuple(out.shape[1:]) if torch.is_tensor(out) else None, type(out).__name__,
                     sorted(held.get(name, []), key=len)) for name, out in outputs.items()]


FAMILY = Torchvision()
