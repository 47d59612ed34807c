"""The Python API, importable as `featurize` (featurize/__init__.py re-exports it).

    import featurize
    summary = featurize.run("jobs/demo.yaml", {"model.arch": "resnet50", "output.uri": "out/r50"})
    ids, labels, x = featurize.open("out/r50").to_numpy()
    featurize.train("jobs/demo_order_train.yaml")
    featurize.apply("out/demo-order-lstm-head", "out/demo-order", "out/demo-order-lstm")
    featurize.evaluate("out/demo-order-lstm-head", "out/demo-order", split="test")

Every call in one process shares one local Ray (started by the first that needs it), so a
notebook can run several jobs in a row. Refusals raise the same errors the CLI turns into exit 2.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from .config import JobConfig, parse_job, read_job_file

Overrides = Union[None, Mapping[str, Any], Sequence[str]]


def _overrides(overrides: Overrides) -> List[str]:
    """`{"model.arch": "resnet50"}` or `["model.arch=resnet50"]` -> the CLI's `--set` items."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    return list(overrides)


def _yaml_value(value: Any) -> str:
    """JSON is YAML, so values keep their types; but JSON writes inf as `Infinity`, a string to
    YAML: non-finite floats are spelled as YAML's own, so that the value's check names them."""
    import json
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


def _mapping(config: Any, overrides: Overrides, what: str) -> Dict[str, Any]:
    """A file path, a mapping or a config dataclass -> its mapping, overrides applied and relative
    local paths made absolute against the current folder (Ray's workers keep the folder Ray
    started in, which a notebook's os.chdir does not move)."""
    from .submit import shipped_job

    if isinstance(config, str):
        data = read_job_file(config, what)
    elif dataclasses.is_dataclass(config):
        data = dataclasses.asdict(config)
    else:
        data = dict(config)
    return shipped_job(data, _overrides(overrides), os.getcwd())


def run(job: Union[str, Mapping[str, Any], JobConfig], overrides: Overrides = None, *, address: Optional[str] = None,
        overwrite: bool = False, retry_failed: bool = False, incremental: bool = False, progress: bool = True,
        verbose: bool = False):
    """Run a job (a job file's path, its mapping, or a JobConfig); returns the run's Summary.
    `progress`: a live line on stderr (a bar in a terminal or a notebook, a plain line every 10 s
    elsewhere); False for none. `verbose`: everything Ray prints."""
    from .progress import describe_job, starting

    parsed = parse_job(_mapping(job, overrides, "job file"))
    starting(progress, describe_job(parsed))  # the imports below take seconds
    from .extract.runner import run_job

    return run_job(parsed, address=address, overwrite=overwrite,
                   retry_failed=retry_failed, incremental=incremental, progress=progress, verbose=verbose)


def train(training: Union[str, Mapping[str, Any]], overrides: Overrides = None, *, address: Optional[str] = None,
          say=print, verbose: bool = False, overwrite: bool = False, sweep=None):
    """Train a head (a training file's path or mapping); returns the TrainResult (metrics per epoch,
    the validation rows' evaluation). `say` gets a line per epoch (None: no lines); `overwrite`:
    replace an earlier training in output.uri; `sweep`: True (weight decay 0, 1e-4 ... 0.1;
    train.optimizer lbfgs: 1 / (C n_train) for scikit-learn's C 0.001 ... 100) or
    {"weight_decay": [...], "lr": [...], "max_concurrent_trials": N}: trials through Ray Tune, the
    best on the validation rows kept (`featurize train --sweep`)."""
    from .train.guard import check_train_call
    from .train.loop import train as train_head
    from .train.sweep_args import parse_sweep
    from .train.trainfile import parse_training

    check_train_call(training, overrides, address, say, verbose, overwrite)
    grid = parse_sweep(sweep)
    return train_head(parse_training(_mapping(training, overrides, "training file")), address=address,
                      say=say or (lambda line: None), verbose=verbose, overwrite=overwrite, sweep=grid)


def apply(checkpoint: str, input: str, output: str, **options):
    """Apply a trained head to a features table, writing a new one (see train/apply.py for options;
    progress=True by default, as for `run`)."""
    from .progress import applying, starting

    starting(options.get("progress", True), applying(checkpoint, input, output))  # the imports below take seconds
    from .train.apply import apply_head, check_apply_options

    check_apply_options(options)
    return apply_head(checkpoint, input, output, **{"progress": True, **options})


def evaluate(checkpoint: str, input: str, split: Optional[str] = None,  # noqa: A002 - the CLI's word
             **options) -> Dict[str, Any]:
    """How good a trained head is on a features table (the rows of `split`, else all), as `featurize
    eval` says it: accuracy, top-k, per-class precision/recall/F1, the confusion matrix (an
    autoencoder: reconstruction error, nearest-centroid accuracy). Runs on the CPU here, no Ray;
    options: storage_options=, allow_other_source=, write= (eval-<split>.json into the checkpoint)."""
    from .errors import EvalError
    from .train.evaluate import evaluate_head

    for key in options:  # a typo is a refusal naming it, not a TypeError
        if key not in ("storage_options", "allow_other_source", "write"):
            raise EvalError(f"{key}: not an option of evaluate (options: storage_options, allow_other_source, write)")
    return evaluate_head(checkpoint, input, split, **options)


def index(uri: str, storage_options: Optional[Dict[str, Any]] = None, column: Optional[str] = None,
          **options) -> Dict[str, Any]:
    """Build or bring up to date the similarity index of a table (kind=, metric=, center= as
    `featurize index`); returns its meta (kind, rows, recall, what this call did). No Ray."""
    from .index.build import build_index

    return build_index(uri, storage_options, column, **options)


def search(uri: str, *, id: Optional[str] = None, image: Optional[str] = None,  # noqa: A002 - the CLI's word
           video: Optional[str] = None, text: Optional[str] = None, k: int = 10, column: Optional[str] = None,
           storage_options: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The k nearest rows to one query (a sample id, an image or video file, or a text), nearest
    first: dicts of rank, sample_id, score, label, uri, split. Needs `index(uri)` first."""
    from .index.search import open_index, query

    return query(open_index(uri, storage_options, column), uri, storage_options, sample_id=id, image=image,
                 video=video, text=text, k=k)[1]


def dedup(uri: str, threshold: float = 0.95, storage_options: Optional[Dict[str, Any]] = None,
          column: Optional[str] = None, **options) -> pa.Table:
    """Near-duplicate groups (group, sample_id, uri, label, split, score), as `featurize dedup`
    finds them (center= as there); the table is returned, not written."""
    from .index.dedup import find_duplicates

    return find_duplicates(uri, storage_options, column, threshold, **options)


def report(uri: str, storage_options: Optional[Dict[str, Any]] = None, out: Optional[str] = None) -> str:
    """Write the self-contained HTML report of an output root (default OUT/_report.html); returns where."""
    from .pages.report import write_report

    return write_report(uri, storage_options, out)


def open(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> "Output":  # noqa: A001 - the API's name
    """An output root of `run` or `apply`, to read."""
    return Output(uri, dict(storage_options or {}))


@dataclasses.dataclass
class Output:
    uri: str
    storage_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def table(self, columns: Optional[List[str]] = None) -> pa.Table:
        """The features table (exact split and label strings; no partition folder columns)."""
        from .errors import TableError
        from .output.table import open_table
        from .redact import redact_text

        table = open_table(self.uri, self.storage_options, key="uri")
        missing = [c for c in columns or () if c not in table.schema.names]
        if missing:
            raise TableError(f"column {missing[0]!r}: {redact_text(self.uri)} has no such column "
                             f"(columns: {', '.join(table.schema.names)})")
        return table.dataset().to_table(columns=columns)

    def to_numpy(self, column: str = "feature") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_ids, labels, features float32 (N, D)) of a fixed-size column."""
        t = self.table(["sample_id", "label", column])
        return (np.asarray(t["sample_id"].to_pylist(), dtype=object), np.asarray(t["label"].to_pylist(), dtype=object),
                self._vectors(t, column))

    def _vectors(self, t: pa.Table, column: str) -> np.ndarray:
        """float32 (N, D) of `column`; a null vector is a refusal naming the table and how many rows."""
        from .errors import TableError
        from .output.tensors import VECTOR, ColumnError, column_shape, vectors
        from .redact import redact_text

        try:
            if column_shape(column, t.schema.field(column).type)[0] != VECTOR:
                raise ColumnError("a sequence of frame vectors, not one vector per row: use FeatureDataset")
            return vectors(t[column])
        except ColumnError as e:
            raise TableError(f"column {column!r} of {redact_text(self.uri)}: {e}") from None

    def to_pandas(self, column: str = "feature"):
        """A DataFrame of sample_id, label, split and `column`, one float32 array per row."""
        import pandas as pd

        t = self.table(["sample_id", "label", "split", column])  # one read of the table
        return pd.DataFrame({"sample_id": t["sample_id"].to_pylist(), "label": t["label"].to_pylist(),
                             "split": t["split"].to_pylist(), column: list(self._vectors(t, column))})

    def to_polars(self, column: str = "feature"):
        """A Polars frame (Polars is not a dependency: `pip install polars`) of sample_id, label, split
        and `column` as an Array(Float32, D) column."""
        import polars as pl

        t = self.table(["sample_id", "label", "split", column])
        x = self._vectors(t, column)
        return pl.DataFrame({"sample_id": t["sample_id"].to_pylist(), "label": t["label"].to_pylist(),
                             "split": t["split"].to_pylist(),
                             column: pl.Series(column, x, dtype=pl.Array(pl.Float32, x.shape[1]))})

    def to_torch(self, column: str = "feature"):
        """(sample_ids, labels, features as a float32 torch tensor (N, D))."""
        import torch

        ids, labels, x = self.to_numpy(column)
        return ids, labels, torch.from_numpy(x)

    def errors(self) -> pa.Table:
        """The errors table (sample_id, uri, stage, error_type, message, attempts); empty if none."""
        import pyarrow.dataset as pads

        from .output.sink import ERRORS_SCHEMA
        from .output.store import filesystem, parquet_files

        fs, root = filesystem(self.uri, self.storage_options)
        files = parquet_files(fs, f"{root.rstrip('/')}/errors")
        return pads.dataset(files, filesystem=fs, format="parquet").to_table() if files else ERRORS_SCHEMA.empty_table()

    def status(self) -> Dict[str, Any]:
        """Planned, committed, errored and remaining counts, as `featurize status` prints them."""
        from .output.status import status

        return status(self.uri, self.storage_options)
