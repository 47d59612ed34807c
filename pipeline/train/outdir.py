"""The checkpoint directory as a training finds it: finished, resumable, another's, or replaced.

    OUT/_train/plan.json           the training's settings and fingerprint (written before any epoch)
    OUT/_train/<fingerprint>/      Ray Train's run: checkpoint_*/ hold the epoch states (state.py)
    OUT/config.json, model...      the finished checkpoint (checkpoint.py)

`--overwrite` removes only these: the finished checkpoint's files by name (config.json first, so a
reader never takes the rest for a checkpoint), plan.json and the run folders named by a fingerprint.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional

from ..errors import OutputExists, TrainError
from ..output.store import write_atomic
from . import checkpoint as ckpt
from . import state as epoch_state
from .train_plan import Plan, compare
from .trainfile import TrainConfig

RUNS = "_train"  # Ray Train's run storage under the checkpoint directory: per-epoch checkpoints
PLAN = "plan.json"
RUN_NAME = re.compile(r"[0-9a-f]{16}")  # Plan.fingerprint: Ray Train's run folders
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints (JSON)
CHECKPOINT = re.compile(r"checkpoint_[A-Za-z0-9_.\-]+")  # the folders it names, inside the run's folder
# what a training writes beside the checkpoint: the validation rows' evaluation (evaluate.py), a sweep's record
TRAINING_EXTRAS = ("eval.json", "confusion.png", "sweep.json", "sweep.png")


def finished(fs, root: str, plan: Plan, uri: str, overwrite: bool = False) -> Optional[List[Dict[str, Any]]]:
    """The metrics of a finished checkpoint of this same training; None if there is none (or if it
    is to be overwritten). Files no training wrote are refused, and so (unless `overwrite`) is the
    checkpoint or run of another training, or of this one on a table that changed since."""
    recorded = _recorded(fs, root, uri)
    done = fs.exists(f"{root}/{ckpt.CONFIG}")
    if recorded is None and (done or _holds_files(fs, root)):
        raise OutputExists(f"output.uri {uri} holds files that no training of this file wrote; "
                           "choose another output.uri")
    if overwrite:
        return None
    compare(recorded, plan, uri)
    if done:
        return json.loads(fs.cat_file(f"{root}/{ckpt.METRICS}"))
    return None


def _recorded(fs, root: str, uri: str) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(fs.cat_file(f"{root}/{RUNS}/{PLAN}"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise TrainError(f"{uri}/{RUNS}/{PLAN}: not valid JSON; run with --overwrite to train anew") from None
    return record if isinstance(record, dict) else {}


def _holds_files(fs, root: str) -> bool:
    try:
        # names starting with _ or . are state (a lease, a demo's mark), not a checkpoint's files
        return any(not os.path.basename(p.rstrip("/")).startswith(("_", ".")) for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def clear(fs, root: str) -> None:
    """--overwrite: the earlier training's files, and only those (the caller holds the lease)."""
    for name in (ckpt.CONFIG, ckpt.MODEL, ckpt.HEAD, ckpt.HEAD_JSON, ckpt.METRICS, ckpt.CURVES):
        _rm(fs, f"{root}/{name}")
    for name in TRAINING_EXTRAS:
        _rm(fs, f"{root}/{name}")
    try:
        entries = fs.ls(f"{root}/{RUNS}", detail=False)
    except FileNotFoundError:
        return
    for path in entries:
        if RUN_NAME.fullmatch(os.path.basename(path.rstrip("/"))):
            fs.rm(path, recursive=True)
    _rm(fs, f"{root}/{RUNS}/{PLAN}")


def _rm(fs, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def write_plan(fs, root: str, plan: Plan, cfg: TrainConfig) -> None:
    record = {"name": cfg.name, "fingerprint": plan.fingerprint, "settings": plan.settings}
    write_atomic(fs, f"{root}/{RUNS}/{PLAN}", json.dumps(record, indent=2, sort_keys=True).encode())


def check_states(fs, root: str, plan: Plan, uri: str) -> None:
    """Every epoch state Ray Train could resume from is read here first, as the workers would read
    it (safetensors and JSON only): a folder holding anything else is refused before any work, and
    so is Ray Train's record of them when it is not JSON or names a folder outside the run's."""
    run = f"{root}/{RUNS}/{plan.fingerprint}"
    try:
        entries = fs.ls(run, detail=True)
    except FileNotFoundError:
        return
    _check_snapshot(fs, run, f"{uri}/{RUNS}/{plan.fingerprint}/{SNAPSHOT}")
    for entry in entries:
        name = os.path.basename(entry["name"].rstrip("/"))
        if entry["type"] != "directory" or not name.startswith("checkpoint_"):
            continue
        where = f"{uri}/{RUNS}/{plan.fingerprint}/{name}"
        folder = entry["name"].rstrip("/")
        epoch_state.check_names(fs.ls(folder, detail=False), where)
        epoch_state.load(lambda n, folder=folder: fs.cat_file(f"{folder}/{n}"), where)


def _check_snapshot(fs, run: str, where: str) -> None:
    try:
        record = json.loads(fs.cat_file(f"{run}/{SNAPSHOT}"))
    except FileNotFoundError:
        return
    except ValueError as e:
        raise TrainError(f"{where}: not valid JSON ({str(e)[:100]}); run with --overwrite to train anew") from None
    names = list(_dir_names(record))
    if not isinstance(record, dict) or not all(isinstance(n, str) and CHECKPOINT.fullmatch(n) and ".." not in n
                                               for n in names):
        raise TrainError(f"{where}: not Ray Train's record of this run's checkpoints (it names a folder outside "
                         "the run's); run with --overwrite to train anew")


def _dir_names(value: Any):
    """Every checkpoint folder name in Ray Train's snapshot (checkpoint_dir_name, *_dir_names)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "checkpoint_dir_name":
                yield v
            elif k.endswith("checkpoint_dir_names") and isinstance(v, list):
                yield from v
            else:
                yield from _dir_names(v)
    elif isinstance(value, list):
        for v in value:
            yield from _dir_names(v)


def drop_runs(fs, root: str, plan: Plan) -> None:
    """The epoch states only served to resume; the finished checkpoint keeps _train/plan.json,
    which tells a rerun of the same training that there is nothing left to do."""
    try:
        fs.rm(f"{root}/{RUNS}/{plan.fingerprint}", recursive=True)
    except FileNotFoundError:
        pass
