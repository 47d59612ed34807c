"""The training rows' per-dimension mean and standard deviation, for `head.normalize: standard`.

One streaming pass over the same Ray dataset the training reads (loop.py's "train", so the same
rows: its split, its val_fraction hash, never a validation row), never the whole table at once:
each batch gives its count, mean and sum of squared deviations in float64, merged as Chan et al.
do (no cancellation, unlike a sum of squares). For sequences only the real frames count
(`lengths`), never the padding.

Where the dataset is already in the object store (a small table, loop.py materialises it) the
driver reads its blocks itself (no tasks to start); otherwise each block's moments are a Ray Data
map (in the read tasks' workers) and only they, a few vectors per block, come to the driver.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np

BATCH_ROWS = 4096


def batch_moments(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """{"count": (1,), "mean": (1, D), "m2": (1, D)} of a batch's real vectors (frames)."""
    x = np.asarray(batch["x"])
    if x.ndim == 3:  # (N, T, D) padded clips: the frames before each clip's length
        x = x[np.arange(x.shape[1])[None, :] < np.asarray(batch["lengths"])[:, None]]
    x = x.astype(np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[-1])
    m2 = ((x - mean) ** 2).sum(axis=0)
    return {"count": np.array([len(x)], np.int64), "mean": mean[None], "m2": m2[None]}


def merge(parts: Iterable[Dict[str, np.ndarray]]) -> Tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, m2) of every part's rows (each part: rows of batch_moments)."""
    n, mean, m2 = 0, None, None
    for part in parts:
        for k, bm, bm2 in zip(part["count"], part["mean"], part["m2"]):
            if k == 0:
                continue
            if mean is None:
                n, mean, m2 = int(k), np.array(bm, np.float64), np.array(bm2, np.float64)
                continue
            total = n + int(k)
            delta = bm - mean
            mean = mean + delta * (k / total)
            m2 = m2 + bm2 + delta ** 2 * (n * k / total)
            n = total
    return n, mean, m2


def standard_statistics(ds, local: bool) -> Dict[str, object]:
    """{"mean": [D], "std": [D] (population), "count": vectors seen} of the dataset's "x".
    `local`: the dataset is materialised; read its blocks here."""
    if local:
        parts = (batch_moments(b) for b in ds.iter_batches(batch_size=BATCH_ROWS, batch_format="numpy"))
    else:
        parts = ds.map_batches(batch_moments, batch_format="numpy").iter_batches(batch_size=None,
                                                                                  batch_format="numpy")
    n, mean, m2 = merge(parts)
    if not n:
        raise ValueError("no training rows to take the statistics of")  # train_plan refuses this before
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist(), "count": n}
