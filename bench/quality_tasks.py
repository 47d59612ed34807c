"""The tasks of bench/train_quality.py, made by the project's own generators and extraction, and the
references it compares the default training file with (on the same features and the same split).

- order: generated videos whose class is the order of two events (pipeline/samples.py), their
  per-frame ResNet-18 (random init) features extracted by the project (jobs/demo_order.yaml).
- sequences: synthetic clips (tests/tables.py order_sequences) whose class shows in the order and in
  one dimension of every frame, passed through a ReLU over a shared offset, as a backbone's features
  are (non-negative, far from zero-mean): what attention pooling (order-blind) can learn too.
- photos: classes cut from a real photo (matplotlib's grace_hopper.jpg, the one real photo this
  machine holds): each class one tile of it, each sample a random crop of its tile, flipped or not,
  its brightness, contrast and colour changed; ResNet-18 (random init) features by the project's
  extraction. photos-imbalanced: the same images, its training rows 60 to 4 a class.
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

IMBALANCED = [60, 30, 15, 8, 6, 4]  # training rows per class of photos-imbalanced (held-out rows stay 30)


def order_task(root: str, videos: int) -> str:
    """Extract the order videos' frame features (16 frames) once; returns the output root."""
    import yaml

    from pipeline.api import run
    from pipeline.samples import make_order_videos

    out = os.path.join(root, f"order-{videos}")
    if os.path.exists(os.path.join(out, "_job.json")):
        return out
    data = os.path.join(root, f"order-videos-{videos}")
    info = make_order_videos(data, n=videos, frames=16, split_fraction=2 / 3)
    job = yaml.safe_load(open(os.path.join(os.path.dirname(HERE), "jobs", "demo_order.yaml")))
    job["source"].update(uri=data, split_files=info["split_files"])
    job["output"]["uri"] = out
    job["video"]["num_frames"] = 16
    run(job, progress=False)
    return out


def sequence_task(root: str, clips: int, dim: int = 64, frames: int = 12) -> str:
    from tables import order_sequences, write_table

    out = os.path.join(root, f"sequences-{clips}x{frames}x{dim}")
    if os.path.exists(os.path.join(out, "_job.json")):
        return out
    x, labels = order_sequences(clips, frames=frames, dim=dim, seed=1)
    rng = np.random.default_rng(2)
    x[1::2, :, 2] += 1.0  # the class shows in every frame too (weakly)
    shared = rng.normal(0, 1, dim).astype(np.float32)
    x = np.maximum(x + 1.5 + shared, 0) * 4.0  # a backbone's look: ReLU outputs, a shared component, scale
    split = ["test" if i % 3 == 0 else "train" for i in range(clips)]
    return write_table(out, split, labels, frames=x, rows_per_file=64, name="sequences")


def photo_task(root: str, per_class: int, test_per_class: int, imbalanced: bool = False) -> str:
    """Generate the crops once (manifest CSV with label and split) and extract their features."""
    from pipeline.api import run

    name = f"photos-{per_class}-{test_per_class}" + ("-imbalanced" if imbalanced else "")
    out = os.path.join(root, name)
    if os.path.exists(os.path.join(out, "_job.json")):
        return out
    rows = _crops(os.path.join(root, f"photo-crops-{per_class}-{test_per_class}"), per_class, test_per_class)
    if imbalanced:
        keep = {(c, i) for c, n in enumerate(IMBALANCED) for i in range(n)}
        rows = [r for r in rows if r["split"] == "test" or (int(r["label"][1:]), int(r["index"])) in keep]
    manifest = os.path.join(root, f"{name}.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "label", "split"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("uri", "label", "split")} for r in rows)
    job = {"name": name, "source": {"uri": manifest, "format": "manifest"},
           "preprocess": {"resize": 128, "crop": 112}, "model": {"arch": "resnet18", "weights": "none"},
           "output": {"uri": out, "partition_by": ["split"]}}
    run(job, progress=False)
    return out


def _crops(folder: str, per_class: int, test_per_class: int) -> List[Dict[str, str]]:
    import matplotlib
    from PIL import Image, ImageEnhance

    src = Image.open(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                                  "grace_hopper.jpg")).convert("RGB")
    w, h = src.size
    tiles = [(c * w // 2, r * h // 3, (c + 1) * w // 2, (r + 1) * h // 3) for r in range(3) for c in range(2)]
    rng = np.random.default_rng(0)
    rows = []
    os.makedirs(folder, exist_ok=True)
    for k, (x0, y0, x1, y1) in enumerate(tiles):
        for i in range(per_class + test_per_class):
            path = os.path.join(folder, f"c{k}_{i:03d}.jpg")
            side = int(rng.uniform(0.5, 0.9) * min(x1 - x0, y1 - y0))
            left, top = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(y0, y1 - side + 1))
            img = src.crop((left, top, left + side, top + side)).resize((128, 128))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            for enhance, lo, hi in ((ImageEnhance.Brightness, 0.6, 1.4), (ImageEnhance.Contrast, 0.6, 1.4),
                                    (ImageEnhance.Color, 0.3, 1.7)):
                img = enhance(img).enhance(float(rng.uniform(lo, hi)))
            if not os.path.exists(path):
                img.save(path, quality=90)
            rows.append({"uri": os.path.abspath(path), "label": f"c{k}", "index": str(i),
                         "split": "train" if i < per_class else "test"})
    return rows


# ---------------------------------------------------------------- the same rows the training sees

def rows(uri: str, column: str) -> Dict[str, Any]:
    """{x, lengths, y, classes, train, val, test}: the masks are the default training file's
    (split train less data.val_fraction 0.1 of it, seed 0) and the held-out split `test`."""
    from pipeline.output.table import open_table
    from pipeline.output.tensors import label_codes, sequences, vectors
    from pipeline.train.train_plan import held_out

    t = open_table(uri).dataset().to_table(columns=["sample_id", "label", "split", column])
    t = t.sort_by("sample_id")
    seq = pa_is_list(t.schema.field(column).type)
    x, lengths = sequences(t[column]) if seq else (vectors(t[column]), None)
    split = np.asarray(t["split"].to_pylist(), dtype=object)
    val = (split == "train") & held_out(t["sample_id"], 0.1, 0)
    classes = sorted(set(t.filter(pa_mask(split != "test"))["label"].to_pylist()))
    return {"x": x, "lengths": lengths, "y": label_codes(t["label"], classes), "classes": classes,
            "ids": t["sample_id"].to_pylist(), "train": (split == "train") & ~val, "val": val, "test": split == "test"}


def pa_is_list(tp) -> bool:
    import pyarrow as pa

    return pa.types.is_list(tp) or pa.types.is_large_list(tp)


def pa_mask(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask)


def standardise(d: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training rows (real frames only for sequences)."""
    x = d["x"][d["train"]]
    if d["lengths"] is not None:
        real = np.arange(x.shape[1])[None, :] < d["lengths"][d["train"]][:, None]
        x = x[real]
    return x.mean(0), x.std(0) + 1e-6


def logistic_reference(d: Dict[str, Any], cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> Tuple[float, float]:
    """(held-out accuracy, C): multinomial logistic regression on standardised features, C chosen on
    the validation rows, fitted on the training rows. scikit-learn's LogisticRegression (lbfgs) when
    it is installed; else the same objective (sum of cross-entropies * C + |W|^2 / 2, the intercept
    unpenalised) minimised by torch's L-BFGS: convex, so the same optimum."""
    mean, std = standardise(d)
    z = (d["x"] - mean) / std
    fit = _sklearn_fit if _has_sklearn() else _torch_fit
    scored = []
    for c in cs:
        predict = fit(z[d["train"]], d["y"][d["train"]], c, len(d["classes"]))
        scored.append(((predict(z[d["val"]]) == d["y"][d["val"]]).mean(), -c, c, predict))
    _, _, c, predict = max(scored, key=lambda s: s[:2])  # ties: the stronger regularisation
    return float((predict(z[d["test"]]) == d["y"][d["test"]]).mean()), c


def _has_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def _sklearn_fit(x, y, c, classes):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    return model.predict


def _torch_fit(x, y, c, classes):
    import torch

    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * torch.nn.functional.cross_entropy(xt @ w + b, yt, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (torch.from_numpy(z).double() @ w + b).argmax(1).detach().numpy()


def loop_reference(d: Dict[str, Any], kind: str, lr: float, epochs: int, batch: int, seed: int = 0,
                   standardised: bool = True) -> float:
    """Held-out accuracy of a plain PyTorch loop: the same head (models.build, head defaults), inputs
    standardised by the training rows' statistics, AdamW, linear warm-up (5%) then cosine per step,
    gradients clipped to norm 1 for lstm and attention, the last epoch kept."""
    import torch

    from pipeline.train.models import build
    from pipeline.train.recipe import clip_norm, lr_factor

    mean, std = standardise(d) if standardised else (0.0, 1.0)
    x = torch.from_numpy(((d["x"] - mean) / std).astype(np.float32))
    if d["lengths"] is not None:  # padding stays zero
        x = x * (torch.arange(x.shape[1])[None, :, None] < torch.from_numpy(d["lengths"])[:, None, None])
    lengths = None if d["lengths"] is None else torch.from_numpy(d["lengths"])
    y = torch.from_numpy(d["y"])
    head = {"hidden": None, "layers": 1, "bidirectional": False, "dropout": 0.0, "code_dim": None}
    model = build(kind, x.shape[-1], len(d["classes"]), head, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    train = np.flatnonzero(d["train"])
    per_epoch = -(-len(train) // batch)
    total, warmup = epochs * per_epoch, round(0.05 * epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, "cosine"))
    clip = clip_norm(kind, None)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for i in np.array_split(rng.permutation(train), per_epoch):
            loss = torch.nn.functional.cross_entropy(model(x[i], None if lengths is None else lengths[i]), y[i])
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
    model.eval()
    test = np.flatnonzero(d["test"])
    with torch.no_grad():
        pred = model(x[test], None if lengths is None else lengths[test]).argmax(1).numpy()
    return float((pred == d["y"][test]).mean())
