"""A trained head's checkpoint directory: what `featurize train` writes and `apply` and jobs load.

    config.json        kind, head sizes, input column and dimension, label classes in order, the
                       input normalisation (`normalize`, also in `head`), the features table's
                       provenance, the training settings, final metrics. Written last: a directory
                       without it holds no finished checkpoint.
    model.safetensors  the whole trained head (state dict); with `normalize: standard` it holds the
                       training rows' per-dimension mean and std too (buffers `norm.mean`,
                       `norm.std`; `head.norm.*` for lstm/attention), so every loader applies them
    head.safetensors   lstm/attention only: the temporal head alone (its normalisation included),
    head.json          with head.json beside it (`normalize` too): the format an extraction job's
                       `temporal:` entry loads (`checkpoint: DIR`)
    metrics.json       per-epoch train and validation loss and accuracy (or reconstruction error)
    curves.png         the learning curves

A checkpoint written before normalisation existed (no `normalize` key, no buffers) loads as
`normalize: none`; the weights are otherwise loaded strictly (a missing or extra key is refused).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..errors import CheckpointError
from ..output.store import filesystem, write_atomic
from ..redact import redact_strings
from .models import CLASSIFIERS, KINDS, TEMPORAL, build, normalize_mode, temporal_config

CONFIG, MODEL, HEAD, HEAD_JSON, METRICS, CURVES = ("config.json", "model.safetensors", "head.safetensors",
                                                   "head.json", "metrics.json", "curves.png")
FORMAT = 1


def state_bytes(module: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def save(uri: str, storage_options: Optional[Dict[str, Any]], model: nn.Module, config: Dict[str, Any],
         metrics: List[Dict[str, Any]], curves: Optional[bytes] = None) -> None:
    """Write the directory; config.json last, so that a reader never sees half a checkpoint."""
    fs, root = filesystem(uri, storage_options or {})
    root = root.rstrip("/")
    write_atomic(fs, f"{root}/{MODEL}", state_bytes(model))
    if config["kind"] in TEMPORAL:
        write_atomic(fs, f"{root}/{HEAD}", state_bytes(model.head))
        head = temporal_config(config["kind"], config["input"]["dim"], config["head"])
        write_atomic(fs, f"{root}/{HEAD_JSON}", json.dumps(head, indent=2, sort_keys=True).encode())
    write_atomic(fs, f"{root}/{METRICS}", json.dumps(metrics, indent=2).encode())
    if curves is not None:
        write_atomic(fs, f"{root}/{CURVES}", curves)
    config = redact_strings({**config, "format": FORMAT})
    write_atomic(fs, f"{root}/{CONFIG}", json.dumps(config, indent=2, sort_keys=True).encode())


@dataclass
class Checkpoint:
    uri: str
    config: Dict[str, Any]
    model: nn.Module  # in eval mode
    sha256: str  # of model.safetensors

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def input(self) -> Dict[str, Any]:
        return self.config["input"]  # column, dim, frames (sequences)

    @property
    def classes(self) -> List[str]:
        return list(self.config.get("classes") or [])

    @property
    def normalize(self) -> str:
        return normalize_mode(self.config.get("head") or {})

    def columns(self, name: str, dtype: str = "float32") -> List[Tuple[str, pa.DataType]]:
        """The columns apply writes: clip_<name>, pred and probs (from the temporal head's classifier);
        code; or pred and probs."""
        value = pa.float16() if dtype == "float16" else pa.float32()
        scores = [("pred", pa.string()), ("probs", pa.list_(pa.float32(), len(self.classes)))]
        if self.kind in TEMPORAL:
            return [(f"clip_{name}", pa.list_(value, self.model.out_dim)), *scores]
        if self.kind in CLASSIFIERS:
            return scores
        return [("code", pa.list_(value, self.model.out_dim))]

    def outputs(self, x: np.ndarray, lengths: Optional[np.ndarray], name: str) -> Dict[str, np.ndarray]:
        """The columns' values for a batch of inputs (float32 (N, D), or (N, T, D) with lengths)."""
        with torch.inference_mode():
            n = None if lengths is None else torch.from_numpy(lengths)
            embedded = self.model.embed(torch.from_numpy(x), n)
            probs = self.model.probs(embedded).float().numpy() if self.kind in TEMPORAL else None
            out = embedded.float().numpy()
        if self.kind in TEMPORAL:
            return {f"clip_{name}": out, **self._scores(probs)}
        if self.kind in CLASSIFIERS:
            return self._scores(out)
        return {"code": out}

    def _scores(self, probs: np.ndarray) -> Dict[str, np.ndarray]:
        return {"pred": np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)], "probs": probs}

    def provenance(self) -> Dict[str, Any]:
        return {"uri": self.uri, "kind": self.kind, "sha256": self.sha256, "input": self.input,
                "classes": self.classes, "trained_on": self.config.get("source", {}).get("uri")}


def load(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Checkpoint:
    """Read and check a checkpoint directory: its config, then the weights (strictly)."""
    from safetensors.torch import load as load_state

    fs, root = filesystem(uri, storage_options or {})
    root = root.rstrip("/")
    config = _read_config(fs, root, uri)
    try:
        data = fs.cat_file(f"{root}/{MODEL}")
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {MODEL}") from None
    try:
        model = build(config["kind"], config["input"]["dim"], len(config.get("classes") or []) or 1,
                      config["head"])
        model.load_state_dict(load_state(data), strict=True)
    except Exception as e:  # weights of another shape, a truncated file, a key missing: its first lines
        first = " ".join([line.strip() for line in str(e).splitlines() if line.strip()][:2])
        raise CheckpointError(f"{uri}: {MODEL} does not fit {CONFIG} ({type(e).__name__}: {first})") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a training gone to NaN: its outputs would be NaN, its predictions one class
        raise CheckpointError(f"{uri}/{MODEL}: weights that are not finite (nan or inf) in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; train the head again")
    return Checkpoint(uri, config, model.eval(), hashlib.sha256(data).hexdigest())


def _read_config(fs, root: str, uri: str) -> Dict[str, Any]:
    try:
        config = json.loads(fs.cat_file(f"{root}/{CONFIG}"))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {CONFIG}: not a featurize checkpoint, or its training has not "
                              "finished (run it again to resume)") from None
    except ValueError as e:
        raise CheckpointError(f"{uri}: {CONFIG} is not valid JSON ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{uri}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("kind") not in KINDS:
        raise CheckpointError(f"{uri}: {CONFIG} is not a featurize head checkpoint (format {FORMAT})")
    return config


TEMPORAL_NOTE = "in a job     temporal: [{{kind: {kind}, name: {kind}, checkpoint: {out}}}]"
