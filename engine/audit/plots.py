"""Small, readable PNG plots for the audit report (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from engine.audit.stats import Counts

ACCENT = "#3b6ea8"
SECOND = "#d9822b"
WIDTH_IN, HEIGHT_IN, DPI = 4.2, 2.4, 100


def _style(ax, title: str, xlabel: str, count_axis: str = "y") -> None:
    ax.set_title(title, fontsize=10, loc="left", color="#222")
    ax.set_xlabel(xlabel, fontsize=8, color="#444")
    ax.set_ylabel("count", fontsize=8, color="#444")
    ax.tick_params(labelsize=7, colors="#444")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_color("#999")
    ax.spines["bottom"].set_color("#999")
    axis = ax.yaxis if count_axis == "y" else ax.xaxis
    axis.set_major_locator(MaxNLocator(integer=True))  # counts are whole: no 0.5-sample ticks
    axis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.grid(axis=count_axis, color="#eee", linewidth=0.8)
    ax.set_axisbelow(True)


def _human(v: float) -> str:
    v = float(v)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}" if v == int(v) else f"{v:.2g}"


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def hist(
    path: str,
    counts: Counts,
    title: str,
    xlabel: str,
    bins: int = 40,
    integer: bool = False,
    clip_quantile: float = 0.995,
) -> str:
    """A histogram from (value, count) pairs; the far tail is folded into the last bar (named in the title)."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    v = np.asarray(counts.values, dtype=float)
    c = np.asarray(counts.counts, dtype=float)
    if len(v) == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")
        _style(ax, title, xlabel)
        return _save(fig, path)
    lo = float(v.min())
    hi_q = counts.quantile(clip_quantile) if len(v) > 1 else float(v.max())
    hi = float(hi_q if hi_q is not None else v.max())
    folded = float(v.max()) > hi
    if integer and hi - lo + 1 <= bins:
        edges = np.arange(lo - 0.5, hi + 1.5, 1.0)
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    h, edges = np.histogram(np.clip(v, lo, hi), bins=edges, weights=c)
    ax.bar(edges[:-1], h, width=np.diff(edges), align="edge", color=ACCENT, edgecolor="white", linewidth=0.4)
    if folded:
        title += f"  (last bar: ≥ {_human(hi)})"
    _style(ax, title, xlabel)
    return _save(fig, path)


def bars(
    path: str,
    items: Sequence[tuple[str, float]],
    title: str,
    xlabel: str = "count",
    max_items: int = 12,
    label_chars: int = 28,
) -> str:
    """Horizontal bars, largest on top; long labels are shortened."""
    items = list(items)[:max_items]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, max(1.4, 0.26 * len(items) + 0.8)))
    _style(ax, title, xlabel, count_axis="x")
    ax.set_ylabel("")
    if not items:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")
    else:
        labels = [_short(str(k), label_chars) for k, _ in items][::-1]
        vals = [float(n) for _, n in items][::-1]
        ax.barh(range(len(vals)), vals, color=ACCENT, height=0.7)
        ax.set_yticks(range(len(vals)), labels)
    return _save(fig, path)


def keep_drop_hist(path: str, hist_rows: Sequence[tuple[bool, float, int]], title: str, xlabel: str) -> str:
    """Stacked histogram of a filter score: kept vs dropped."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    xs = sorted({x for _, x, _ in hist_rows})
    width = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
    kept = {x: n for k, x, n in hist_rows if k}
    drop = {x: n for k, x, n in hist_rows if not k}
    kv = [kept.get(x, 0) for x in xs]
    dv = [drop.get(x, 0) for x in xs]
    ax.bar(xs, kv, width=width, color=ACCENT, label="kept", edgecolor="white", linewidth=0.4)
    ax.bar(xs, dv, width=width, bottom=kv, color=SECOND, label="dropped", edgecolor="white", linewidth=0.4)
    ax.legend(fontsize=7, frameon=False)
    _style(ax, title, xlabel)
    return _save(fig, path)


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"
