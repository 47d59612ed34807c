"""The training file: dataclasses (defaults live here), YAML loading, `--set` overrides, checks.

Parsed by the same strict builder as job files: unknown keys and wrong types are refused before
any work, naming the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from ..config import build_config, memory_bytes, read_job_file, same_store
from ..errors import ConfigError

KIND = Literal["lstm", "attention", "linear", "mlp", "autoencoder"]


@dataclass
class DataConfig:
    uri: str  # a `featurize run` output root, local or object store
    column: str = "feature"  # frame_features (lstm, attention) | feature | clip_<name>
    label: str = "label"
    train_split: Optional[str] = "train"  # rows of this split train; null: every row
    val_split: Optional[str] = None  # rows of this split validate ...
    val_fraction: Optional[float] = None  # ... or this share of the training rows (default 0.1)
    seed: int = 0  # which rows val_fraction takes
    frames: Optional[int] = None  # frame_features: clips padded (or cut) to this many; null: the longest
    # a table whose Parquet files are smaller stays in Ray's object store across epochs (0: never)
    cache: Union[int, str] = "1GiB"
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    kind: KIND
    # lstm/attention/mlp hidden size (null: the input dimension); autoencoder: its one hidden layer
    hidden: Optional[int] = None
    layers: int = 1  # lstm
    bidirectional: bool = False  # lstm
    dropout: float = 0.0  # mlp
    code_dim: Optional[int] = None  # autoencoder: required
    # the input, before the head sees it: standard (per-dimension mean and std of the training rows,
    # saved in the checkpoint), l2 (each vector, each frame, to unit length) or none
    normalize: Literal["standard", "l2", "none"] = "standard"


@dataclass
class TrainSettings:
    # AdamW; the defaults were chosen on bench/train_quality.py's tasks (bench/README.md says how).
    # lbfgs (head.kind linear, a table within data.cache): the linear probe of the CLIP paper, a
    # full-batch L-BFGS fit of mean cross-entropy + weight_decay / 2 * |W|^2 (bias unpenalised), i.e.
    # scikit-learn's LogisticRegression(C=1 / (weight_decay * training rows)); lr, batch_size, schedule,
    # warmup and clip_grad do not apply (its line search sets the step), each epoch is up to 50 iterations
    # auto: lbfgs for --sweep on a linear head whose table is within data.cache (the protocol's own
    # fit: AdamW's trials stayed 0.98-0.99 of scikit-learn's), adamw otherwise
    optimizer: Literal["auto", "adamw", "lbfgs"] = "auto"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    weight_decay: float = 0.0  # AdamW's decoupled decay; lbfgs: the L2 coefficient above
    schedule: Literal["cosine", "constant"] = "cosine"  # the learning rate per step, after the warm-up
    warmup: float = 0.05  # the share of the steps whose learning rate rises linearly from 0 (0: none)
    clip_grad: Optional[float] = None  # the gradients' norm cap; null: 1.0 for lstm and attention, none else
    select: Literal["best", "last"] = "best"  # best: the epoch of the best validation accuracy (loss: autoencoder)
    patience: Optional[int] = None  # stop after this many epochs without a better one; null: never early
    class_weights: Literal["balanced", "none"] = "none"  # balanced: n / (classes * count) per class in the loss
    seed: int = 0
    workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class TrainOutput:
    uri: str  # the checkpoint directory
    storage_options: Optional[Dict[str, Any]] = None  # null: data.storage_options when on the same store


@dataclass
class TrainConfig:
    name: str
    data: DataConfig
    head: HeadConfig
    output: TrainOutput
    train: TrainSettings = field(default_factory=TrainSettings)

    @property
    def out_options(self) -> Dict[str, Any]:
        if self.output.storage_options is not None:
            return self.output.storage_options
        return dict(self.data.storage_options) if same_store(self.output.uri, self.data.uri) else {}

    @property
    def val_fraction(self) -> float:
        if self.data.val_split is not None:
            return 0.0
        return 0.1 if self.data.val_fraction is None else self.data.val_fraction


def cache_bytes(cfg: TrainConfig) -> int:
    return 0 if cfg.data.cache in (0, "0") else memory_bytes(cfg.data.cache, "data.cache")


def is_training_file(data: Any) -> bool:
    """A training file has `head:`; a job file has `source:` (submit and run take both)."""
    return isinstance(data, dict) and "head" in data and "source" not in data


def parse_training(data: Any, overrides: Optional[List[str]] = None) -> TrainConfig:
    cfg = build_config(TrainConfig, data, overrides)
    _check(cfg)
    return cfg


def load_training(path: str, overrides: Optional[List[str]] = None) -> TrainConfig:
    return parse_training(read_job_file(path, "training file"), overrides)


def _check(cfg: TrainConfig) -> None:
    """Every value before any work: a one-line refusal naming the key (NaN and inf included)."""
    for key, value in (("name", cfg.name), ("data.uri", cfg.data.uri), ("data.column", cfg.data.column),
                       ("output.uri", cfg.output.uri)):
        if not value.strip():
            raise ConfigError(f"{key}: must not be empty")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.workers": cfg.train.workers, "head.layers": cfg.head.layers,
                "head.hidden": cfg.head.hidden, "data.frames": cfg.data.frames}  # None: not set; 0 is no size
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {value}")
    if not 0 <= cfg.train.seed < 2**32:  # torch.manual_seed's range
        raise ConfigError(f"train.seed: must be an integer in [0, 2**32), got {cfg.train.seed}")
    _number("train.lr", cfg.train.lr, "must be positive", lambda v: v > 0)
    _number("train.weight_decay", cfg.train.weight_decay, "must be 0 or more", lambda v: v >= 0)
    _number("train.warmup", cfg.train.warmup, "must lie in [0, 1)", lambda v: 0 <= v < 1)
    if cfg.train.clip_grad is not None:
        _number("train.clip_grad", cfg.train.clip_grad, "must be 0 (no clipping) or more", lambda v: v >= 0)
    if cfg.train.patience is not None and cfg.train.patience < 1:
        raise ConfigError(f"train.patience: must be a positive number of epochs (null: no early stop), "
                          f"got {cfg.train.patience}")
    _number("train.cpus_per_worker", cfg.train.cpus_per_worker, "must be positive", lambda v: v > 0)
    cache_bytes(cfg)  # refuses what is not a size
    if not 0 <= cfg.head.dropout < 1:
        raise ConfigError(f"head.dropout: must lie in [0, 1), got {cfg.head.dropout}")
    if cfg.head.kind == "autoencoder" and not (cfg.head.code_dim or 0) >= 1:
        raise ConfigError("head.code_dim: an autoencoder needs a positive code_dim (the size of its code)")
    if cfg.train.optimizer == "lbfgs" and cfg.head.kind != "linear":
        raise ConfigError(f"train.optimizer: lbfgs fits a linear probe (head.kind linear), not {cfg.head.kind}; "
                          "use adamw for it")
    if cfg.head.kind != "autoencoder" and cfg.head.code_dim is not None:
        raise ConfigError(f"head.code_dim: only for kind autoencoder, not {cfg.head.kind}")
    if cfg.data.val_split is not None and cfg.data.val_fraction is not None:
        raise ConfigError("data.val_split and data.val_fraction: choose one")
    if not 0 <= cfg.val_fraction < 1:  # 0: no validation rows (the one way to train on all of a split)
        raise ConfigError(f"data.val_fraction: must lie in [0, 1), got {cfg.data.val_fraction}")
    if cfg.data.val_split is not None and cfg.data.val_split == cfg.data.train_split:
        raise ConfigError(f"data.val_split: {cfg.data.val_split!r} is also data.train_split; validate on other rows")
    if same_store(cfg.output.uri, "file://") and cfg.output.uri.rstrip("/") == cfg.data.uri.rstrip("/"):
        raise ConfigError("output.uri: is data.uri; the checkpoint needs a folder of its own")


def _number(key: str, value: float, rule: str, ok) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if not ok(value):
        raise ConfigError(f"{key}: {rule}, got {value}")
