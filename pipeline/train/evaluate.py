"""`featurize eval` (and the evaluation at the end of `featurize train`): how good a trained head is.

The head is loaded from its checkpoint directory (checkpoint.load: the weights with their input
normalisation) and run on the CPU here, in the driver: no Ray, since a head is small and the table is
read batch by batch (FeatureTable's Parquet dataset, only the needed columns; never the whole table).
A classifier gets top-1 and top-k accuracy (k = min(5, classes)), per-class precision, recall, F1 and
support, and a confusion matrix; an autoencoder its mean reconstruction error and, where the rows have
labels, the nearest-centroid accuracy of its code next to that of its input column (metrics.py).
Rows whose label is not one of the head's classes are counted apart, never scored.

The table must be one the head applies to: the same refusals as `featurize apply` (guard.py). The
numbers go to a JSON and the confusion matrix to a PNG in the checkpoint directory.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from ..config import absolute_local, same_store
from ..errors import EvalError, Refused
from ..names import plain_name
from ..output.store import filesystem, write_atomic
from ..output.table import FeatureTable, TableError, open_table
from ..output.tensors import ColumnError, label_codes, sequences, vectors
from ..redact import redact_strings, redact_text
from .checkpoint import Checkpoint, CheckpointError, load
from .guard import check, check_fits, check_input
from .metrics import Centroids, Tally, report
from .models import TEMPORAL, supervised

TRAINING_JSON, TRAINING_PNG = "eval.json", "confusion.png"  # the validation rows', at the end of a training
BATCH_BYTES = 32 << 20  # float32 input per batch: memory stays bounded whatever the table's size
WHERE = "the CPU, in this process (no Ray)"

Keep = Callable[[pa.RecordBatch], np.ndarray]  # which rows of a batch count (val_fraction's hash)


def evaluate_head(checkpoint: str, input_uri: str, split: Optional[str] = None,
                  storage_options: Optional[Dict[str, Any]] = None, allow_other_source: bool = False,
                  write: bool = True) -> Dict[str, Any]:
    """Evaluate the head at `checkpoint` on the rows of `input_uri` (of `split`, else all of them);
    `storage_options` are the input's, and the checkpoint's when on the same store. Writes
    eval-<split|all>.json and confusion-<split|all>.png into the checkpoint directory (unless not
    `write`) and returns the JSON's content. Refusals (featurize.Refused) before any work."""
    for key, value in (("checkpoint", checkpoint), ("--input", input_uri)):
        check(key, value, str, "a path or URI (str)", error=EvalError)
        if not value.strip():
            raise EvalError(f"{key}: must not be empty")
    check("split", split, str, "a split name (str)", nullable=True, error=EvalError)
    check("storage_options", storage_options, dict, "a mapping (dict)", nullable=True, error=EvalError)
    check("allow_other_source", allow_other_source, bool, "True or False", error=EvalError)
    if split is not None:
        try:
            plain_name(split, "--split")  # it names the files written
        except Refused as e:
            raise EvalError(str(e)) from None
    checkpoint, input_uri = absolute_local(checkpoint), absolute_local(input_uri)
    options = dict(storage_options or {})
    ck_options = options if same_store(checkpoint, input_uri) else {}
    head, table = open_both(checkpoint, ck_options, input_uri, options)
    check_fits(head, table, checkpoint, input_uri, head.kind in TEMPORAL, EvalError)
    check_label(head, table, input_uri)
    if split is not None:
        splits = _splits(table)
        if split not in splits:
            raise EvalError(f"--split {split!r}: {redact_text(input_uri)} has no rows of it (splits: "
                            f"{', '.join(map(repr, splits)) or 'none'})")
    check_input(head, table, checkpoint, input_uri, allow_other_source, EvalError)  # refuses, or warns
    result = evaluate(head, table, split=split)
    if write:
        tag = split or "all"
        save(result, checkpoint, ck_options, f"eval-{tag}.json", f"confusion-{tag}.png")
    return result


def open_both(checkpoint: str, ck_options: Dict[str, Any], input_uri: str, options: Dict[str, Any]):
    try:
        return load(checkpoint, ck_options), open_table(input_uri, options, key="--input")
    except (CheckpointError, TableError) as e:
        raise EvalError(str(e)) from None


def check_label(head: Checkpoint, table: FeatureTable, input_uri: str) -> None:
    """A classifier is evaluated against the label column it was trained on."""
    label = head.config.get("label") or "label"
    if supervised(head.kind) and label not in table.schema.names:
        raise EvalError(f"{input_uri} has no label column {label!r}: a {head.kind} head is evaluated against it")


def _splits(table: FeatureTable) -> List[str]:
    if "split" not in table.schema.names:
        return []
    values = table.dataset().to_table(columns=["split"])["split"].unique().to_pylist()
    return sorted(v for v in values if v is not None)


# ---------------------------------------------------------------- the numbers

def evaluate(head: Checkpoint, table: FeatureTable, split: Optional[str] = None, keep: Optional[Keep] = None,
             rows_are: Optional[str] = None) -> Dict[str, Any]:
    """The evaluation of `head` on `table`'s rows of `split` (None: all) that `keep` keeps (None: all)."""
    label = head.config.get("label") or "label"
    has_label = label in table.schema.names
    out: Dict[str, Any] = {
        "checkpoint": head.uri, "checkpoint_sha256": head.sha256, "kind": head.kind, "input": table.uri,
        "column": head.input["column"], "split": split, "rows_are": rows_are or (f"split {split}" if split else "all"),
        "computed_on": WHERE}
    reader = _Reader(head, table, split, keep, label if has_label else None)
    if supervised(head.kind):
        out.update(_classifier(head, reader))
    else:
        out.update(_autoencoder(head, reader))
    if not out.get("rows") and not out.get("unknown_labels", {}).get("rows"):
        raise EvalError(f"{table.uri}: no rows to evaluate ({out['rows_are']})")
    return redact_strings(out)


class _Reader:
    """The selected rows' inputs (float32) and labels, batch by batch."""

    def __init__(self, head: Checkpoint, table: FeatureTable, split: Optional[str], keep: Optional[Keep],
                 label: Optional[str]):
        self.head, self.table, self.split, self.keep, self.label = head, table, split, keep, label
        per_row = 4 * int(head.input["dim"]) * int(head.input.get("frames") or 1)
        self.batch_rows = max(16, min(8192, BATCH_BYTES // per_row))

    def batches(self):
        column = self.head.input["column"]
        columns = [column, "sample_id"] + ([self.label] if self.label else [])
        where = pads.field("split") == self.split if self.split is not None else None
        for batch in self.table.dataset().to_batches(columns=columns, filter=where, batch_size=self.batch_rows):
            if self.keep is not None and len(batch):
                batch = batch.filter(pa.array(self.keep(batch)))
            if not len(batch):
                continue
            labels = batch.column(self.label) if self.label else None
            try:
                if self.head.kind in TEMPORAL:
                    x, lengths = sequences(batch.column(column), self.head.input.get("frames"))
                else:
                    x, lengths = vectors(batch.column(column)), None
            except ColumnError as e:
                raise EvalError(f"column {column!r} of {redact_text(self.table.uri)}: {e}") from None
            yield x, lengths, labels

    def model(self, method: str, x: np.ndarray, lengths: Optional[np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            n = None if lengths is None else torch.from_numpy(lengths)
            return getattr(self.head.model, method)(torch.from_numpy(x), n).float().numpy()


def _classifier(head: Checkpoint, reader: _Reader) -> Dict[str, Any]:
    classes = head.classes
    k = min(5, len(classes))
    tally, unknown = Tally(len(classes), k), Counter()
    for x, lengths, labels in reader.batches():
        y = label_codes(labels, classes)
        known = y >= 0
        if not known.all():
            unknown.update("(none)" if v is None else v for v in np.asarray(labels.to_pylist(), dtype=object)[~known])
        if known.any():
            logits = reader.model("forward", x[known], None if lengths is None else lengths[known])
            tally.add(y[known], _softmax(logits))
    out = report(tally.confusion, classes, k, tally.topk_hits)
    out["unknown_labels"] = {"rows": sum(unknown.values()), "labels": dict(unknown.most_common(20))}
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _autoencoder(head: Checkpoint, reader: _Reader) -> Dict[str, Any]:
    """Mean squared reconstruction error per value (the training's loss), and the nearest-centroid
    accuracy of the code and of the input on the rows' labels (two passes: class means, then rows)."""
    target = getattr(head.model, "target", None)  # the input as the head reconstructs it (normalised)
    squared, values, rows = 0.0, 0, 0
    classes = _labels_of(reader)
    probes = None
    if len(classes) >= 2:
        probes = {"code": Centroids(len(classes), head.model.out_dim),
                  "input": Centroids(len(classes), int(head.input["dim"]))}
    for x, _, labels in reader.batches():
        recon = reader.model("forward", x, None)
        want = x if target is None else _call(target, x)
        squared += float(((recon - want) ** 2).sum())
        values += want.size
        rows += len(x)
        if probes:
            y = label_codes(labels, classes)
            known = y >= 0
            probes["code"].add(y[known], reader.model("embed", x[known], None))
            probes["input"].add(y[known], x[known])
    out: Dict[str, Any] = {"rows": rows, "reconstruction_mse": squared / values if values else None}
    if probes:
        for x, _, labels in reader.batches():
            y = label_codes(labels, classes)
            known = y >= 0
            probes["code"].score(y[known], reader.model("embed", x[known], None))
            probes["input"].score(y[known], x[known])
        out["nearest_centroid"] = {"code": probes["code"].accuracy, "input": probes["input"].accuracy,
                                   "classes": len(classes), "rows": probes["code"].rows,
                                   "how": "cosine to each label's mean of these rows, the row itself left out"}
    else:
        out["nearest_centroid"] = None
        out["nearest_centroid_note"] = ("no label column" if reader.label is None
                                        else "fewer than two labels among these rows")
    return out


def _labels_of(reader: _Reader) -> List[str]:
    """The labels of the selected rows (their string column only), sorted."""
    if reader.label is None:
        return []
    seen = set()
    for batch in reader.table.dataset().to_batches(columns=[reader.label, "sample_id"],
                                                   filter=pads.field("split") == reader.split
                                                   if reader.split is not None else None):
        if reader.keep is not None and len(batch):
            batch = batch.filter(pa.array(reader.keep(batch)))
        seen.update(v for v in batch.column(reader.label).to_pylist() if v is not None)
    return sorted(seen)


def _call(fn, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return fn(torch.from_numpy(x)).float().numpy()


# ---------------------------------------------------------------- written beside the head

def save(result: Dict[str, Any], checkpoint: str, options: Dict[str, Any], json_name: str,
         png_name: str) -> Tuple[str, ...]:
    """The JSON, and the confusion matrix's picture for a classifier; returns what was written."""
    from .figures import confusion_png

    fs, root = filesystem(checkpoint, options)
    root = root.rstrip("/")
    result["files"] = [json_name]
    confusion = result.get("confusion")
    if confusion:
        title = f"{result['kind']} head on {result['rows_are']} ({result['rows']} rows)"
        png = confusion_png(np.asarray(confusion["matrix"]), confusion["classes"], title)
        write_atomic(fs, f"{root}/{png_name}", png)
        result["files"].append(png_name)
    write_atomic(fs, f"{root}/{json_name}", json.dumps(redact_strings(result), indent=2, sort_keys=True).encode())
    return tuple(result["files"])


def evaluate_training(cfg) -> Optional[Dict[str, Any]]:
    """The end of `featurize train`: the head just written, on its validation rows (data.val_split's,
    or the data.val_fraction the training held out), into eval.json and confusion.png; None without
    validation rows."""
    from .train_plan import held_out

    if cfg.data.val_split is not None:
        split, keep, rows_are = cfg.data.val_split, None, f"validation rows: split {cfg.data.val_split}"
    elif cfg.val_fraction > 0:
        frac, seed = cfg.val_fraction, cfg.data.seed
        split, rows_are = cfg.data.train_split, f"validation rows: data.val_fraction {frac:g} of the training rows"

        def keep(batch: pa.RecordBatch) -> np.ndarray:
            return held_out(batch.column("sample_id"), frac, seed)
    else:
        return None
    head = load(cfg.output.uri, cfg.out_options)
    table = open_table(cfg.data.uri, cfg.data.storage_options)
    result = evaluate(head, table, split=split, keep=keep, rows_are=rows_are)
    save(result, cfg.output.uri, cfg.out_options, TRAINING_JSON, TRAINING_PNG)
    return result
