"""`featurize models` and `featurize layers ARCH`: what a job's model keys accept, without Ray.

Names come per family from the family's own registry (torchvision's `list_models`, the temporal
heads' HEADS): a new family is one entry in FAMILIES. Layers are the eval-mode nodes of
torchvision's `get_graph_node_names`, each with its output shape from one forward of a zero image
through the randomly initialised model on the CPU (no weights are fetched).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..config import DEFAULT_CROP, ModelConfig
from .cnn import ModelError, build_backbone, check_arch, classification_models, forward_at_crop
from .temporal import HEADS


@dataclass(frozen=True)
class Family:
    key: str  # the job key that takes these names
    names: Callable[[], List[str]]
    about: str


FAMILIES: Dict[str, Family] = {
    "torchvision": Family("model.arch", classification_models,
                          "classification backbones; model.layer: any of `featurize layers ARCH`"),
    "temporal": Family("temporal[].kind", lambda: list(HEADS), "video heads: per-frame features -> one clip feature"),
}


def format_models(width: int = 100) -> str:
    blocks = []
    for family, info in FAMILIES.items():
        names = info.names()
        body = textwrap.fill(", ".join(names), width=width, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False)
        blocks.append(f"{family} ({info.key}, {len(names)}): {info.about}\n{body}")
    return "\n\n".join(blocks)


class Node(NamedTuple):
    name: str
    shape: Optional[tuple]  # per sample, without the batch dimension; None: not a tensor
    kind: str  # the output's type when it is not a tensor
    modules: List[str]  # the module names that stand for this node (its last one)


def layer_nodes(arch: str, crop: int = DEFAULT_CROP) -> List[Node]:
    """Every eval-mode node of `arch` with its output at `crop`; an unknown arch or a crop it cannot take is refused."""
    if crop < 1:
        raise ModelError(f"--crop: {crop} is not a positive number of pixels")
    cfg = ModelConfig(arch=arch, weights="none")
    check_arch(cfg)
    model = build_backbone(cfg)
    forward_at_crop(model, cfg, crop, model)  # a crop it cannot take is refused in the model's words
    train_nodes, nodes = get_graph_node_names(model)
    # Only the eval graph matters; train mode is traced too, asked for its output alone.
    extractor = create_feature_extractor(model, train_return_nodes=train_nodes[-1:], eval_return_nodes=nodes).eval()
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


def format_layers(arch: str, crop: int = DEFAULT_CROP) -> str:
    nodes = layer_nodes(arch, crop)
    rows = [("model.layer", "output per sample", "D (pool avg|max)", "")]
    for node in nodes:
        if node.shape is None:
            shape, dim = f"not a tensor ({node.kind})", "-"
        else:
            shape = "(" + ", ".join(map(str, node.shape)) + ")"
            dim = str(_pooled_dim(node.shape))
        rows.append((node.name, shape, dim, f"= {', '.join(node.modules)}" if node.modules else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{arch} at crop {crop} (eval mode, random weights): {len(nodes)} nodes"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.append("a module's name (after =) stands for its last node; model.layer: null, the default, is the "
                 "classifier's input")
    return "\n".join(lines)


def _pooled_dim(shape: tuple) -> int:
    """D after cnn.pool's avg or max: channels of a map, width of tokens, else everything flattened."""
    if len(shape) == 3:  # C, H, W
        return shape[0]
    if len(shape) == 2:  # tokens, D
        return shape[1]
    return math.prod(shape)
