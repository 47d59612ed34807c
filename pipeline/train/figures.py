"""The evaluation's and the sweep's pictures: confusion-*.png and sweep.png beside a head's checkpoint.

Drawn by Agg without a display or pyplot state, all text plain (plot.PLAIN_TEXT), as curves.png is.
"""
from __future__ import annotations

import io
import math
from typing import Any, Dict, List

import numpy as np

from .plot import DPI, PLAIN_TEXT

ANNOTATE_UP_TO = 20  # classes up to which every cell shows its count
LABELS_UP_TO = 40  # classes up to which the axes name them


def confusion_png(matrix: np.ndarray, classes: List[str], title: str) -> bytes:
    """Rows: the true class; columns: the predicted one. The colour is the share of the true class's
    rows (its recall along the diagonal), so small classes show as clearly as large ones."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    n = len(classes)
    side = min(12.0, max(4.5, 0.45 * n + 2.5))
    with rc_context(PLAIN_TEXT):
        fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        totals = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's rows")
        if n <= LABELS_UP_TO:
            wide = n > 6 and max(len(c) for c in classes) > 3  # long names side by side would overlap
            ax.set_xticks(range(n), labels=classes, rotation=90 if wide else 0, fontsize=8)
            ax.set_yticks(range(n), labels=classes, fontsize=8)
        if n <= ANNOTATE_UP_TO:
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title, fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def sweep_png(trials: List[Dict[str, Any]], metric: str, title: str) -> bytes:
    """The validation metric of each trial against its weight decay (log axis, 0 drawn at the left
    end), one line per learning rate (one for L-BFGS); a trial without a score is left out."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(PLAIN_TEXT):
        fig = Figure(figsize=(7.0, 4.0), dpi=DPI, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        positive = [t["weight_decay"] for t in trials if t["weight_decay"] > 0]
        zero_at = min(positive) / 10 if positive else 1e-5  # where weight decay 0 is drawn on the log axis
        for lr in sorted({t.get("lr") for t in trials}, key=lambda v: v or 0):  # lbfgs trials have none
            points = sorted((t["weight_decay"] or zero_at, t["score"]) for t in trials
                            if t.get("lr") == lr and t.get("score") is not None and math.isfinite(t["score"]))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label="L-BFGS" if lr is None else f"lr {lr:g}")
        best = [t for t in trials if t.get("best")]
        if best and best[0].get("score") is not None:
            ax.plot([best[0]["weight_decay"] or zero_at], [best[0]["score"]], marker="*", markersize=16,
                    color="tab:red", linestyle="none", label="kept")
        ax.set_xscale("log")
        if any(t["weight_decay"] == 0 for t in trials):
            ticks = sorted({t["weight_decay"] or zero_at for t in trials})
            ax.set_xticks(ticks, labels=["0" if x == zero_at else f"{x:g}" for x in ticks])
        ax.set_xlabel("weight decay")
        ax.set_ylabel({"val_acc": "validation accuracy", "val_loss": "validation loss"}.get(metric, metric))
        if metric == "val_acc":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
