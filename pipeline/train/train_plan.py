"""What a training reads and what decides its checkpoint, resolved by the driver before any work.

Every refusal about the table (column, shape, labels, splits) happens here, before Ray; and so does
the comparison with what a checkpoint directory already holds (the same training: resume or nothing
to do; another training, or the same on a table that changed since: refused, or replaced with
--overwrite).
"""
from __future__ import annotations

import dataclasses
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa

from ..errors import OutputExists, TrainError
from ..fingerprint import changed, fingerprint, flat
from ..output.table import FeatureTable, open_table
from ..output.tensors import SEQUENCE
from ..redact import redact, redact_text
from .models import TEMPORAL, supervised
from .recipe import class_weights
from .trainfile import TrainConfig

OVERWRITE = "run with --overwrite to replace it, or choose another output.uri"


@dataclass
class Plan:
    """What the driver resolved before any work: shipped to every worker."""

    kind: str
    column: str
    label: str
    dim: int
    frames: Optional[int]
    classes: List[str]
    train_rows: int
    val_rows: int
    settings: Dict[str, Any]  # what decides the checkpoint: a rerun with other settings is refused
    train_splits: Optional[List[str]] = None  # train_split null with a val_split: the other splits
    class_weights: Optional[List[float]] = None  # train.class_weights balanced: the loss's weight per class

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)


def plan_training(cfg: TrainConfig, note: Optional[Callable[[str], None]] = None) -> tuple:
    """(table, Plan); `note` gets a line about what the training does that the file does not say
    (default: stderr)."""
    table = open_table(cfg.data.uri, cfg.data.storage_options)
    shape, dim = table.shape(cfg.data.column)
    temporal = cfg.head.kind in TEMPORAL
    if temporal != (shape == SEQUENCE):
        want = "frame sequences (frame_features)" if temporal else "fixed-size vectors (feature, clip_<name>)"
        raise TrainError(f"data.column: head.kind {cfg.head.kind} trains on {want}; {cfg.data.column!r} holds "
                         f"{'sequences' if shape == SEQUENCE else 'vectors'} of dimension {dim}")
    train_counts, val_counts, excluded, train_splits = _split_counts(table, cfg)
    if excluded:
        (note or _stderr)(f"featurize: data.train_split is null: every split trains except data.val_split "
                          f"{cfg.data.val_split!r}, whose {excluded} rows only validate")
    classes: List[str] = []
    if supervised(cfg.head.kind):
        if len(train_counts) < 2:
            raise TrainError(f"data.label: column {cfg.data.label!r} has one class ({next(iter(train_counts))!r}) "
                             "in the training rows; a classifier needs two or more")
        classes = sorted(set(train_counts) | set(val_counts))
    frames = (cfg.data.frames or table.frames(cfg.data.column)) if temporal else None
    settings = {"data": redact(dataclasses.asdict(cfg.data)), "head": dataclasses.asdict(cfg.head),
                "train": train_settings(cfg),
                "table_rows": table.rows(), "dim": dim,
                "table": table.lineage()}  # which table: a rebuilt one (other model, other files) is another
    for how in ("storage_options", "cache"):  # how the table is read, not what is learned
        settings["data"].pop(how, None)
    weights = class_weights(classes, train_counts, cfg.train.class_weights) if classes else None
    return table, Plan(cfg.head.kind, cfg.data.column, cfg.data.label, dim, frames, classes,
                       sum(train_counts.values()), sum(val_counts.values()), settings, train_splits, weights)


def train_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """What of train.* decides the checkpoint: not how many workers run it; train.optimizer only when
    not adamw, so a checkpoint trained before the key existed keeps its fingerprint (and resumes)."""
    return {k: v for k, v in dataclasses.asdict(cfg.train).items()
            if k not in ("workers", "use_gpu", "cpus_per_worker") and (k, v) != ("optimizer", "adamw")}


def _stderr(line: str) -> None:
    print(redact_text(line), file=sys.stderr, flush=True)


def _split_counts(table: FeatureTable, cfg: TrainConfig):
    """Label counts of the training rows and of the validation rows (from the string columns only);
    with train_split null and a val_split: how many rows the val_split took out, and the splits left."""
    for name, key in (("split", "data.train_split"), (cfg.data.label, "data.label")):
        if name not in table.schema.names:
            raise TrainError(f"{key}: {cfg.data.uri} has no column {name!r}")
    t = table.dataset().to_table(columns=["sample_id", "split", cfg.data.label])
    is_train = _rows_of(t, cfg.data.train_split)
    if not is_train.any():
        raise TrainError(f"data.train_split: no rows of split {cfg.data.train_split!r} in {cfg.data.uri} "
                         f"(splits: {', '.join(map(repr, sorted(set(t['split'].to_pylist()))))})")
    excluded, train_splits = 0, None
    if cfg.data.val_split is not None:
        is_val = _rows_of(t, cfg.data.val_split)
        excluded = int((is_train & is_val).sum())  # train_split null: validation rows never train
        is_train = is_train & ~is_val
        if excluded:
            train_splits = sorted({s for s in t["split"].to_pylist() if s is not None} - {cfg.data.val_split})
        if not is_train.any():
            raise TrainError(f"data.train_split: every row of {cfg.data.uri} is of data.val_split "
                             f"{cfg.data.val_split!r}; none is left to train on")
    else:
        is_val = is_train & held_out(t["sample_id"], cfg.val_fraction, cfg.data.seed)
        if is_val.all():
            raise TrainError(f"data.val_fraction: {cfg.val_fraction} of the {int(is_train.sum())} training rows "
                             f"left none to train on in {cfg.data.uri}; lower it")
        is_train = is_train & ~is_val
    if not is_val.any() and (cfg.data.val_split is not None or cfg.val_fraction > 0):
        where = (f"data.val_split: no rows of split {cfg.data.val_split!r}" if cfg.data.val_split is not None
                 else f"data.val_fraction: {cfg.val_fraction} of {int(is_train.sum())} rows is none")
        raise TrainError(f"{where} in {cfg.data.uri}; the validation needs rows")
    labels = np.asarray(t[cfg.data.label].to_pylist(), dtype=object)
    return Counter(labels[is_train].tolist()), Counter(labels[is_val].tolist()), excluded, train_splits


def _rows_of(t: pa.Table, split: Optional[str]) -> np.ndarray:
    if split is None:
        return np.ones(len(t), dtype=bool)
    return np.asarray(t["split"].to_pylist(), dtype=object) == split


def held_out(sample_ids, fraction: float, seed: int) -> np.ndarray:
    """The rows val_fraction validates on: a hash of (seed, sample_id), so every reader (the driver,
    each Ray Data task, a rerun) picks the same rows without coordination."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    ids = sample_ids.to_pylist() if hasattr(sample_ids, "to_pylist") else list(sample_ids)
    cut = int(fraction * 2**32)
    return np.fromiter((zlib.crc32(f"{seed}:{s}".encode()) < cut for s in ids), dtype=bool, count=len(ids))


# ---------------------------------------------------------------- what the checkpoint directory holds

def compare(recorded: Optional[Dict[str, Any]], plan: Plan, uri: str) -> None:
    """Refuse when `recorded` (OUT/_train/plan.json) is of another training, or of this one on a
    table that changed since; None or the same training passes."""
    if recorded is None:
        return
    old, new = recorded.get("settings", {}), plan.settings
    if not isinstance(old, dict):
        old = {}
    if "table" not in old:  # trained before the table's lineage was recorded: compare the rest
        new = {k: v for k, v in new.items() if k != "table"}
    if recorded.get("fingerprint") == plan.fingerprint or ("table" not in old and fingerprint(old) == fingerprint(new)):
        return
    diff = changed(flat(old), flat(new))
    if diff and all(k.startswith("table.") or k in ("table_rows", "dim") for k, _ in diff):
        raise OutputExists(f"data.uri {plan.settings['data'].get('uri')} changed since the checkpoint in output.uri "
                           f"{uri} was trained on it (in: {_changes(diff)}); {OVERWRITE}")
    raise OutputExists(f"output.uri {uri} holds the checkpoint of another training (differs in: "
                       f"{_changes(diff) or 'settings'}); {OVERWRITE}")


def _changes(diff: List[tuple]) -> str:
    """`model "resnet18" -> "resnet34"`, `its files' names or sizes`, `head.hidden 16 -> 8`."""
    parts = []
    for k, change in diff:
        if k == "table.digest":
            parts.append("its files' names or sizes")
        elif k.startswith("table.provenance."):
            parts.append(f"{k[len('table.provenance.'):]} {change}")
        else:
            parts.append(f"{k[len('table.'):] if k == 'table.files' else k} {change}")
    return ", ".join(parts)
