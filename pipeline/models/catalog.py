"""`featurize models` and `featurize layers ARCH`: what a job's model keys accept, without Ray.

Names come per family from the family's own registry (torchvision's `list_models`, timm's, open_clip's,
the temporal heads' HEADS): every model family (base.py) is listed, and the temporal heads. Layers come
from the family: torchvision's are the eval-mode nodes of `get_graph_node_names`, timm's and open_clip's
the named modules the forward runs; each with its output shape from one forward of a zero image through
the randomly initialised model on the CPU (no weights are fetched).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..config import DEFAULT_CROP, ModelConfig
from ..errors import ModelError
from .base import Node, family, family_names
from .temporal import HEADS


@dataclass(frozen=True)
class Listed:
    key: str  # the job key that takes these names
    names: Callable[[], List[str]]
    about: Callable[[], str]


def _model_family(name: str) -> Listed:
    return Listed(f"model.arch, model.family: {name}", lambda: family(name).names(), lambda: family(name).about)


FAMILIES: Dict[str, Listed] = {
    **{name: _model_family(name) for name in family_names()},
    "temporal": Listed("temporal[].kind", lambda: list(HEADS), lambda: "video heads: per-frame features -> one clip "
                       "feature"),
}


def format_models(width: int = 100, only: Optional[str] = None) -> str:
    if only is not None and only not in FAMILIES:
        raise ModelError(f"--family: {only!r} is not one of {', '.join(FAMILIES)}")
    blocks = []
    for name, info in FAMILIES.items():
        if only is not None and name != only:
            continue
        names = info.names()
        body = textwrap.fill(", ".join(names), width=width, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False)
        blocks.append(f"{name} ({info.key}, {len(names)}): {info.about()}\n{body}")
    return "\n\n".join(blocks)


def layer_nodes(arch: str, crop: int = DEFAULT_CROP, family_name: str = "torchvision") -> List[Node]:
    """Every layer of `arch` with its output at `crop`; an unknown arch or a crop it cannot take is refused."""
    if crop < 1:
        raise ModelError(f"--crop: {crop} is not a positive number of pixels")
    fam = family(family_name)
    fam.check(ModelConfig(arch=arch, family=family_name, weights="none"))
    return fam.layers(arch, crop)


def format_layers(arch: str, crop: int = DEFAULT_CROP, family_name: str = "torchvision") -> str:
    nodes = layer_nodes(arch, crop, family_name)
    rows = [("model.layer", "output per sample", "D (pool avg|max)", "")]
    for node in nodes:
        if node.shape is None:
            shape, dim = f"not a tensor ({node.kind})", "-"
        else:
            shape = "(" + ", ".join(map(str, node.shape)) + ")"
            dim = str(_pooled_dim(node.shape))
        rows.append((node.name, shape, dim, f"= {', '.join(node.modules)}" if node.modules else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{arch} ({family_name}) at crop {crop} (eval mode, random weights): {len(nodes)} layers"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.append(f"a module's name (after =) stands for its last node; model.layer: null, the default, is "
                 f"{family(family_name).default_layer_about}")
    return "\n".join(lines)


def _pooled_dim(shape: tuple) -> int:
    """D after base.pool's avg or max: channels of a map, width of tokens, else everything flattened."""
    if len(shape) in (3, 4):  # C, H, W or a clip's C, T, H, W
        return shape[0]
    if len(shape) == 2:  # tokens, D
        return shape[1]
    return math.prod(shape)
