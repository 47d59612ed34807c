"""`featurize train`: a head fitted on Ray Train (TorchTrainer), fed by Ray Data from the Parquet.

The driver checks the table and the training file (refusals before any work), takes the checkpoint
directory's lease (one training writes there at a time), and starts a TorchTrainer whose workers
stream their shard of the table (never the whole table in memory). Each epoch every worker reports
its metrics and rank 0 a Ray Train checkpoint (weights, optimizer, history) under OUT/_train: a
training that is stopped resumes there from its last epoch when run again, since Ray Train restores
a run of the same name and storage path. At the end the driver writes the checkpoint directory
(checkpoint.py) with the learning curves beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa

from .. import faults
from ..errors import Refused
from ..jobrun import init_ray
from ..lease import Lease
from ..output import OutputExists
from ..progress import clock
from ..redact import logger, redact
from ..sources import filesystem
from . import checkpoint as ckpt
from .config import TrainConfig, cache_bytes
from .models import TEMPORAL, supervised
from .table import FeatureTable, open_table
from .tensors import SEQUENCE

log = logger(__name__)
RUNS = "_train"  # Ray Train's run storage under the checkpoint directory: per-epoch checkpoints
STATE = "state.pt"
HERE_BYTES = 64 << 20  # Parquet bytes up to which the driver reads the table itself (see _fit)


class TrainError(Refused, ValueError):
    """A training that cannot start as asked: names the key and the problem."""


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

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    out_uri: str
    epochs: int
    metrics: List[Dict[str, Any]]
    resumed_from: int  # epochs an earlier, stopped run had done
    wall_s: float
    already_done: bool = False


# ---------------------------------------------------------------- the driver

def plan_training(cfg: TrainConfig) -> tuple:
    """(table, Plan): every refusal (column, shape, labels, splits) happens here, before Ray."""
    table = open_table(cfg.data.uri, cfg.data.storage_options)
    shape, dim = table.shape(cfg.data.column)
    temporal = cfg.head.kind in TEMPORAL
    if temporal != (shape == SEQUENCE):
        want = "frame sequences (frame_features)" if temporal else "fixed-size vectors (feature, clip_<name>)"
        raise TrainError(f"data.column: head.kind {cfg.head.kind} trains on {want}; {cfg.data.column!r} holds "
                         f"{'sequences' if shape == SEQUENCE else 'vectors'} of dimension {dim}")
    train_counts, val_counts = _split_counts(table, cfg)
    if not sum(train_counts.values()):
        raise TrainError(f"data.train_split: no rows of split {cfg.data.train_split!r} in {cfg.data.uri} "
                         f"(splits: {', '.join(map(repr, sorted(table.labels(cfg.data.label))))})")
    if not sum(val_counts.values()) and (cfg.data.val_split is not None or cfg.val_fraction > 0):
        where = (f"data.val_split: no rows of split {cfg.data.val_split!r}" if cfg.data.val_split is not None
                 else f"data.val_fraction: {cfg.val_fraction} of {sum(train_counts.values())} rows is none")
        raise TrainError(f"{where} in {cfg.data.uri}; the validation needs rows")
    classes: List[str] = []
    if supervised(cfg.head.kind):
        if len(train_counts) < 2:
            raise TrainError(f"data.label: column {cfg.data.label!r} has one class ({next(iter(train_counts))!r}) "
                             "in the training rows; a classifier needs two or more")
        classes = sorted(set(train_counts) | set(val_counts))
    frames = (cfg.data.frames or table.frames(cfg.data.column)) if temporal else None
    settings = {"data": redact(dataclasses.asdict(cfg.data)), "head": dataclasses.asdict(cfg.head),
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items()
                          if k not in ("workers", "use_gpu", "cpus_per_worker")},
                "table_rows": table.rows(), "dim": dim}
    for how in ("storage_options", "cache"):  # how the table is read, not what is learned
        settings["data"].pop(how, None)
    return table, Plan(cfg.head.kind, cfg.data.column, cfg.data.label, dim, frames, classes,
                       sum(train_counts.values()), sum(val_counts.values()), settings)


def _split_counts(table: FeatureTable, cfg: TrainConfig):
    """Label counts of the training rows and of the validation rows, from the string columns only."""
    from collections import Counter

    for name, key in (("split", "data.train_split"), (cfg.data.label, "data.label")):
        if name not in table.schema.names:
            raise TrainError(f"{key}: {cfg.data.uri} has no column {name!r}")
    t = table.dataset().to_table(columns=["sample_id", "split", cfg.data.label])
    is_train = _rows_of(t, cfg.data.train_split)
    if cfg.data.val_split is not None:
        is_val = _rows_of(t, cfg.data.val_split)
    else:
        is_val = is_train & held_out(t["sample_id"], cfg.val_fraction, cfg.data.seed)
        is_train = is_train & ~is_val
    labels = np.asarray(t[cfg.data.label].to_pylist(), dtype=object)
    return Counter(labels[is_train].tolist()), Counter(labels[is_val].tolist())


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


def train(cfg: TrainConfig, address: Optional[str] = None, say: Callable[[str], None] = print,
          verbose: bool = False) -> TrainResult:
    """Train a head; `say` gets a line per epoch (its progress); `verbose`: everything Ray prints."""
    t0 = time.time()
    table, plan = plan_training(cfg)
    fs, root = filesystem(cfg.output.uri, cfg.out_options)
    root = root.rstrip("/")
    done = _finished(fs, root, plan, cfg.output.uri)
    if done is not None:
        return TrainResult(cfg.output.uri, len(done), done, len(done), 0.0, already_done=True)
    lease = Lease(fs, root, cfg.output.uri, uuid.uuid4().hex[:16]).acquire()
    lease.start_heartbeat()
    try:
        _write_plan(fs, root, plan, cfg)
        state, resumed = _fit(cfg, table, plan, fs, root, address, say, verbose)
        lease.check()
        return _write_checkpoint(cfg, table, plan, state, resumed, t0)
    finally:
        lease.release()


def _finished(fs, root: str, plan: Plan, uri: str) -> Optional[List[Dict[str, Any]]]:
    """The metrics of a finished checkpoint of this same training; None if there is none to resume
    or finish. A checkpoint or run of another training there is refused."""
    try:
        plan_file = json.loads(fs.cat_file(f"{root}/{RUNS}/plan.json"))
    except FileNotFoundError:
        plan_file = None
    finished = fs.exists(f"{root}/{ckpt.CONFIG}")
    if plan_file is None and (finished or _holds_files(fs, root)):
        raise OutputExists(f"output.uri {uri} holds files that no training of this file wrote; "
                           "choose another output.uri")
    if plan_file is not None and plan_file.get("fingerprint") != plan.fingerprint:
        old, new = _flat(plan_file.get("settings", {})), _flat(plan.settings)
        diff = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise OutputExists(f"output.uri {uri} holds the checkpoint of another training (differs in: "
                           f"{', '.join(diff) or 'settings'}); choose another output.uri")
    if finished:
        return json.loads(fs.cat_file(f"{root}/{ckpt.METRICS}"))
    return None


def _flat(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _holds_files(fs, root: str) -> bool:
    try:
        # names starting with _ or . are state (a lease, a demo's mark), not a checkpoint's files
        return any(not os.path.basename(p.rstrip("/")).startswith(("_", ".")) for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def _write_plan(fs, root: str, plan: Plan, cfg: TrainConfig) -> None:
    from ..store import write_atomic

    record = {"name": cfg.name, "fingerprint": plan.fingerprint, "settings": plan.settings}
    write_atomic(fs, f"{root}/{RUNS}/plan.json", json.dumps(record, indent=2, sort_keys=True).encode())


def _fit(cfg: TrainConfig, table: FeatureTable, plan: Plan, fs, root: str, address: Optional[str],
         say: Callable[[str], None], verbose: bool = False):
    """Run the TorchTrainer; returns (the last epoch's state, epochs an earlier run had done)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    init_ray(address, verbose)
    if not address:
        _check_local_resources(cfg)
    storage, storage_fs = _storage(fs, root, cfg)
    lines = Queue()  # the workers' epoch lines, printed here as they come (the driver's console)
    loop_config = {"plan": plan, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                   "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
                   "head": dataclasses.asdict(cfg.head), "lines": lines}
    size = _parquet_bytes(table)
    # A table this small is read here and handed to Ray as blocks: starting Ray Data's read and
    # map tasks (and their worker processes) took longer than the rows (the order demo: ~12 s).
    datasets = _datasets(cfg, plan, here=size <= min(HERE_BYTES, cache_bytes(cfg)))
    if size <= cache_bytes(cfg):
        # Held in Ray's object store across epochs: streaming a small table anew each epoch costs
        # far more than its rows (Ray Data starts its read and map tasks every time).
        datasets = {k: v.materialize() for k, v in datasets.items()}
    loop_config["datasets"] = sorted(datasets)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets=datasets,
        run_config=RunConfig(name=plan.fingerprint, storage_path=storage, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    stop = threading.Event()
    printer = threading.Thread(target=_print_lines, args=(lines, stop, say), daemon=True)
    printer.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        printer.join(timeout=5)
        ray.kill(lines.actor)
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        import torch

        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
    return state, state.get("resumed_from", 0)


def _check_local_resources(cfg: TrainConfig) -> None:
    """An embedded Ray cannot grow: a training asking for more than it has would wait forever
    (a cluster's autoscaler may add nodes, so there the wait is left to Ray)."""
    import ray

    have = ray.cluster_resources()
    cpus = cfg.train.workers * cfg.train.cpus_per_worker
    if cfg.train.use_gpu and have.get("GPU", 0) < cfg.train.workers:
        raise TrainError(f"train.use_gpu: {cfg.train.workers} worker(s) need a GPU each; this machine's Ray has "
                         f"{have.get('GPU', 0):g}")
    if cpus > have.get("CPU", 0):
        raise TrainError(f"train.workers x train.cpus_per_worker: {cpus:g} CPUs asked, this machine's Ray has "
                         f"{have.get('CPU', 0):g}")


def _parquet_bytes(table: FeatureTable) -> int:
    return sum(table.fs.size(f) for f in table.files)


def _print_lines(lines, stop: threading.Event, say: Callable[[str], None]) -> None:
    from ray.util.queue import Empty

    while not stop.is_set() or not lines.empty():
        try:
            say(lines.get(timeout=0.5))
        except Empty:
            continue
        except Exception:  # the queue's actor is gone: the run ended
            return


def _storage(fs, root: str, cfg: TrainConfig):
    """Ray Train's storage_path (and filesystem, for an object store) for OUT/_train."""
    from ..store import is_local

    if is_local(fs):
        return os.path.abspath(f"{root}/{RUNS}"), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return f"{root}/{RUNS}", PyFileSystem(FSSpecHandler(fs))


def _datasets(cfg: TrainConfig, plan: Plan, here: bool = False) -> Dict[str, Any]:
    from .loader import ray_dataset

    common = {"column": plan.column, "label": plan.label, "classes": plan.classes or None,
              "frames": plan.frames, "storage_options": cfg.data.storage_options, "here": here}
    if not supervised(plan.kind):
        common["label"] = None
    frac, seed = cfg.val_fraction, cfg.data.seed
    if cfg.data.val_split is not None:
        out = {"train": ray_dataset(cfg.data.uri, split=cfg.data.train_split, **common),
               "val": ray_dataset(cfg.data.uri, split=cfg.data.val_split, **common)}
    elif frac > 0:
        out = {"train": ray_dataset(cfg.data.uri, split=cfg.data.train_split,
                                    keep=lambda t: pa.array(~held_out(t["sample_id"], frac, seed)), **common),
               "val": ray_dataset(cfg.data.uri, split=cfg.data.train_split,
                                  keep=lambda t: pa.array(held_out(t["sample_id"], frac, seed)), **common)}
    else:
        out = {"train": ray_dataset(cfg.data.uri, split=cfg.data.train_split, **common)}
    return out


def _write_checkpoint(cfg: TrainConfig, table: FeatureTable, plan: Plan, state: Dict[str, Any], resumed: int,
                      t0: float) -> TrainResult:
    from .models import build
    from .plot import curves_png

    model = build(plan.kind, plan.dim, len(plan.classes) or 1, dataclasses.asdict(cfg.head), cfg.train.seed)
    model.load_state_dict(state["model"])
    metrics = state["history"]
    config = {"name": cfg.name, "kind": plan.kind,
              "input": {"column": plan.column, "dim": plan.dim, "frames": plan.frames},
              "head": dataclasses.asdict(cfg.head), "out_dim": int(model.out_dim),
              "label": plan.label if plan.classes else None, "classes": plan.classes,
              "source": table.provenance(), "train": plan.settings,
              "rows": {"train": plan.train_rows, "val": plan.val_rows}, "metrics": metrics[-1] if metrics else {}}
    ckpt.save(cfg.output.uri, cfg.out_options, model, config, metrics, curves_png(metrics, f"{cfg.name} ({plan.kind})"))
    _drop_runs(cfg, plan)
    return TrainResult(cfg.output.uri, len(metrics), metrics, resumed, time.time() - t0)


def _drop_runs(cfg: TrainConfig, plan: Plan) -> None:
    """The per-epoch states only served to resume; the finished checkpoint keeps _train/plan.json,
    which tells a rerun of the same training that there is nothing left to do."""
    fs, root = filesystem(cfg.output.uri, cfg.out_options)
    try:
        fs.rm(f"{root.rstrip('/')}/{RUNS}/{plan.fingerprint}", recursive=True)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- the workers

def train_loop(config: Dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from .models import build

    plan: Plan = config["plan"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"])
    device = get_device()
    model = build(plan.kind, plan.dim, len(plan.classes) or 1, config["head"], config["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    history: List[Dict[str, Any]] = []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:  # an earlier run of this training stopped: go on from its last epoch
        with resumed.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
    first = len(history)
    model = prepare_model(model)
    shards = {name: ray.train.get_dataset_shard(name) for name in config["datasets"]}
    for epoch in range(first, config["epochs"]):
        t = time.time()
        row = {"epoch": epoch + 1}
        row.update(_pass(model, shards["train"], plan, device, config, optimizer, epoch, "train"))
        if shards.get("val") is not None:
            with torch.no_grad():
                row.update(_pass(model, shards["val"], plan, device, config, None, epoch, "val"))
        row["seconds"] = round(time.time() - t, 3)
        row["samples_per_s"] = round(row.pop("train_rows") / max(row["seconds"], 1e-9), 1)
        history.append(row)
        checkpoint = None
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                bare = model.module if hasattr(model, "module") else model
                torch.save({"model": {k: v.cpu() for k, v in bare.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "history": history, "resumed_from": first},
                           os.path.join(d, STATE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                ran = history[first:]  # this run's epochs: their mean time, for the time left
                eta = sum(r["seconds"] for r in ran) / len(ran) * (config["epochs"] - epoch - 1)
                config["lines"].put(format_epoch(row, config["epochs"], eta))
            ray.train.report(row, checkpoint=checkpoint)
        faults.point("epoch", str(epoch + 1))  # the tests stop a training here, its epoch saved


def _pass(model, shard, plan: Plan, device, config, optimizer, epoch: int, name: str) -> Dict[str, float]:
    """One pass over a dataset shard: mean loss (and accuracy), summed across workers."""
    import torch
    import torch.nn.functional as F

    model.train(optimizer is not None)
    sums = torch.zeros(3, dtype=torch.float64)  # loss * rows, correct, rows
    batches = shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                       local_shuffle_buffer_size=4 * config["batch_size"] if optimizer else None,
                                       local_shuffle_seed=config["seed"] + epoch if optimizer else None)
    for batch in batches:
        x, lengths = batch["x"], batch.get("lengths")
        out = model(x, lengths)
        if supervised(plan.kind):
            y = batch["y"]
            loss = F.cross_entropy(out, y)
            sums[1] += (out.argmax(dim=1) == y).sum().item()
        else:
            loss = F.mse_loss(out, x)
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sums[0] += loss.item() * len(x)
        sums[2] += len(x)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, correct, rows = sums.tolist()
    out = {f"{name}_loss": loss / rows if rows else None}
    if supervised(plan.kind):
        out[f"{name}_acc"] = correct / rows if rows else None
    if name == "train":
        out["train_rows"] = rows
    return out


def format_epoch(row: Dict[str, Any], epochs: int, eta_s: Optional[float] = None) -> str:
    """`epoch   3/20  train loss 0.4120 acc 0.875  val loss 0.5300 acc 0.800  412 samples/s  ETA 0:41`:
    the progress of a training, a line per epoch (the live line of a run, progress.py, has the same ETA)."""
    parts = [f"epoch {row['epoch']:>3}/{epochs}"]
    for name in ("train", "val"):
        if row.get(f"{name}_loss") is None:
            continue
        acc = row.get(f"{name}_acc")
        what = "loss" if acc is not None or f"{name}_acc" in row else "mse"
        parts.append(f"{name} {what} {row[f'{name}_loss']:.4f}" + (f" acc {acc:.3f}" if acc is not None else ""))
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    if eta_s is not None:
        parts.append(f"ETA {clock(eta_s)}")
    return "  ".join(parts)
