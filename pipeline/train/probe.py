"""How well a feature column separates the classes: nearest-centroid accuracy on held-out rows.

A probe with nothing to fit (class means of the training rows, then the nearest mean by cosine
similarity), so that the number says what the features hold, not how well a classifier was tuned.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ..errors import TableError
from ..output.table import open_table
from ..output.tensors import label_codes, vectors


def centroid_accuracy(uri: str, column: str, train_split: str = "train", test_split: str = "test",
                      label: str = "label", storage_options: Optional[Dict[str, Any]] = None) -> float:
    table = open_table(uri, storage_options)
    table.shape(column)
    t = table.dataset().to_table(columns=[column, label, "split"])
    split = np.asarray(t["split"].to_pylist(), dtype=object)
    classes = sorted(set(t[label].to_pylist()))
    x, y = _unit(vectors(t[column])), label_codes(t[label], classes)
    train, test = split == train_split, split == test_split
    if not train.any() or not test.any():
        raise TableError(f"{uri}: no rows of split {train_split if not train.any() else test_split!r}")
    centroids = np.stack([x[train & (y == c)].mean(axis=0) if (train & (y == c)).any() else np.zeros(x.shape[1])
                          for c in range(len(classes))])
    predicted = (x[test] @ _unit(centroids).T).argmax(axis=1)
    return float((predicted == y[test]).mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
