"""The Python API, importable as `featurize` (featurize/__init__.py re-exports it).

    import featurize
    summary = featurize.run("jobs/demo.yaml", {"model.arch": "resnet50", "output.uri": "out/r50"})
    ids, labels, x = featurize.open("out/r50").to_numpy()
    featurize.train("jobs/demo_order_train.yaml")
    featurize.apply("out/demo-order-lstm-head", "out/demo-order", "out/demo-order-lstm")
    featurize.evaluate("out/demo-order-lstm-head", "out/demo-order", split="test")

Every call in one process shares one local Ray (started by the first that needs it), so a
notebook can run several jobs in a row. Refusals raise the same errors the CLI turns into exit 2,
in the API's words (`overwrite=True` where the command says `--overwrite`: _entry).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from .config import JobConfig, parse_job, read_job_file
from .errors import Refused, api_words
from .output.tensors import VECTOR

Overrides = Union[None, Mapping[str, Any], Sequence[str]]


def _entry(starts_ray: bool = False):
    """An entry point of the API: its refusals name the API's arguments where the command's name its
    flags (`overwrite=True` for `--overwrite`: errors.api_words). One that starts Ray keeps Ray's
    native noise off stderr as the command does (console.NativeStderr), unless verbose=True."""
    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            from .console import NativeStderr

            quiet = starts_ray and not kwargs.get("verbose")
            try:
                with NativeStderr() if quiet else contextlib.nullcontext():
                    return function(*args, **kwargs)
            except Refused as e:
                e.args = tuple(api_words(a) if isinstance(a, str) else a for a in e.args)
                raise
        return call
    return wrap


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


@_entry(starts_ray=True)
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


@_entry(starts_ray=True)
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


@_entry(starts_ray=True)
def apply(checkpoint: str, input: str, output: str, **options):
    """Apply a trained head to a features table, writing a new one (see train/apply.py for options;
    progress=True by default, as for `run`)."""
    from .progress import applying, starting

    starting(options.get("progress", True), applying(checkpoint, input, output))  # the imports below take seconds
    from .train.apply import apply_head, check_apply_options

    check_apply_options(options)
    return apply_head(checkpoint, input, output, **{"progress": True, **options})


@_entry()
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


@_entry()
def index(uri: str, storage_options: Optional[Dict[str, Any]] = None, column: Optional[str] = None,
          **options) -> Dict[str, Any]:
    """Build or bring up to date the similarity index of a table (kind=, metric=, center= as
    `featurize index`); returns its meta (kind, rows, recall, what this call did). No Ray."""
    from .index.build import build_index

    return build_index(uri, storage_options, column, **options)


@_entry()
def search(uri: str, *, id: Optional[str] = None, image: Optional[str] = None,  # noqa: A002 - the CLI's word
           video: Optional[str] = None, text: Optional[str] = None, k: int = 10, column: Optional[str] = None,
           storage_options: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The k nearest rows to one query (a sample id, an image or video file, or a text), nearest
    first: dicts of rank, sample_id, score, label, uri, split. Needs `index(uri)` first."""
    from .index.search import open_index, query

    return query(open_index(uri, storage_options, column), uri, storage_options, sample_id=id, image=image,
                 video=video, text=text, k=k)[1]


@_entry()
def dedup(uri: str, threshold: float = 0.95, storage_options: Optional[Dict[str, Any]] = None,
          column: Optional[str] = None, **options) -> pa.Table:
    """Near-duplicate groups (group, sample_id, uri, label, split, score), as `featurize dedup`
    finds them (center= as there); the table is returned, not written."""
    from .index.dedup import find_duplicates

    return find_duplicates(uri, storage_options, column, threshold, **options)


@_entry()
def report(uri: str, storage_options: Optional[Dict[str, Any]] = None, out: Optional[str] = None) -> str:
    """Write the self-contained HTML report of an output root (default OUT/_report.html); returns where."""
    from .pages.report import write_report

    return write_report(uri, storage_options, out)


def open(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> "Output":  # noqa: A001 - the API's name
    """An output root of `run` or `apply`, to read."""
    return Output(uri, dict(storage_options or {}))


class Vectors(NamedTuple):
    """`to_numpy()` of a vector column: unpacks as `ids, labels, x`."""

    ids: np.ndarray  # the sample ids (object: str)
    labels: np.ndarray  # the exact label strings (object)
    x: Any  # float32 (N, D): numpy, or a torch tensor from to_torch


class Sequences(NamedTuple):
    """`to_numpy("frame_features")`: unpacks as `ids, labels, x, lengths`."""

    ids: np.ndarray
    labels: np.ndarray
    x: Any  # float32 (N, T, D), zero after each clip's own frames; T: the longest clip
    lengths: Any  # int64 (N,): each clip's number of frames


# Besides the features, the columns of a row that to_pandas and to_polars give where the table has
# them: a window's bounds (windowed videos) and what an applied classifier predicted.
ROWS = ("sample_id", "label", "split", "start_s", "end_s", "pred")


@dataclasses.dataclass
class Output:
    """An output root to read. Without `column`, a table is read by the column `featurize index`
    takes: `feature` (images), else the first `clip_<head>` (videos, an lstm head's apply), else the
    first vector (`code` of an autoencoder's apply, `probs` of a classifier's)."""

    uri: str
    storage_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def table(self, columns: Optional[List[str]] = None) -> pa.Table:
        """The features table (exact split and label strings; no partition folder columns)."""
        from .errors import TableError
        from .redact import redact_text

        table = self._open()
        missing = [c for c in columns or () if c not in table.schema.names]
        if missing:
            raise TableError(f"column {missing[0]!r}: {redact_text(self.uri)} has no such column "
                             f"(columns: {', '.join(table.schema.names)})")
        return table.dataset().to_table(columns=columns)

    def to_numpy(self, column: Optional[str] = None) -> Union[Vectors, Sequences]:
        """`ids, labels, x = out.to_numpy()`: x float32 (N, D) of a vector column (feature,
        clip_<head>, code, probs). Of `frame_features` (a sequence per clip): `ids, labels, x, lengths`
        with x float32 (N, T, D) zero-padded to the longest clip and lengths int64 (N,)."""
        t, column, kind = self._read(column, ("sample_id", "label"))
        ids, labels = (np.asarray(t[c].to_pylist(), dtype=object) for c in ("sample_id", "label"))
        values = self._values(t, column, kind)
        return Vectors(ids, labels, values) if kind == VECTOR else Sequences(ids, labels, *values)

    def to_pandas(self, column: Optional[str] = None):
        """A DataFrame of sample_id, label, split (start_s, end_s of windowed videos; pred of an
        applied classifier) and `column`: one float32 array per row, (D,) or a clip's (T, D) frames."""
        t, column, kind = self._read(column, ROWS)
        values = self._values(t, column, kind)
        cells = np.empty(len(t), dtype=object)  # filled one by one: pandas would stack (T, D) arrays
        for i, cell in enumerate(values if kind == VECTOR else _clips(*values)):
            cells[i] = cell
        df = t.drop_columns([column]).to_pandas()
        df[column] = cells
        return df

    def to_polars(self, column: Optional[str] = None):
        """A Polars frame (Polars is not a dependency: `pip install polars`) of to_pandas's columns,
        `column` as Array(Float32, D), or List(Array(Float32, D)) for frame_features."""
        import polars as pl

        t, column, kind = self._read(column, ROWS)
        values = self._values(t, column, kind)
        return pl.from_arrow(t.set_column(t.schema.get_field_index(column), column, _float32_column(values, kind)))

    def to_torch(self, column: Optional[str] = None) -> Union[Vectors, Sequences]:
        """to_numpy's result with x (and lengths) as torch tensors: (N, D), or (N, T, D) and (N,)."""
        import torch

        got = self.to_numpy(column)
        return got._replace(**{k: torch.from_numpy(getattr(got, k)) for k in ("x", "lengths") if hasattr(got, k)})

    def _open(self):
        from .output.table import open_table

        return open_table(self.uri, self.storage_options, key="uri")

    def _read(self, column: Optional[str], rows: Sequence[str]) -> Tuple[pa.Table, str, str]:
        """(the row columns the table has and the feature column, in one read; the column; its kind)."""
        table = self._open()
        column, kind = table.choose(column, "column")
        names = [c for c in rows if c in table.schema.names]
        return table.dataset().to_table(columns=[*names, column]), column, kind

    def _values(self, t: pa.Table, column: str, kind: str):
        """float32 (N, D) of a vector column, (x (N, T, D), lengths) of a sequence column; a row with
        no value is a refusal naming the table and how many rows."""
        from .errors import TableError
        from .output.tensors import ColumnError, sequences, vectors
        from .redact import redact_text

        try:
            return vectors(t[column]) if kind == VECTOR else sequences(t[column])
        except ColumnError as e:
            raise TableError(f"column {column!r} of {redact_text(self.uri)}: {e}") from None

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


def _clips(x: np.ndarray, lengths: np.ndarray):
    """Each clip's own frames, (T_i, D), of a padded (N, T, D)."""
    return (x[i, :n] for i, n in enumerate(lengths))


def _float32_column(values, kind: str) -> pa.Array:
    """_values as Arrow: fixed_size_list<float32, D>, or a list of them per clip."""
    if kind == VECTOR:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    x, lengths = values
    frames = pa.FixedSizeListArray.from_arrays(pa.array(x[np.arange(x.shape[1]) < lengths[:, None]].ravel()),
                                               x.shape[2])
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()), frames)
