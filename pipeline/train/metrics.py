"""Classification and embedding metrics, in numpy (scikit-learn is a test and bench dependency only;
tests/train/test_evaluate.py checks these against sklearn.metrics).

Everything is accumulated batch by batch (`Tally`), so an evaluation never holds the table: a
confusion matrix, top-k hits, and per-class sums of unit vectors for the nearest-centroid probe.
Conventions are scikit-learn's: confusion rows are the true class, columns the predicted one; a
precision or recall whose denominator is 0 is 0; the macro average is over the classes that occur
in the truth or the predictions.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np


class Tally:
    """A classifier's counts over batches: (true, predicted) pairs and top-k hits."""

    def __init__(self, classes: int, k: int):
        self.confusion = np.zeros((classes, classes), dtype=np.int64)
        self.k = k
        self.topk_hits = 0

    def add(self, y: np.ndarray, scores: np.ndarray) -> None:
        """y: (N,) class indices; scores: (N, C) probabilities or logits."""
        if not len(y):
            return
        self.count(y, scores.argmax(axis=1))
        self.topk_hits += int(topk_hits(y, scores, self.k).sum())

    def count(self, y: np.ndarray, pred: np.ndarray, times=1) -> None:
        """(true, predicted) class index pairs, each `times` times (a count per pair, or one for all):
        predictions already made, as an `apply` output's pred column holds them."""
        np.add.at(self.confusion, (y, pred), times)

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())


def topk_hits(y: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true class is among its k highest scores (ties: the lower index first,
    as a stable sort of the negated scores orders them)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == y[:, None]).any(axis=1)


def report(confusion: np.ndarray, classes: List[str], topk: Optional[int] = None,
           topk_hits_: Optional[int] = None) -> Dict[str, Any]:
    """Accuracy, top-k accuracy, per-class precision/recall/F1/support, macro and weighted averages."""
    c = confusion.astype(np.float64)
    n = c.sum()
    tp = np.diag(c)
    support, predicted = c.sum(axis=1), c.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    per_class = [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(support[i])} for i, name in enumerate(classes)]
    out: Dict[str, Any] = {"rows": int(n), "accuracy": float(tp.sum() / n) if n else None}
    if topk is not None:
        out["top_k"] = topk
        out["top_k_accuracy"] = float(topk_hits_ / n) if n else None
    out["macro"] = {m: float(v[present].mean()) if present.any() else None
                    for m, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    out["weighted"] = {m: float((v * support).sum() / n) if n else None
                       for m, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    out["per_class"] = per_class
    out["confusion"] = {"classes": list(classes), "matrix": confusion.astype(int).tolist(),
                        "rows_are": "true class", "columns_are": "predicted class"}
    return out


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


# ---------------------------------------------------------------- nearest centroid (leave one out)

def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Centroids:
    """Per-class sums of unit vectors (pass 1), then each row's nearest class mean by cosine with the
    row itself left out of its own class's mean (pass 2): how well a feature separates the labels of
    these rows, with nothing fitted and no second split needed."""

    def __init__(self, classes: int, dim: int):
        self.sums = np.zeros((classes, dim), dtype=np.float64)
        self.counts = np.zeros(classes, dtype=np.int64)
        self.hits = 0
        self.rows = 0

    def add(self, y: np.ndarray, x: np.ndarray) -> None:
        np.add.at(self.sums, y, unit(x))
        np.add.at(self.counts, y, 1)

    def score(self, y: np.ndarray, x: np.ndarray) -> None:
        """Pass 2 over the same rows: count the rows whose nearest leave-one-out class mean is theirs."""
        if not len(y):
            return
        u = unit(x).astype(np.float64)
        sims = u @ unit(self.sums).T  # (N, C): cosine to each class's mean direction
        own = self.sums[y] - u  # the own class's sum without this row
        own_norm = np.linalg.norm(own, axis=1)
        sims[np.arange(len(y)), y] = np.where(own_norm > 1e-12, (u * own).sum(axis=1) / np.maximum(own_norm, 1e-12),
                                              -np.inf)  # alone in its class: it cannot be matched
        empty = self.counts == 0
        sims[:, empty] = -np.inf
        self.hits += int((sims.argmax(axis=1) == y).sum())
        self.rows += len(y)

    @property
    def accuracy(self) -> Optional[float]:
        return self.hits / self.rows if self.rows else None
