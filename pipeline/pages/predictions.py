"""The report's section on a classifier's `apply` output: its `pred` column against the `label`
column, split by split: accuracy and per-class scores (train/metrics.py, as `featurize eval` gives
them) and a confusion matrix (train/figures.py, as eval draws it).

Every row counts, not a sample: only the pred, label and split strings are read, a batch at a time,
and counted by (split, label, pred), so memory is bounded by the number of distinct triples.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Mapping, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..output.provenance import applied_head
from ..train.figures import confusion_png
from ..train.metrics import Tally, report
from .charts import data_uri
from .html import figure, table_html

MAX_MATRICES = 4  # one confusion matrix per split up to this many splits; beyond, one of all rows

Triples = Counter  # (split, label, pred) -> rows


def predictions_section(fs, files: List[str], schema: pa.Schema, meta: Mapping[str, str]) -> str:
    """Accuracy per split and confusion matrices; the predicted classes' counts when there is no label."""
    columns = [c for c in ("split", "label", "pred") if c in schema.names]
    triples = _count(fs, files, columns)
    if not triples:
        return '<p class="note">no rows</p>'
    if "label" not in schema.names:
        preds = Counter()
        for (_, _, pred), n in triples.items():
            preds[pred] += n
        return ('<p class="note">no label column: no accuracy; the predicted classes</p>\n'
                + table_html(["pred", "rows"], preds.most_common()))
    classes = [str(c) for c in applied_head(meta).get("classes") or []]
    if not classes:  # no head recorded: the classes seen
        classes = sorted({t[1] for t in triples} | {t[2] for t in triples})
    tallies, unknown = _tallies(triples, classes)
    splits = sorted(tallies)
    rows = [_row(name, tallies[name], unknown[name], classes) for name in splits]
    if len(splits) > 1:
        rows.append(_row("all", _sum(tallies.values(), len(classes)), sum(unknown.values()), classes))
    out = [f"<p>column <code>pred</code> against <code>label</code>, every row; {len(classes)} classes. "
           "Rows of a split the head was trained on score higher than rows it never saw.</p>",
           table_html(["split", "rows", "accuracy", "macro F1", "labels not among the head's classes"], rows)]
    drawn = splits if len(splits) <= MAX_MATRICES else ["all"]
    for name in drawn:
        tally = tallies[name] if name in tallies else _sum(tallies.values(), len(classes))
        accuracy = report(tally.confusion, classes)["accuracy"]
        title = f"split {name}: accuracy {accuracy:.4f} on {tally.rows} rows" if tally.rows else f"split {name}"
        out.append(figure(data_uri(confusion_png(tally.confusion, classes, title)), f"confusion matrix, {name}"))
    return "\n".join(out)


def _count(fs, files: List[str], columns: List[str]) -> Triples:
    """Rows per (split, label, pred): "" for a column the table lacks, None as "(none)"."""
    triples: Triples = Counter()
    for path in files:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
                table = pa.Table.from_batches([batch]).group_by(columns).aggregate([([], "count_all")])
                values = {c: table[c].cast(pa.string()).to_pylist() for c in columns}
                for i, n in enumerate(table["count_all"].to_pylist()):
                    key = tuple(_shown(values[c][i]) if c in values else "" for c in ("split", "label", "pred"))
                    triples[key] += n
    return triples


def _shown(value) -> str:
    return "(none)" if value is None else value


def _tallies(triples: Triples, classes: List[str]) -> Tuple[Dict[str, Tally], Counter]:
    """A confusion per split (rows whose label is one of the classes) and, per split, the rows whose label is not."""
    index = {c: i for i, c in enumerate(classes)}
    tallies: Dict[str, Tally] = {}
    unknown: Counter = Counter()
    for (split, label, pred), n in triples.items():
        tally = tallies.setdefault(split, Tally(len(classes), 1))
        if label in index and pred in index:
            tally.count(np.array([index[label]]), np.array([index[pred]]), n)
        else:
            unknown[split] += n
    return tallies, unknown


def _sum(tallies, classes: int) -> Tally:
    total = Tally(classes, 1)
    for t in tallies:
        total.confusion += t.confusion
    return total


def _row(name: str, tally: Tally, unknown: int, classes: List[str]) -> Tuple[str, int, str, str, int]:
    scores = report(tally.confusion, classes)
    if scores["accuracy"] is None:
        return name, 0, "-", "-", unknown
    right = int(np.trace(tally.confusion))
    return (name, tally.rows, f"{scores['accuracy']:.4f} ({right} of {tally.rows})",
            f"{scores['macro']['f1']:.4f}", unknown)

