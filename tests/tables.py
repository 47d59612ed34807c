"""Small feature tables in a `featurize run` (or `apply`) output's layout, for the training, index and page tests."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

from pipeline.output.store import parquet_bytes


def order_sequences(n: int, frames: int = 6, dim: int = 8, seed: int = 0):
    """(x (n, frames, dim), labels): each clip holds the same two events (one-hot patterns A and B
    plus noise) in either order; the class is the order. The mean over frames is the same for both
    classes, so only a sequence model can tell them apart."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(dim)[0] * 3, np.eye(dim)[1] * 3
    x = rng.normal(0, 0.3, (n, frames, dim)).astype(np.float32)
    labels = []
    for i in range(n):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        x[i, : frames // 2] += first
        x[i, frames // 2:] += second
        labels.append("a_then_b" if i % 2 == 0 else "b_then_a")
    return x, labels


def windows(counts: List[int], window_s: float = 4.0, stride_s: Optional[float] = None) -> Dict[str, list]:
    """The row columns a video job with video.window_s (and stride_s) writes: video j (`v<j>.avi`)
    cut into counts[j] windows, with ids `v<j>.avi#w<k>` and the k-th starting k * stride_s s in."""
    stride = stride_s or window_s
    rows = [(f"v{j}.avi", k) for j, n in enumerate(counts) for k in range(n)]
    return {"sample_id": [f"{v}#w{k}" for v, k in rows], "uri": [f"file:///data/{v}" for v, _ in rows],
            "start_s": [k * stride for _, k in rows], "end_s": [k * stride + window_s for _, k in rows]}


def fixed(x: np.ndarray, dtype=np.float16) -> pa.FixedSizeListArray:
    """(N, D) -> fixed_size_list<float16 | float32, D>: a vector column as the sink stores it."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(dtype).ravel()), x.shape[1])


def write_table(root: str, split: List[str], labels: List[str], feature: Optional[np.ndarray] = None,
                frames: Optional[np.ndarray] = None, rows_per_file: int = 16, name: str = "tiny",
                lengths: Optional[np.ndarray] = None, column: str = "feature",
                rows: Optional[Dict[str, list]] = None, columns: Optional[Dict[str, pa.Array]] = None,
                metadata: Optional[Dict[str, str]] = None, record: Optional[Dict[str, Any]] = None) -> str:
    """OUT/features/split_dir=S/label_dir=L/part-*.parquet (+ a minimal _job.json); `lengths`: each
    clip keeps only its first lengths[i] frames (clips of unequal length); `feature` is written as
    `column` (`clip_mean` for a video table); `rows`: other row columns (`windows(...)`'s), or ids
    and uris other than s00000, s00001 ...; `columns`: more columns (an apply output's pred, probs,
    code ...); `metadata`: every file's `featurize.*` provenance (run_metadata, apply_metadata);
    `record`: more of _job.json."""
    n = len(labels)
    cols: Dict[str, pa.Array] = {
        "sample_id": pa.array([f"s{i:05d}" for i in range(n)]),
        "uri": pa.array([f"file:///data/s{i:05d}" for i in range(n)]),
        "label": pa.array(labels), "split": pa.array(split),
        **{k: pa.array(v) for k, v in (rows or {}).items()},
    }
    if feature is not None:
        cols[column] = fixed(feature)
    if frames is not None:
        t, d = frames.shape[1], frames.shape[2]
        lengths = np.full(n, t) if lengths is None else np.asarray(lengths)
        real = np.concatenate([frames[i, :k] for i, k in enumerate(lengths)])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        cols["frame_features"] = pa.ListArray.from_arrays(pa.array(offsets), fixed(real.reshape(-1, d)))
    cols.update(columns or {})
    table = pa.table(cols).replace_schema_metadata(metadata)
    for (s, label) in sorted(set(zip(split, labels))):
        mask = pa.array([a == s and b == label for a, b in zip(split, labels)])
        part = table.filter(mask)
        folder = os.path.join(root, "features", f"split_dir={s}", f"label_dir={label}")
        os.makedirs(folder, exist_ok=True)
        for k in range(0, len(part), rows_per_file):
            with open(os.path.join(folder, f"part-{k:05d}.parquet"), "wb") as f:  # as the sink writes them
                f.write(parquet_bytes(part.slice(k, rows_per_file)))
    settings = {"video.sampling": "uniform", "video.num_frames": int(frames.shape[1])} if frames is not None else {}
    with open(os.path.join(root, "_job.json"), "w") as f:
        json.dump({"name": name, "status": "complete", "settings": settings, **(record or {})}, f)
    return root


def run_metadata(weights_id: str = "IMAGENET1K_V1", sha256: str = "5c1f1d6e2a9b" * 5, job: str = "tiny",
                 heads: Optional[List[Dict[str, Any]]] = None, dim: int = 16) -> Dict[str, str]:
    """A features file's provenance as a run writes it (extract/prepare.py's keys; resnet18 at crop 56):
    weights_id "random-init(seed=0)" is `model.weights: none`; `heads`: a video's temporal heads."""
    meta = {"featurize.version": "0.1.0", "featurize.job": job, "featurize.model": "resnet18",
            "featurize.model_family": "torchvision", "featurize.weights_id": weights_id,
            "featurize.weights_sha256": "" if weights_id.startswith("random-init") else sha256,
            "featurize.layer": "avgpool", "featurize.pool": "avg",
            "featurize.preprocess": json.dumps({"resize": 64, "crop": 56, "mean": [0.485, 0.456, 0.406],
                                                "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
                                                "color": "RGB"}),
            "featurize.dtype": "float16", "featurize.dim": str(dim)}
    if heads is not None:
        meta["featurize.temporal"] = json.dumps(heads)
    return meta


def apply_metadata(source: Dict[str, str], kind: str, classes: List[str], checkpoint: str = "/heads/probe",
                   source_uri: str = "/out/tiny", columns: Optional[List[str]] = None) -> Dict[str, str]:
    """An apply output's provenance as train/apply.py's provenance() writes it: its head, its source table."""
    head = {"uri": checkpoint, "kind": kind, "sha256": "9f86d081884c" * 5, "classes": classes,
            "input": {"column": "feature", "dim": int(source.get("featurize.dim", 16))}, "trained_on": source_uri}
    table = {"uri": source_uri, "job": source.get("featurize.job"), "status": "complete", "rows": 0,
             "metadata": source}
    return {"featurize.version": "0.1.0", "featurize.job": f"apply-{kind}", "featurize.kind": "apply",
            "featurize.dtype": "float32", "featurize.dim": str(len(classes) or 4),
            "featurize.columns": json.dumps(columns or (["pred", "probs"] if classes else ["code"])),
            "featurize.source": json.dumps(table, sort_keys=True), "featurize.head": json.dumps(head, sort_keys=True)}
