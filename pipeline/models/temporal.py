"""Temporal heads: per-frame CNN features of a clip (B, T, D) -> one clip feature (B, out_dim).

Heads come from a registry: `mean`, `max` (no weights), `lstm` (the last real time step's output)
and `attention` (additive pooling over frames). Learned heads load a checkpoint: `X.safetensors`
(the head's state dict) with `X.json` beside it (kind, input_size and the shape keys), or the
directory `featurize train` writes (its head.safetensors and head.json). A learned head normalises
its frames first (normalize.py; head.json's `normalize`, absent: `none`), with the statistics in
its weights. Padded frames beyond a clip's `lengths` never touch its feature.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config import TemporalConfig
from ..errors import TemporalError, WeightsError
from ..names import plain_name
from ..output.provenance import random_init_id
from ..output.store import filesystem
from ..rows import error_fields, fail_nonfinite, fail_rows
from ..timing import timed
from .normalize import Normalize
from .weights import read_bytes

SUFFIX = ".safetensors"
Options = Optional[Dict[str, Any]]  # fsspec storage options


def _mask(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, T) True on real frames; None when every frame is real."""
    if lengths is None:
        return None
    return torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]


class MeanHead(nn.Module):
    learned, CONFIG_KEYS = False, ()

    def __init__(self, input_size: int):
        super().__init__()
        self.out_dim = input_size

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = _mask(x, lengths)
        if mask is None:
            return x.mean(dim=1)
        return x.masked_fill(~mask[..., None], 0.0).sum(dim=1) / lengths.to(x)[:, None]


class MaxHead(MeanHead):
    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = _mask(x, lengths)
        return (x if mask is None else x.masked_fill(~mask[..., None], float("-inf"))).amax(dim=1)


class LstmHead(nn.Module):
    learned, CONFIG_KEYS = True, ("hidden_size", "num_layers", "bidirectional")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 normalize: str = "none"):
        super().__init__()
        self.norm = Normalize(input_size, normalize)
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                            batch_first=True)
        self.out_dim = hidden_size * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm(x)
        if lengths is None:
            return self.lstm(x)[0][:, -1]
        # Packing stops each clip at its own length, so the backward direction starts at the
        # last real frame, not at the padding: the same as running the clip alone.
        packed = pack_padded_sequence(x, lengths.cpu().long(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        return out[torch.arange(len(x), device=out.device), lengths.to(out.device).long() - 1]


class AttentionHead(nn.Module):
    """Additive (Bahdanau) pooling: a_t = softmax_t(v^T tanh(W x_t + b)); out = sum_t a_t x_t."""

    learned, CONFIG_KEYS = True, ("hidden_size",)

    def __init__(self, input_size: int, hidden_size: int, normalize: str = "none"):
        super().__init__()
        self.norm = Normalize(input_size, normalize)
        self.proj = nn.Linear(input_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.out_dim = input_size

    def forward_with_weights(self, x: torch.Tensor,
                             lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The clip features (B, D) and the frame weights (B, T); padded frames weigh exactly 0."""
        x = self.norm(x)
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)
        mask = _mask(x, lengths)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
            x = x.masked_fill(~mask[..., None], 0.0)  # 0 * NaN padding would still be NaN
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bt,btd->bd", weights, x), weights

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_with_weights(x, lengths)[0]


HEADS = {"mean": MeanHead, "max": MaxHead, "lstm": LstmHead, "attention": AttentionHead}


@dataclass(frozen=True)
class HeadInfo:
    """A resolved temporal entry; built on the driver, shipped to each actor."""

    key: str  # temporal[i], for messages
    name: str
    kind: str
    config: Dict[str, Any] = field(hash=False)  # the constructor's arguments, with kind
    out_dim: int
    checkpoint: Optional[str] = None
    sha256: str = ""
    seed: int = 0

    @property
    def column(self) -> str:
        return f"clip_{self.name}"

    @property
    def weights_id(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        return random_init_id(self.seed) if HEADS[self.kind].learned else ""

    def provenance(self) -> Dict[str, Any]:
        """What the features' Parquet metadata records for this head."""
        return {"name": self.name, "kind": self.kind, "weights": self.weights_id, "sha256": self.sha256,
                "config": dict(self.config), "dim": self.out_dim}


def resolve_heads(cfgs: List[TemporalConfig], input_dim: int, storage_options: Options = None) -> List[HeadInfo]:
    names = [c.name for c in cfgs]
    for i, name in enumerate(names):
        plain_name(name, f"temporal[{i}].name")  # as config.py checks a job file: a job built in code too
        if names.index(name) != i:
            raise TemporalError(f"temporal[{i}].name: {name!r} is empty or used twice (columns are clip_<name>)")
    return [resolve_head(c, input_dim, storage_options, i) for i, c in enumerate(cfgs)]


def resolve_head(cfg: TemporalConfig, input_dim: int, storage_options: Options = None, index: int = 0) -> HeadInfo:
    """Check an entry and its checkpoint (weights loaded strictly) before any work; runs on the driver."""
    key = f"temporal[{index}]"
    if cfg.kind not in HEADS:
        raise TemporalError(f"{key}.kind: {cfg.kind!r} is not one of {', '.join(HEADS)}")
    cls = HEADS[cfg.kind]
    sha256 = ""
    if cfg.checkpoint and not cls.learned:
        raise TemporalError(f"{key}.checkpoint: a {cfg.kind} head has no weights")
    if cfg.checkpoint and not cfg.checkpoint.endswith(SUFFIX):  # a `featurize train` directory
        cfg = dataclasses.replace(cfg, checkpoint=f"{cfg.checkpoint.rstrip('/')}/head{SUFFIX}")
    if cfg.checkpoint:
        config, data = _read_checkpoint(cfg, input_dim, storage_options or {}, key)
        sha256 = hashlib.sha256(data).hexdigest()
        module = _load(_instantiate(config, cfg.seed, key), data, key)
    elif cls.learned and not cfg.allow_random_init:
        raise TemporalError(f"{key} ({cfg.kind} {cfg.name!r}): a checkpoint is required; "
                            "set allow_random_init: true for tests and demos only")
    else:
        config = _random_config(cfg, input_dim, key)
        module = _instantiate(config, cfg.seed, key)
    return HeadInfo(key=key, name=cfg.name, kind=cfg.kind, config=config, out_dim=int(module.out_dim),
                    checkpoint=cfg.checkpoint, sha256=sha256, seed=cfg.seed)


def build_head(info: HeadInfo, storage_options: Options = None) -> nn.Module:
    """The head with its weights, in eval mode; runs in the actor."""
    module = _instantiate(info.config, info.seed, info.key)
    if info.checkpoint:
        data = _read(info.checkpoint, storage_options or {}, info.key)
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise TemporalError(f"{info.key}.checkpoint: {info.checkpoint} changed while the job ran")
        module = _load(module, data, info.key)
    return module.eval()


def save_head(module: nn.Module, config: Dict[str, Any], path: str, storage_options: Options = None) -> None:
    """Write `path` (.safetensors, the state dict) and its JSON config beside it."""
    from safetensors.torch import save

    if not path.endswith(SUFFIX) or config.get("kind") not in HEADS:
        raise TemporalError(f"save_head: expected a {SUFFIX} path and a config with a known kind, got {path}, {config}")
    fs, local = filesystem(path, storage_options or {})
    with fs.open(local, "wb") as f:
        f.write(save({k: v.detach().contiguous() for k, v in module.state_dict().items()}))
    with fs.open(_json_path(local), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _json_path(checkpoint: str) -> str:
    return checkpoint[: -len(SUFFIX)] + ".json"


def _read(uri: str, storage_options: Dict[str, Any], key: str) -> bytes:
    try:
        return read_bytes(uri, storage_options)
    except WeightsError as e:  # read_bytes speaks of model.weights; this is the temporal entry
        raise TemporalError(f"{key}.checkpoint: {str(e).removeprefix('model.weights: ')}") from None


def _read_checkpoint(cfg: TemporalConfig, input_dim: int, storage_options: Dict[str, Any],
                     key: str) -> Tuple[Dict[str, Any], bytes]:
    if not cfg.checkpoint.endswith(SUFFIX):
        raise TemporalError(f"{key}.checkpoint: {cfg.checkpoint} is not a {SUFFIX} file")
    where = _json_path(cfg.checkpoint)
    text = _read(where, storage_options, key)
    try:
        config = json.loads(text)
    except ValueError as e:  # not JSON, or not even text
        raise TemporalError(f"{key}.checkpoint: {where} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("kind") != cfg.kind:
        found = config.get("kind") if isinstance(config, dict) else config
        raise TemporalError(f"{key}.checkpoint: {where} is for kind {found!r}, the entry says {cfg.kind!r}")
    if config.get("input_size") != input_dim:
        raise TemporalError(f"{key}.checkpoint: {where} has input_size {config.get('input_size')!r}, "
                            f"the frame features have dimension {input_dim}")
    return config, _read(cfg.checkpoint, storage_options, key)


def _random_config(cfg: TemporalConfig, input_dim: int, key: str) -> Dict[str, Any]:
    hidden = input_dim if cfg.hidden_size is None else cfg.hidden_size
    values = {"hidden_size": hidden, "num_layers": cfg.num_layers, "bidirectional": cfg.bidirectional}
    config = {"kind": cfg.kind, "input_size": input_dim, **{k: values[k] for k in HEADS[cfg.kind].CONFIG_KEYS}}
    for name in ("hidden_size", "num_layers"):
        if config.get(name, 1) < 1:
            raise TemporalError(f"{key}.{name}: must be a positive integer, got {config[name]}")
    return config


def _instantiate(config: Dict[str, Any], seed: int, key: str) -> nn.Module:
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            return HEADS[config["kind"]](**kwargs)
    except (TypeError, ValueError) as e:
        raise TemporalError(f"{key}.checkpoint: config {config} does not build a {config['kind']} head ({e})") from None


def _load(module: nn.Module, data: bytes, key: str) -> nn.Module:
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as e:  # random bytes, a truncated download
        raise TemporalError(f"{key}.checkpoint: not a valid safetensors file ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:  # not safetensors, or weights of another shape: one line, the first problem
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise TemporalError(f"{key}.checkpoint: weights do not fit the JSON config ({' '.join(lines[:2])})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a training gone to NaN: every clip feature would be NaN (error rows, not features)
        raise TemporalError(f"{key}.checkpoint: weights that are not finite (nan or inf) in {bad[0]}; "
                            "train the head again")
    return module


class TemporalEmbedder:
    """Ray Data actor: per-frame features -> one `clip_<name>` column per head."""

    def __init__(self, heads: List[HeadInfo], storage_options: Options = None, dtype: str = "float16",
                 torch_threads: int = 1, keep_frame_features: bool = False, device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.heads = [(info, build_head(info, storage_options).to(self.device)) for info in heads]
        self.out_dtype = np.float16 if dtype == "float16" else np.float32
        self.keep = keep_frame_features
        self.output_columns = tuple(info.column for info in heads)

    def clip_features(self, frames: np.ndarray, lengths: np.ndarray) -> Dict[str, np.ndarray]:
        """frames (N, T, D), lengths (N,) -> {column: (N, out_dim) float32}."""
        if len(lengths) and (lengths.min() < 1 or lengths.max() > frames.shape[1]):
            raise ValueError(f"num_frames must lie in 1..{frames.shape[1]}, got {lengths.min()}..{lengths.max()}")
        x = torch.from_numpy(frames).to(self.device)
        n = torch.from_numpy(lengths.astype(np.int64))
        with torch.inference_mode():
            return {info.column: head(x, n).float().cpu().numpy() for info, head in self.heads}

    @timed("temporal")
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        features = batch["frame_features"] if self.keep else batch.pop("frame_features")
        # The sequence each head sees is the sampled frames (repeats included for short videos,
        # which uniform sampling spreads over the sequence), not the count of distinct frames.
        lengths = np.array([len(f) for f in features], dtype=np.int64)
        if self.keep:  # published as stored: float16 can overflow where the model's float32 did not
            fail_nonfinite(batch, {"frame_features": features}, self.out_dtype, "model")
        ok = batch["error_stage"] == ""
        # Rows that failed earlier keep zeros; the sink writes them to the errors table only.
        out = {info.column: np.zeros((len(ok), info.out_dim), dtype=np.float32) for info, _ in self.heads}
        if ok.any():
            try:  # every head first, then assign: a failing head leaves no half-filled rows
                for column, values in self.clip_features(_stack(features, ok), lengths[ok]).items():
                    out[column][ok] = values
            except Exception as e:  # the batch's samples become temporal errors; the job goes on
                fail_rows(batch, ok, error_fields("temporal", e))
        batch.update(fail_nonfinite(batch, out, self.out_dtype, "temporal"))
        return batch


def _stack(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 (N, T, D) of the chosen rows; ragged rows (an object column) are zero-padded."""
    if features.dtype != object:
        return np.ascontiguousarray(features[rows], dtype=np.float32)
    chosen = [np.asarray(f, dtype=np.float32) for f in features[rows]]
    out = np.zeros((len(chosen), max(len(f) for f in chosen), chosen[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(chosen):
        out[i, : len(f)] = f
    return out
