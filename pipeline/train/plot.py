"""The learning-curve picture saved beside a head's checkpoint (curves.png).

Rows are the per-epoch metrics of training: {"epoch", "train_loss", "val_loss", "train_acc",
"val_acc", ...}. The keys decide the panels: a loss panel always (labelled reconstruction error for
an autoencoder, whose rows carry no accuracy), an accuracy panel when accuracy is there. A missing
or None value (no validation set) leaves its point out. The title holds the training's name: all
text is drawn plain (no mathtext, no TeX), so a `$` in a name is a dollar, not a formula.
"""
from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

SIZE_IN = (8.0, 3.5)
DPI = 100
SERIES = (("train", "tab:blue", "-"), ("val", "tab:orange", "--"))
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}  # for the Text objects made while drawing


def curves_png(metrics: List[Dict[str, Any]], title: str) -> bytes:
    """A PNG (800x350 px) of the learning curves, drawn by Agg without a display or pyplot state."""
    from matplotlib import rc_context  # lazy: importing matplotlib costs ~0.5 s

    with rc_context(PLAIN_TEXT):  # while drawing and saving: tick labels are made then
        return _curves(metrics, title)


def _curves(metrics: List[Dict[str, Any]], title: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=11)
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(metrics)]
    panels = panels_for(metrics)
    for i, (metric, label) in enumerate(panels):
        _panel(fig.add_subplot(1, len(panels), i + 1), epochs, metrics, metric, label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def panels_for(metrics: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(metric, y label) of each panel: accuracy keys mean a classifier, none an autoencoder."""
    if not metrics:
        return [("loss", "loss")]
    if any(k in row for row in metrics for k in ("train_acc", "val_acc")):
        return [("loss", "cross-entropy loss"), ("acc", "accuracy")]
    return [("loss", "reconstruction error (MSE)")]


def _panel(ax, epochs: Sequence[int], metrics: List[Dict[str, Any]], metric: str, label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = 0
    for split, colour, style in SERIES:
        ys = [_number(row.get(f"{split}_{metric}")) for row in metrics]
        if all(math.isnan(y) for y in ys):
            continue
        last = next(y for y in reversed(ys) if not math.isnan(y))
        name = "train" if split == "train" else "validation"
        fmt = f"{last:.1%}" if metric == "acc" else f"{last:.4g}"
        # markers keep a single epoch (or one isolated between gaps) visible; many epochs: lines only
        ax.plot(epochs, ys, color=colour, linestyle=style, linewidth=1.6,
                marker="o" if len(epochs) <= 30 else None, markersize=4, label=f"{name} (last {fmt})")
        drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    if 0 < len(set(epochs)) <= 10:  # every epoch gets its tick (one epoch: the locator would go fractional)
        ax.set_xticks(sorted(set(epochs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:  # room for the end markers, which the axes would clip in half
        pad = max(0.4, 0.02 * (max(epochs) - min(epochs)))
        ax.set_xlim(min(epochs) - pad, max(epochs) + pad)
    if metric == "acc":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no values yet", transform=ax.transAxes, ha="center", va="center", color="gray")


def _number(value: Optional[Any]) -> float:
    """A metric as a float; None (not measured) becomes NaN so the line skips it."""
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")
