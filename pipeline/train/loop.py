"""`featurize train`: a head fitted on Ray Train (TorchTrainer), fed by Ray Data from the Parquet.

The driver checks the table and the training file (refusals before any work), takes the checkpoint
directory's lease (one training writes there at a time), and starts a TorchTrainer whose workers
stream their shard of the table (never the whole table in memory). Each epoch every worker reports
its metrics and rank 0 a Ray Train checkpoint (weights, optimizer, history) under OUT/_train: a
training that is stopped resumes there from its last epoch when run again, since Ray Train restores
a run of the same name and storage path (its states are safetensors and JSON, state.py, never
a pickle). The plan and its refusals are train_plan.py's, the checkpoint directory's states outdir.py's,
the epochs epochs.py's. At the end the driver writes the checkpoint directory
(checkpoint.py) with the learning curves beside it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import pyarrow as pa

from ..errors import TrainError
from ..jobrun import init_ray
from ..output.lease import Lease
from ..output.store import filesystem
from ..output.table import FeatureTable
from ..redact import logger
from . import checkpoint as ckpt
from . import outdir
from . import state as epoch_state
from .epoch_lines import EpochLines, shown
from .epochs import format_epoch, train_loop
from .models import supervised
from .outdir import RUNS
from .train_plan import Plan, held_out, plan_training, train_settings
from .trainfile import TrainConfig, cache_bytes

__all__ = ["TrainError", "TrainResult", "format_epoch", "plan_training", "train"]
log = logger(__name__)
HERE_BYTES = 64 << 20  # Parquet bytes up to which the driver reads the table itself (see _fit)


@dataclass
class TrainResult:
    out_uri: str
    epochs: int
    metrics: List[Dict[str, Any]]
    resumed_from: int  # epochs an earlier, stopped run had done
    wall_s: float
    already_done: bool = False
    selected_by: str = ""  # which epoch the checkpoint holds and why (config.json's selected_by)
    evaluation: Optional[Dict[str, Any]] = None  # of the validation rows (evaluate.py), also in eval.json
    sweep: Optional[str] = None  # --sweep: which trial was kept (sweep.json has them all)


# ---------------------------------------------------------------- the driver

def train(cfg: TrainConfig, address: Optional[str] = None, say: Callable[[str], None] = print,
          verbose: bool = False, overwrite: bool = False, sweep=None) -> TrainResult:
    """Train a head; `say` gets a line per epoch (its progress); `verbose`: everything Ray prints;
    `overwrite`: replace the earlier training of the checkpoint directory (outdir.clear) and train anew;
    `sweep` (a sweep.Sweep): one trial per grid point through Ray Tune, the best kept."""
    t0 = time.time()
    table, plan = plan_training(cfg)
    size = _parquet_bytes(table)  # decides how the rows reach the workers (_fit), and if lbfgs can run
    cfg = _optimizer(cfg, plan, size, sweep, say)
    _check_full_batch(cfg, size)
    if sweep is not None:  # its grid decides the checkpoint too: another grid is another training
        sweep.prepare(cfg, plan, address)
        plan.settings["sweep"] = sweep.settings(cfg.train.lr)
    fs, root = filesystem(cfg.output.uri, cfg.out_options)
    root = root.rstrip("/")
    done = outdir.finished(fs, root, plan, cfg.output.uri, overwrite)
    if done is not None:
        return TrainResult(cfg.output.uri, len(done), done, len(done), 0.0, already_done=True)
    lease = Lease(fs, root, cfg.output.uri, uuid.uuid4().hex[:16]).acquire()
    lease.start_heartbeat()
    try:
        if overwrite:  # under the lease: no other training is writing there
            outdir.clear(fs, root)
        outdir.check_states(fs, root, plan, cfg.output.uri)
        outdir.write_plan(fs, root, plan, cfg)
        state, resumed = _fit(cfg, plan, size, fs, root, address, say, verbose, sweep)
        lease.check()
        result = _write_checkpoint(cfg, table, plan, state, resumed, t0)
        result.sweep = sweep.summary() if sweep is not None else None
        result.evaluation = _evaluate(cfg, say)
        return result
    finally:
        lease.release()


def _fit(cfg: TrainConfig, plan: Plan, size: int, fs, root: str, address: Optional[str],
         say: Callable[[str], None], verbose: bool = False, sweep=None):
    """Run the TorchTrainer; returns (the last epoch's state, epochs an earlier run had done)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(address, verbose)
    held = size <= cache_bytes(cfg)  # the table's Parquet bytes within data.cache: held in memory
    if not address:
        _check_local_resources(cfg, streamed=not held)
    storage, storage_fs = _storage(fs, root, cfg)
    loop_config = {"plan": plan, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                   "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
                   "head": dataclasses.asdict(cfg.head), **_recipe(cfg, plan)}
    # A table this small is read here and handed to Ray as blocks: starting Ray Data's read and
    # map tasks (and their worker processes) took longer than the rows (the order demo: ~12 s).
    datasets = _datasets(cfg, plan, here=size <= min(HERE_BYTES, cache_bytes(cfg)))
    streamed = datasets
    if held:
        # Held in Ray's object store across epochs: streaming a small table anew each epoch costs
        # far more than its rows (Ray Data starts its read and map tasks every time). Split here and
        # handed to the workers in their config: through Ray Train's `datasets` a DatasetManager and
        # a SplitCoordinator actor a dataset would start (three more processes, ~4 s of a 15 s
        # training on 2 cores) only to hand out blocks that are already in the object store.
        datasets = {k: v.materialize() for k, v in datasets.items()}
        loop_config["shards"] = {k: _split(v, cfg.train.workers) for k, v in datasets.items()}
        streamed = None
    loop_config["datasets"] = sorted(datasets)
    loop_config["statistics"] = _statistics(cfg, datasets["train"], local=held)
    stopped: List[str] = []
    lines = EpochLines(shown(say, stopped) if sweep is None else sweep.shown(say))
    loop_config["lines"] = lines.queue
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            datasets=streamed,
            run_config=RunConfig(name=plan.fingerprint, storage_path=storage, storage_filesystem=storage_fs,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        # --sweep: this trainer, once per grid point (sweep.py); the best trial's result comes back
        result = trainer.fit() if sweep is None else sweep.fit(trainer, lines)
    finally:
        lines.close()
    if result.error:
        raise result.error
    if stopped:
        raise TrainError(f"training {cfg.name} stopped at {stopped[0]}; that epoch was not saved and no "
                         f"checkpoint was written (lower train.lr, or look for non-finite features in {cfg.data.uri})")
    with result.checkpoint.as_directory() as d:
        state = epoch_state.load_folder(d)  # safetensors and JSON: never a pickle
    return state, state["resumed_from"]


def _split(dataset, workers: int) -> List[Any]:
    """A materialised dataset's shard for each worker: equal rows, as Ray Train's own split
    (streaming_split(equal=True)) gives them, so every worker takes the same number of steps."""
    return [dataset] if workers == 1 else dataset.split(workers, equal=True)


def _statistics(cfg: TrainConfig, train_rows, local: bool) -> Optional[Dict[str, Any]]:
    """head.normalize standard: the training rows' mean and std (moments.py), before the workers
    start; they set them in the head, whose weights then carry them everywhere."""
    if cfg.head.normalize != "standard":
        return None
    from .moments import standard_statistics

    return standard_statistics(train_rows, local)


def _recipe(cfg: TrainConfig, plan: Plan) -> Dict[str, Any]:
    """What the workers' optimiser, schedule, epoch selection and loss need (recipe.py, selection.py)."""
    from .recipe import steps_per_epoch

    t = cfg.train
    return {"optimizer": t.optimizer, "schedule": t.schedule, "warmup": t.warmup, "clip_grad": t.clip_grad,
            "select": t.select, "patience": t.patience, "class_weights": plan.class_weights,
            "steps_per_epoch": steps_per_epoch(plan.train_rows, t.workers, t.batch_size)}


def _evaluate(cfg: TrainConfig, say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """The new head on the validation rows (eval.json, confusion.png beside it); the checkpoint is
    written and kept whatever happens here."""
    from .evaluate import evaluate_training

    try:
        return evaluate_training(cfg)
    except Exception as e:  # noqa: BLE001 - an evaluation that fails leaves a good checkpoint
        say(f"featurize: the evaluation of {cfg.name} failed: {type(e).__name__}: {e}")
        return None


def _optimizer(cfg: TrainConfig, plan: Plan, size: int, sweep, say: Callable[[str], None]) -> TrainConfig:
    """train.optimizer auto, resolved: lbfgs for a linear head's --sweep on a table held in memory
    (each trial scikit-learn's regularised optimum, as the CLIP paper's probes), adamw otherwise.
    The plan records what was resolved, so a rerun resumes or finds it done."""
    if cfg.train.optimizer != "auto":
        return cfg
    probe = sweep is not None and plan.kind == "linear"
    chosen = "lbfgs" if probe and size <= cache_bytes(cfg) else "adamw"
    if probe and say is not None:
        say(f"featurize: --sweep on a linear head: train.optimizer {chosen}"
            + (" (each trial a full-batch L-BFGS fit to its optimum)" if chosen == "lbfgs" else
               f" (the table's {size} bytes are over data.cache {cfg.data.cache}, which lbfgs needs)"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer=chosen))
    plan.settings["train"] = train_settings(cfg)
    return cfg


def _check_full_batch(cfg: TrainConfig, size: int) -> None:
    """train.optimizer lbfgs gathers each worker's training rows at once (lbfgs.py): only a table held
    in memory (data.cache) is sure to fit."""
    if cfg.train.optimizer == "lbfgs" and size > cache_bytes(cfg):
        raise TrainError(f"data.cache: train.optimizer lbfgs fits on all the training rows at once and needs the "
                         f"table held in memory; its Parquet files are {size} bytes, over data.cache "
                         f"{cfg.data.cache} (raise data.cache, or use train.optimizer adamw)")


def _check_local_resources(cfg: TrainConfig, streamed: bool) -> None:
    """An embedded Ray cannot grow: a training asking for more than it has would wait forever
    (a cluster's autoscaler may add nodes, so there the wait is left to Ray). A table streamed each
    epoch (larger than data.cache) needs a CPU besides the workers' for Ray Data's read tasks: with
    every CPU held by a worker the first epoch waited for one forever."""
    import ray

    have = ray.cluster_resources()
    cpus = cfg.train.workers * cfg.train.cpus_per_worker
    if streamed and cpus + 1 > have.get("CPU", 0):
        raise TrainError(f"train.workers x train.cpus_per_worker: {cpus:g} CPUs asked, and the table, larger than "
                         f"data.cache, is read by Ray Data each epoch on one more; this machine's Ray has "
                         f"{have.get('CPU', 0):g} (lower train.workers, or raise data.cache)")
    if cfg.train.use_gpu and have.get("GPU", 0) < cfg.train.workers:
        raise TrainError(f"train.use_gpu: {cfg.train.workers} worker(s) need a GPU each; this machine's Ray has "
                         f"{have.get('GPU', 0):g}")
    if cpus > have.get("CPU", 0):
        raise TrainError(f"train.workers x train.cpus_per_worker: {cpus:g} CPUs asked, this machine's Ray has "
                         f"{have.get('CPU', 0):g}")


def _parquet_bytes(table: FeatureTable) -> int:
    return sum(table.sizes.values())  # from open_table's listing: no request per file


def _storage(fs, root: str, cfg: TrainConfig):
    """Ray Train's storage_path (and filesystem, for an object store) for OUT/_train."""
    from ..output.store import is_local

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
    if plan.train_splits is not None:  # train_split null: every split but the val_split's rows trains
        parts = [ray_dataset(cfg.data.uri, split=s, **common) for s in plan.train_splits]
        out = {"train": parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0],
               "val": ray_dataset(cfg.data.uri, split=cfg.data.val_split, **common)}
    elif cfg.data.val_split is not None:
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
    metrics = state["history"]
    epoch, selected_by = _selected(cfg, plan, state)
    model.load_state_dict(state["best_model"] if epoch != len(metrics) and state["best_model"] else state["model"])
    config = {"name": cfg.name, "kind": plan.kind,
              "input": {"column": plan.column, "dim": plan.dim, "frames": plan.frames},
              "head": dataclasses.asdict(cfg.head), "out_dim": int(model.out_dim),
              "label": plan.label if plan.classes else None, "classes": plan.classes,
              "source": {**table.provenance(), "lineage": plan.settings["table"]}, "train": plan.settings,
              "rows": {"train": plan.train_rows, "val": plan.val_rows},
              "metrics": metrics[epoch - 1] if metrics else {}, "epoch": epoch, "selected_by": selected_by}
    config["normalize"] = cfg.head.normalize  # standard: the statistics are buffers in the weights
    ckpt.save(cfg.output.uri, cfg.out_options, model, config, metrics, curves_png(metrics, f"{cfg.name} ({plan.kind})"))
    fs, root = filesystem(cfg.output.uri, cfg.out_options)
    outdir.drop_runs(fs, root.rstrip("/"), plan)
    return TrainResult(cfg.output.uri, len(metrics), metrics, resumed, time.time() - t0, selected_by=selected_by)


def _selected(cfg: TrainConfig, plan: Plan, state: Dict[str, Any]):
    """(the epoch the checkpoint holds, 1-based, and why), from the last epoch state's record."""
    from .selection import Selection

    chosen = Selection(supervised(plan.kind), cfg.train.select, cfg.train.patience, state["best"], plan.val_rows,
                       cfg.train.optimizer)
    run = len(state["history"])
    return chosen.selected_by(run, early=run < cfg.train.epochs)
