"""The training's epochs, as each Ray Train worker runs them (loop.py starts them).

Each epoch every worker reports its metrics and rank 0 the epoch's state (state.py: safetensors and
JSON: the weights, the optimizer's and the learning-rate scheduler's states, the best epoch so far
and its weights) as a Ray Train checkpoint, from which a stopped training resumes; `train.patience`
epochs without a better one end the training early (selection.py). An epoch whose loss (or the
weights it leaves) is not finite ends the training: its state is not saved, and the driver is told
through the lines queue (`{"stopped": ...}`), since Ray Train's result only holds checkpointed reports.
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Dict, List, Optional

from .. import faults
from ..progress import clock
from . import recipe
from . import state as epoch_state
from .models import supervised
from .selection import Selection


def train_loop(config: Dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from . import lbfgs
    from .models import build, normalizer

    plan = config["plan"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"])
    device = get_device()
    full = config.get("optimizer") == "lbfgs"  # a full-batch fit (lbfgs.py), in float64
    model = build(plan.kind, plan.dim, len(plan.classes) or 1, config["head"], config["seed"])
    if full:
        model.double()
    if config.get("statistics"):  # head.normalize standard: the driver's (moments.py); a resume loads them too
        normalizer(model).set_statistics(config["statistics"]["mean"], config["statistics"]["std"])
    optimizer, scheduler = recipe.optimizer_and_schedule(model, config)
    history: List[Dict[str, Any]] = []
    chosen = Selection(supervised(plan.kind), config["select"], config["patience"], val_rows=plan.val_rows,
                       optimizer=config.get("optimizer", "adamw"))
    resumed = ray.train.get_checkpoint()
    if resumed is not None:  # an earlier run of this training stopped: go on from its last epoch
        with resumed.as_directory() as d:
            state = epoch_state.load_folder(d)  # safetensors and JSON: never a pickle
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:  # the learning rate goes on along the same curve
            scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        chosen = Selection(supervised(plan.kind), config["select"], config["patience"], state["best"],
                           plan.val_rows, config.get("optimizer", "adamw"))
        chosen.weights = state["best_model"]
    first = len(history)
    model = model.to(device) if full else prepare_model(model)  # lbfgs sums the workers' gradients itself
    if history and chosen.stop(len(history)):  # it had stopped early: nothing left to do
        return
    shards = ({name: parts[rank] for name, parts in config["shards"].items()} if config.get("shards")
              else {name: ray.train.get_dataset_shard(name) for name in config["datasets"]})  # loop.py's _fit
    steps = {"optimizer": optimizer, "scheduler": scheduler, "clip": recipe.clip_norm(plan.kind, config["clip_grad"])}
    rows = {k: lbfgs.gather(v, device) for k, v in shards.items() if v is not None} if full else None
    for epoch in range(first, config["epochs"]):
        t = time.time()
        lr = scheduler.get_last_lr()[0] if scheduler else optimizer.param_groups[0]["lr"]
        row: Dict[str, Any] = {"epoch": epoch + 1, "lr": round(lr, 8)}
        if full:  # its training and validation rows
            row.update(lbfgs.epoch(model, optimizer, rows, config["weight_decay"], _weight(config, device)))
        else:
            row.update(_pass(model, shards["train"], plan, device, config, steps, epoch, "train"))
            if shards.get("val") is not None:
                with torch.no_grad():
                    row.update(_pass(model, shards["val"], plan, device, config, None, epoch, "val"))
        bare = model.module if hasattr(model, "module") else model
        stopped = _not_finite(row, bare)
        if stopped:  # every worker saw the same sums (all_reduce) and the same weights: all stop here
            if rank == 0:
                config["lines"].put({"stopped": f"epoch {epoch + 1}: {stopped}"})
            return
        row["seconds"] = round(time.time() - t, 3)
        row["samples_per_s"] = round(row.pop("train_rows") / max(row["seconds"], 1e-9), 1)
        history.append(row)
        chosen.update(row, bare.state_dict())
        early = chosen.stop(epoch + 1)  # the same on every worker: the metrics are all-reduced
        checkpoint = None
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                epoch_state.save(d, bare.state_dict(), lbfgs.state_dict(optimizer) if full else optimizer.state_dict(),
                                 history, first, scheduler.state_dict() if scheduler else None,
                                 chosen.record or None, chosen.weights)
                checkpoint = ray.train.Checkpoint.from_directory(d)
                ran = history[first:]  # this run's epochs: their mean time, for the time left
                eta = sum(r["seconds"] for r in ran) / len(ran) * (config["epochs"] - epoch - 1)
                config["lines"].put(format_epoch(row, config["epochs"], None if early else eta))
                if early:
                    config["lines"].put(early)
            ray.train.report(row, checkpoint=checkpoint)
        faults.point("epoch", str(epoch + 1))  # the tests stop a training here, its epoch saved
        if early:
            return


def _weight(config: Dict[str, Any], device):
    """train.class_weights balanced, as lbfgs's float64 loss weighs the classes (None: equal)."""
    import torch

    weights = config.get("class_weights")
    return torch.tensor(weights, dtype=torch.float64, device=device) if weights else None


def _not_finite(row: Dict[str, Any], model) -> Optional[str]:
    """What is not finite after an epoch (a loss, or the weights), or None."""
    import torch

    for name in ("train", "val"):
        if row.pop(f"{name}_nonfinite", 0):
            return f"the {name} loss is not finite (nan or inf)"
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"the weights are not finite ({bad[0]})"
    return None


def _pass(model, shard, plan, device, config, steps, epoch: int, name: str) -> Dict[str, Any]:
    """One pass over a dataset shard (training when `steps` holds the optimizer, scheduler and clip):
    mean loss (and accuracy), summed across workers, and whether a batch's loss was not finite (the
    pass goes on: under DDP every worker must take each step). Class weights weigh the training loss
    only: the validation loss stays comparable between trainings."""
    import torch
    import torch.nn.functional as F

    optimizer = steps["optimizer"] if steps else None
    weight = None
    if optimizer is not None and config.get("class_weights"):
        weight = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    model.train(optimizer is not None)
    sums = torch.zeros(4, dtype=torch.float64)  # loss * rows, correct, rows, batches with a non-finite loss
    order = recipe.shuffle_seed(config["seed"], epoch) if optimizer else None  # a stream per (seed, epoch)
    batches = shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                       local_shuffle_buffer_size=4 * config["batch_size"] if optimizer else None,
                                       local_shuffle_seed=order)
    for batch in batches:
        x, lengths = batch["x"], batch.get("lengths")
        out = model(x, lengths)
        if supervised(plan.kind):
            y = batch["y"]
            loss = F.cross_entropy(out, y, weight=weight)
            sums[1] += (out.argmax(dim=1) == y).sum().item()
        else:
            loss = F.mse_loss(out, getattr(model, "module", model).target(x))  # its normalised input
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            if steps["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), steps["clip"])
            optimizer.step()
            steps["scheduler"].step()
        value = loss.item()
        if math.isfinite(value):
            sums[0] += value * len(x)
        else:
            sums[3] += 1
        sums[2] += len(x)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, correct, rows, nonfinite = sums.tolist()
    out: Dict[str, Any] = {f"{name}_loss": loss / rows if rows else None, f"{name}_nonfinite": int(nonfinite)}
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
