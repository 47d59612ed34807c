"""A training's per-epoch state, what Ray Train keeps under OUT/_train/<run>/checkpoint_*/ to resume.

    model.safetensors      the head's weights
    optimizer.safetensors  the optimizer's tensors (Adam's moments and step counters)
    state.json             the rest: history, the optimizer's param groups and other values, resumed_from,
                           the learning-rate scheduler's state and the best epoch so far (selection.py)
    best.safetensors       the best epoch's weights (train.select: best; absent in older states)

Nothing there is unpickled (an output folder may lie on a shared bucket, and a planted pickle would
run as the user): a folder holding any other file, or one of these that does not parse, is refused
in one line naming the file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from ..errors import StateError

WEIGHTS, OPTIMIZER, STATE, BEST = "model.safetensors", "optimizer.safetensors", "state.json", "best.safetensors"
FILES = (WEIGHTS, OPTIMIZER, STATE, BEST)
FORMAT = 1


def save(folder: str, model: Dict[str, Any], optimizer: Dict[str, Any], history: List[Dict[str, Any]],
         resumed_from: int, scheduler: Optional[Dict[str, Any]] = None, best: Optional[Dict[str, Any]] = None,
         best_weights: Optional[Dict[str, Any]] = None) -> None:
    """Write the files into `folder` (rank 0's temporary folder, which Ray Train uploads). `scheduler`
    (a LambdaLR's state_dict: plain numbers) and `best` (selection.py's record) go in state.json."""
    from safetensors.torch import save_file

    tensors, values = _split(optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, os.path.join(folder, WEIGHTS))
    save_file(tensors, os.path.join(folder, OPTIMIZER))
    if best_weights is not None:
        save_file({k: v.contiguous() for k, v in best_weights.items()}, os.path.join(folder, BEST))
    record = {"format": FORMAT, "history": history, "resumed_from": resumed_from, "optimizer": values,
              "scheduler": scheduler, "best": best}
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump(record, f)


def load_folder(folder: str) -> Dict[str, Any]:
    """The state in a local folder (Ray Train's checkpoint, as_directory())."""
    check_names(os.listdir(folder), folder)

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    return load(read, folder)


def check_names(names: List[str], where: str) -> None:
    """Refuse a folder holding anything but these files (a planted state.pt, a stray file)."""
    for name in sorted(names):
        if os.path.basename(name.rstrip("/")) not in FILES:
            raise StateError(f"{where}/{os.path.basename(name.rstrip('/'))}: not part of a featurize training's "
                             f"epoch state ({', '.join(FILES)}); it is never loaded. Remove it, or run with "
                             "--overwrite to train anew")


def load(read: Callable[[str], bytes], where: str) -> Dict[str, Any]:
    """{model, optimizer, history, resumed_from, scheduler, best, best_model} from the files; `read(name)`
    gives a file's bytes (best.safetensors may be absent: scheduler, best and best_model are then None)."""
    from safetensors.torch import load as load_tensors

    tensors = {}
    for name in (WEIGHTS, OPTIMIZER, BEST):
        try:
            tensors[name] = load_tensors(read(name))
        except FileNotFoundError:
            if name == BEST:
                continue
            raise StateError(f"{where}/{name}: missing from a featurize training's epoch state") from None
        except Exception as e:  # truncated, or not safetensors
            raise StateError(f"{where}/{name}: not a safetensors file ({type(e).__name__}: {_first(e)})") from None
    try:
        record = json.loads(read(STATE))
    except FileNotFoundError:
        raise StateError(f"{where}/{STATE}: missing from a featurize training's epoch state") from None
    except ValueError as e:
        raise StateError(f"{where}/{STATE}: not valid JSON ({_first(e)})") from None
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("history"), list)
            and isinstance(record.get("optimizer"), dict) and isinstance(record.get("resumed_from"), int)):
        raise StateError(f"{where}/{STATE}: not a featurize training's epoch state (format {FORMAT})")
    try:
        optimizer = _join(tensors[OPTIMIZER], record["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateError(f"{where}/{STATE}: its optimizer state does not fit {OPTIMIZER} ({_first(e)})") from None
    extra = {k: record.get(k) if isinstance(record.get(k), dict) else None for k in ("scheduler", "best")}
    return {"model": tensors[WEIGHTS], "optimizer": optimizer, "history": record["history"],
            "resumed_from": record["resumed_from"], **extra, "best_model": tensors.get(BEST)}


def _split(optimizer: Dict[str, Any]):
    """An optimizer's state_dict -> (its tensors by name, everything else as JSON values)."""
    import torch

    tensors, state = {}, {}
    for pid, values in optimizer["state"].items():
        state[str(pid)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                state[str(pid)][key] = value
    return tensors, {"state": state, "param_groups": optimizer["param_groups"]}


def _join(tensors: Dict[str, Any], values: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of _split: a state_dict for optimizer.load_state_dict."""
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(v) for pid, v in values["state"].items()}
    for name, tensor in tensors.items():
        _, pid, key = name.split(".", 2)
        state[int(pid)][key] = tensor
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in values["param_groups"]]  # JSON made Adam's betas a list
    return {"state": state, "param_groups": groups}


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
