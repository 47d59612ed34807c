"""The model seam: one small contract per family, and what every family shares.

A family (pipeline/models/families/<name>.py, chosen by `model.family`) builds, from the job's
ModelConfig, a module that maps a normalised float NCHW batch to pooled features (N, D); it names
its models, resolves a weights *name* (files and `none` are handled here for all), gives its
preprocessing defaults and lists a model's layers. Everything else (the actor in actor.py:
decoding in the actor, GPU decode, failpoints, committer registration, timing; prepare.py's
checks; the output columns `feature` / `frame_features`) is written once and takes any family.

Adding a family is one new file in families/ defining `FAMILY = SomeFamily()`, plus its tests:
it is found by its module name, which is the value of `model.family`.

A clip family (`clips = True`; its module name ends in `_video`, which config.py reads without
importing it) maps a clip (N, 3, T, H, W) to one feature each: a video job then gives one row per
window with `feature`, and needs no temporal heads.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from ..config import ModelConfig, model_families
from ..errors import ModelError, Refused, WeightsError, did_you_mean
from ..output.provenance import random_init_id
from .weights import Weights, from_file, looks_like_path


class Node(NamedTuple):
    """One layer `featurize layers` lists."""

    name: str
    shape: Optional[tuple]  # per sample, without the batch dimension; None: not a tensor
    kind: str  # the output's type when it is not a tensor
    modules: List[str]  # the module names that stand for this node (its last one)


class Family:
    """The contract. `build` is the only method that loads weights; all run on CPU unless moved."""

    name = ""
    about = ""  # one line for `featurize models`
    default_layer = "penultimate"  # what model.layer: null gives, as the provenance names it ...
    default_layer_about = "the classifier's input"  # ... and as `featurize layers` explains it
    clips = False  # True: the module takes clips (N, 3, T, H, W), one feature per clip

    def example(self, crop: int, frames: int) -> torch.Tensor:
        """The zero input of one sample a forward checks the model with."""
        return torch.zeros(1, 3, crop, crop)

    def input_words(self, crop: int, frames: int) -> str:
        return f"{crop}x{crop} images"

    def names(self) -> List[str]:
        """Every model.arch this family accepts."""
        raise NotImplementedError

    def check(self, cfg: ModelConfig) -> None:
        """Refuse (ModelError) an arch this family does not know, naming the closest."""
        names = self.names()
        if cfg.arch not in names:
            raise ModelError(f"model.arch: {cfg.arch!r} is not a model of {self.name}{did_you_mean(cfg.arch, names)} "
                             f"(featurize models --family {self.name} lists them)")

    def weights_by_name(self, cfg: ModelConfig) -> Weights:
        """model.weights that is neither a file nor `none`: a name resolved from a local cache."""
        raise NotImplementedError

    def preprocess_defaults(self, cfg: ModelConfig, weights: Weights) -> Dict[str, Any]:
        """resize, crop, interpolation, mean, std: what preprocess.* keys left unset become."""
        return dict(weights.transforms)

    def build(self, cfg: ModelConfig, weights: Optional[Weights], storage_options: Dict[str, Any]) -> nn.Module:
        """The eval-mode module: normalised float (N, 3, H, W) -> pooled features (N, D)."""
        raise NotImplementedError

    def layers(self, arch: str, crop: int) -> List[Node]:
        """Every layer model.layer accepts, with its output per sample at `crop`."""
        raise NotImplementedError

    def crop_hint(self, arch: str) -> str:
        """What to say when the model cannot take a crop."""
        return "try a larger crop"


def family_names() -> List[str]:
    return model_families()


def family(name: str) -> Family:
    """The family `model.family` names; its library is imported only now."""
    names = family_names()
    if name not in names:
        raise ModelError(f"model.family: {name!r} is not one of {', '.join(names)}{did_you_mean(name, names)}")
    return importlib.import_module(f"{__package__}.families.{name}").FAMILY


def resolve(cfg: ModelConfig, storage_options: Optional[Dict[str, Any]] = None) -> Weights:
    """Identify the weights and check they can be had; runs on the driver before any work. Beside
    the registry, because a weights *name* is the family's to resolve."""
    if cfg.weights.lower() == "none":
        return Weights(kind="none", id=random_init_id(cfg.seed))
    if looks_like_path(cfg.weights):
        return from_file(cfg, storage_options)
    return family(cfg.family).weights_by_name(cfg)


def check_arch(cfg: ModelConfig) -> None:
    family(cfg.family).check(cfg)


def preprocess_defaults(cfg: ModelConfig, weights: Weights) -> Dict[str, Any]:
    return family(cfg.family).preprocess_defaults(cfg, weights)


def build_module(cfg: ModelConfig, weights: Optional[Weights], storage_options: Optional[Dict[str, Any]] = None):
    return family(cfg.family).build(cfg, weights, storage_options or {})


def feature_dim(cfg: ModelConfig, crop: int, weights: Optional[Weights] = None,
                storage_options: Optional[Dict[str, Any]] = None, frames: int = 16) -> int:
    """Checks arch, layer, crop (and a clip family's `frames`) and (when given) that the weights fit;
    returns D after one forward pass."""
    fam = family(cfg.family)
    module = fam.build(cfg, weights, storage_options or {})
    out = forward_at_crop(module, cfg, crop, fam.crop_hint(cfg.arch), fam.example(crop, frames),
                          fam.input_words(crop, frames))
    if not torch.is_tensor(out) or out.ndim != 2:
        raise ModelError(f"model.layer: {cfg.layer!r} of {cfg.arch} gives no tensor to pool")
    return int(out.shape[1])


def forward_at_crop(module: nn.Module, cfg: ModelConfig, crop: int, hint: str = "try a larger crop",
                    x: Optional[torch.Tensor] = None, words: str = "") -> Any:
    """One forward of a zero image (or `x`) at the crop; a model that cannot take it is refused, naming the
    crop it needs."""
    try:
        with torch.inference_mode():
            return module(torch.zeros(1, 3, crop, crop) if x is None else x)
    except Refused:
        raise
    except Exception as e:  # ViT's `Wrong image height!`, a kernel larger than a tiny input ...
        size = getattr(module, "image_size", None)  # the transformers that take one size only
        if isinstance(size, int):
            hint = f"it needs crop {size}"
        raise ModelError(f"preprocess.crop: {cfg.arch} does not take {words or f'{crop}x{crop} images'} "
                         f"({first_line(e)}); "
                         f"{hint}") from None


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def pool(x: Any, how: str) -> torch.Tensor:
    """A feature map (N, C, H, W), a clip's (N, C, T, H, W) or tokens (N, T, D) pooled to (N, D); anything
    else flattened."""
    if isinstance(x, dict):
        x = x["feature"]
    if isinstance(x, (tuple, list)):  # modules that return (output, extras ...)
        x = x[0]
    if x.ndim == 5:  # N, C, T, H, W
        dims = (2, 3, 4)
    elif x.ndim == 4:  # N, C, H, W
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


class Pooled(nn.Module):
    """`module`'s output pooled as model.pool asks."""

    def __init__(self, module: nn.Module, how: str):
        super().__init__()
        self.module, self.how = module, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.module(x), self.how)


class _Reached(Exception):
    """Raised by the hook once the wanted module has run: the layers after it are never computed."""


class ModuleOutput(nn.Module):
    """The output of the named submodule of `model`, pooled: the forward stops right after it."""

    def __init__(self, model: nn.Module, name: str, how: str, forward: str = "forward"):
        super().__init__()
        self.model, self.name, self.how, self.forward_name = model, name, how, forward
        self.target = model.get_submodule(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box: Dict[str, Any] = {}

        def hook(_module, _inputs, out):
            box["out"] = out
            raise _Reached

        handle = self.target.register_forward_hook(hook)
        try:
            getattr(self.model, self.forward_name)(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "out" not in box:
            raise ModelError(f"model.layer: {self.name} is not run by the model's forward")
        return pool(box["out"], self.how)


def module_layer(model: nn.Module, cfg: ModelConfig, forward: str = "forward") -> nn.Module:
    """model.layer as a named submodule of `model`, refused with the closest names when it is not one."""
    names = [n for n, _ in model.named_modules() if n]
    if cfg.layer not in names:
        raise ModelError(f"model.layer: {cfg.layer!r} is not a module of {cfg.arch}{did_you_mean(cfg.layer, names)} "
                         f"(featurize layers {cfg.arch} --family {cfg.family} lists them)")
    return ModuleOutput(model, cfg.layer, cfg.pool, forward).eval()


def module_layers(model: nn.Module, crop: int, forward: str = "forward",
                  x: Optional[torch.Tensor] = None) -> List[Node]:
    """Every named submodule of `model` that runs, in the order it runs, with its output at `crop` (or for `x`)."""
    seen: Dict[str, Any] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out))
               for name, m in model.named_modules() if name]
    try:
        with torch.inference_mode():
            getattr(model, forward)(torch.zeros(1, 3, crop, crop) if x is None else x)
    finally:
        for h in handles:
            h.remove()
    return [Node(name, tuple(out.shape[1:]) if torch.is_tensor(out) else None, type(out).__name__, [])
            for name, out in seen.items()]


def fit_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], weights: Weights, arch: str) -> nn.Module:
    """Load `state` into `model`; weights that do not fit it are refused on one line."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: name the first, count the rest, on one line
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else str(e)
        raise WeightsError(
            f"model.weights: {weights.id} does not fit {arch} ({len(problems)} mismatches; first: {first})"
        ) from None
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {weights.id} does not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model
