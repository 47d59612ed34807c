"""The report's charts: matplotlib figures (no pyplot, so no global state and no display) as PNG
data URIs, small enough to embed. Stage, column and label names come from the table: every chart
draws its text plain (no mathtext, no TeX), so `$`, `_`, `^` or `\\` in a name are just characters."""
from __future__ import annotations

import base64
import functools
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

PALETTE = ["#3b6fd6", "#e0703a", "#3aa35b", "#c8413f", "#8a5cc2", "#8c6d4f", "#d46bb5", "#7f7f7f",
           "#b5b828", "#2bb3c0"]
OTHER = "#bbbbbb"
MAX_LEGEND = len(PALETTE)  # labels beyond the most frequent ten are drawn grey, as "other"
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}  # for the Text objects made while drawing


def plain_text(draw):
    """Draw (and save: tick labels are made then) with mathtext and TeX off."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        from matplotlib import rc_context

        with rc_context(PLAIN_TEXT):
            return draw(*args, **kwargs)
    return wrapper


def _figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return data_uri(buf.getvalue())


def data_uri(png_bytes: bytes) -> str:
    """A PNG as a data URI: the page embeds it, nothing is fetched."""
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


@plain_text
def stage_chart(stages: Dict[str, Dict[str, Any]], bound: Optional[str]) -> str:
    """Busy seconds per stage (all workers'), the stage that bounds the run highlighted."""
    names = list(stages)
    busy = [float(stages[n].get("busy_s", 0)) for n in names]
    fig = _figure(7.0, 0.6 + 0.45 * max(1, len(names)))
    ax = fig.add_subplot()
    colors = [PALETTE[1] if n == bound else PALETTE[0] for n in names]
    ax.barh(names[::-1], busy[::-1], color=colors[::-1])
    for i, n in enumerate(names[::-1]):
        s = stages[n]
        workers = f"{s.get('workers', '?')} worker{'' if s.get('workers') == 1 else 's'}"
        ax.annotate(f" {s.get('busy_share', 0):.0%} of the run, {s.get('samples_per_s', 0):,.1f} samples/s, {workers}",
                    (busy[::-1][i], i), va="center", fontsize=8)
    ax.set_xlabel("busy seconds, all workers together")
    ax.set_xlim(0, max(busy + [1e-9]) * 1.9)
    ax.set_title("time per stage" + (f" (bound: {bound})" if bound else ""), fontsize=10)
    return png(fig)


@plain_text
def throughput_chart(runs: List[Tuple[str, Sequence[Sequence[float]]]]) -> str:
    """Rows committed over time (left) and the rate between points (right), one line per run."""
    fig = _figure(8.0, 3.0)
    total, rate = fig.subplots(1, 2)
    for i, (name, series) in enumerate(runs):
        t = np.asarray([p[0] for p in series], dtype=float)
        n = np.asarray([p[1] for p in series], dtype=float)
        color = PALETTE[i % len(PALETTE)]
        # steps: rows arrive a commit at a time, nothing between (one commit is one step, not a ramp)
        total.plot(t, n, marker="." if len(t) < 40 else None, color=color, label=name, drawstyle="steps-post")
        if len(t) == 2 and t[1] > 0:  # one commit: its rate is the run's, from the start to that commit
            rate.plot(t, [n[1] / t[1]] * 2, color=color, marker="o", label=name)
        elif len(t) > 1:  # the rate over a window of points (a twentieth of them): commits come in lumps
            w = max(1, len(t) // 20)
            dt, dn = t[w:] - t[:-w], n[w:] - n[:-w]
            ok = dt > 0
            rate.plot(((t[w:] + t[:-w]) / 2)[ok], dn[ok] / dt[ok], color=color, label=name,
                      marker="o" if ok.sum() < 40 else None)  # a dot per point when there are few
    rate.set_ylim(bottom=0)
    total.set_xlabel("seconds since execution began")
    total.set_ylabel("rows committed")
    rate.set_xlabel("seconds since execution began")
    rate.set_ylabel("rows / s")
    if len(runs) > 1:
        total.legend(fontsize=7)
    return png(fig)


@plain_text
def runs_chart(points: List[Tuple[float, int]]) -> str:
    """The fallback when no run recorded its series: rows committed, each run's start and end joined."""
    fig = _figure(5.0, 2.8)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=PALETTE[0])
    ax.set_xlabel("seconds since the first run began")
    ax.set_ylabel("rows committed (all runs)")
    return png(fig)


@plain_text
def histogram(values: np.ndarray, xlabel: str) -> str:
    fig = _figure(6.0, 2.8)
    ax = fig.add_subplot()
    ax.hist(values, bins=min(60, max(5, len(values) // 20)), color=PALETTE[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return png(fig)


@plain_text
def scatter(xy: np.ndarray, labels: Sequence[str], explained: Sequence[float]) -> str:
    """The 2-D projection, coloured by label: the ten most frequent labels each a colour, the rest grey."""
    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot()
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    top = [str(n) for n in names[np.argsort(-counts, kind="stable")][:MAX_LEGEND]]
    lab = np.asarray(labels, dtype=object).astype(str)
    rest = ~np.isin(lab, top)
    dot = 24 if len(lab) < 300 else 8
    if rest.any():
        ax.scatter(xy[rest, 0], xy[rest, 1], s=dot * 0.75, color=OTHER, label=f"other ({len(names) - len(top)} labels)")
    for i, name in enumerate(top):
        mask = lab == name
        ax.scatter(xy[mask, 0], xy[mask, 1], s=dot, color=PALETTE[i], label=name[:30])
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of the variance)")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return png(fig)


def pca_2d(x: np.ndarray) -> Tuple[np.ndarray, List[float]]:
    """The sample projected on its first two principal components, and the variance share of each."""
    x = x.astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2
    share = (var / var.sum()).tolist() if var.sum() > 0 else [0.0] * len(var)
    comps = vt[:2]
    xy = x @ comps.T
    if xy.shape[1] < 2:  # a one-dimensional feature
        xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
        share = share + [0.0]
    return xy, share[:2]
