"""Figures of a study summary (see :func:`unlearn_fast.report.summary.summarize`), and the pieces all figures share.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly rather than
pyplot, so plotting neither needs a display nor switches the caller's global backend. Every
PNG is written atomically: a crash mid-plot leaves any earlier image intact.

Every figure here and in :mod:`.figures` follows the same rules, so a reader learns them once:

- methods are rows, top to bottom in the order of the summary rows (:func:`method_order`), the
  order of the tables;
- each dot is one seed (or, in the per-sample figures, one target) and a black bar marks the mean;
- panels wrap into a grid no wider than :data:`MAX_ASPECT` : 1, and the title says which seeds are shown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..atomic_io import atomic_path
from .summary import format_c, is_number, metric_stat

RI = "residual_influence"
ACCURACY_METRICS = ("target_acc", "similar_acc", "test_acc")
ACCURACY_NAMES = {"target_acc": "forget targets", "similar_acc": "their near-duplicates", "test_acc": "test data"}
# The RI axis shows at most this range. RI is a ratio whose denominator can be tiny, and a broken method reaches
# −60: on a linear axis wide enough for that, 0 and 1 (the two references) would sit on top of each other. Values
# beyond it are drawn at the edge with their number printed. [−1, 2] keeps overshooting the oracle or the original
# by up to their whole gap in view.
RI_CLIP = (-1.0, 2.0)
RI_LABEL = "residual influence (0 = oracle, 1 = original)"
RI_CAPTION = ("Residual influence per method (rows, in the tables' order) at each near-duplicate count C>0, with the "
              "C=0 control (no near-duplicates) in its own panel beside it, on a linear axis: each dot is one seed, the "
              "black bar their mean. The dashed lines mark the oracle's 0 (as if never trained on the targets) and the "
              f"original's 1 (the targets' influence fully remains). The axis stops at [{RI_CLIP[0]:g}, {RI_CLIP[1]:g}]: "
              "a value beyond it is drawn as a triangle at that edge with its number printed.")
ACCURACY_CAPTION = ("Accuracy on the forget targets, their near-duplicates and held-out test data per method (rows, in the "
                    "tables' order), one row of panels per C: each dot is one seed, the black bar their mean, the dotted "
                    "green line the oracle's mean.")
MAX_ASPECT = 2.0  # width : height of every figure; a wider strip shrinks to unreadable text in a page
MIN_WIDTH = 7.5  # inches: room for a one-panel figure's title and legend
DPI = 120
ROW_HEIGHT = 0.27  # inches per method row: 7-point labels with air between them
SEED_COLOR, CONTROL_COLOR = "tab:blue", "tab:gray"
ACCURACY_COLORS = {"target_acc": "tab:red", "similar_acc": "tab:orange", "test_acc": "tab:blue"}


def similar_label(similar: Any) -> str:
    """Title of one near-duplicate count C."""
    c = format_c(similar)
    return "C=0 (control: no near-duplicates)" if c == "0" else f"C={c} near-duplicates"


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def method_order(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """Methods in the order of the summary rows (first appearance in the records): the order of every figure."""
    return [str(m) for m in _ordered(r["method"] for r in summary)]


def in_order(names: Iterable[str], order: Sequence[str]) -> list[str]:
    """``names`` sorted by their place in ``order``; names ``order`` lacks follow in their own order."""
    names = _ordered(names)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def seeds_text(seeds: Iterable[Any]) -> str:
    """``seed 0``, ``seeds 0, 1, 2`` or, for a long run, ``seeds 0–9``."""
    seeds = sorted(_ordered(s for s in seeds if s is not None), key=str)
    if not seeds:
        return "seed not recorded"
    if all(isinstance(s, int) for s in seeds):
        seeds = sorted(seeds)
        if len(seeds) > 4 and seeds == list(range(seeds[0], seeds[-1] + 1)):
            return f"seeds {seeds[0]}–{seeds[-1]}"
    return f"seed{'' if len(seeds) == 1 else 's'} {', '.join(str(s) for s in seeds)}"


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI`, atomically; returns ``path``."""
    FigureCanvasAgg(fig)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    # The temporary name ends in .tmp, so the format cannot be inferred from the suffix.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def panel_grid(n: int, width: float, height: float, *, max_cols: int = 3, extra_height: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure of ``n`` panels of ``width`` × ``height`` inches, wrapped at ``max_cols`` a row.

    The figure is made taller when needed so that it is never wider than :data:`MAX_ASPECT` : 1;
    ``extra_height`` leaves room for a title and a figure legend.
    """
    n = max(n, 1)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig_w = max(width * cols, MIN_WIDTH)
    fig_h = max(height * rows + extra_height, fig_w / MAX_ASPECT)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _edge_marks(ax: Axes, y: float, row: np.ndarray, offsets: np.ndarray, mean: float, color: str,
                xlim: tuple[float, float], clip: tuple[float, float]) -> None:
    """Triangles just inside the axis edge for the values beyond ``clip``, and their numbers (and the mean's) beside them."""
    span = xlim[1] - xlim[0]
    for side, sign in (("<", 1.0), (">", -1.0)):
        low = side == "<"
        out = np.isfinite(row) & ((row < clip[0]) if low else (row > clip[1]))
        mean_out = math.isfinite(mean) and ((mean < clip[0]) if low else (mean > clip[1]))
        if not out.any() and not mean_out:
            continue
        edge = (xlim[0] if low else xlim[1]) + sign * 0.012 * span
        ax.scatter(np.full(int(out.sum()), edge), y + offsets[out], marker=side, s=42, color=color,
                   edgecolors="black", linewidths=0.6, zorder=5)
        numbers = [f"{v:.3g}" for v in row[out]] + ([f"mean {mean:.3g}"] if mean_out else [])
        ax.text(edge + sign * 0.03 * span, y - 0.3, ", ".join(numbers), ha="left" if low else "right", va="center",
                fontsize=6.5, zorder=6, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def dot_rows(ax: Axes, names: Sequence[str], values: Sequence[Sequence[float]], means: Sequence[float], *,
             color: str, xlim: tuple[float, float], clip: tuple[float, float] | None = None,
             empty: str = "no values") -> None:
    """One row per name, top to bottom: a dot per value (NaN: none), a black bar at the mean, "n/a" when empty.

    A row's values keep their positions (a small vertical offset by index), so seed k sits at the same
    height in every row. With ``clip=(lo, hi)``, values and means outside it are drawn at that axis edge as
    a triangle, with their numbers printed beside it. A panel with no value at all says ``empty`` once.
    """
    lo, hi = clip if clip is not None else (-math.inf, math.inf)
    rows = [np.asarray(row, dtype=float).reshape(-1) for row in values]
    has_data = any(np.isfinite(row).any() for row in rows) or any(math.isfinite(m) for m in means)
    for y, (row, mean) in enumerate(zip(rows, means)):
        offsets = np.linspace(-0.2, 0.2, row.size) if row.size > 1 else np.zeros(row.size)
        inside = np.isfinite(row) & (row >= lo) & (row <= hi)
        ax.scatter(row[inside], y + offsets[inside], s=24, color=color, edgecolors="white", linewidths=0.5, zorder=3)
        if math.isfinite(mean) and lo <= mean <= hi:
            ax.plot([mean], [y], marker="|", markersize=13, markeredgewidth=2.2, color="black", zorder=4)
        if clip is not None:
            _edge_marks(ax, y, row, offsets, mean, color, xlim, clip)
        if has_data and not np.isfinite(row).any() and not math.isfinite(mean):
            ax.text(sum(xlim) / 2, y, "n/a", ha="center", va="center", fontsize=7, color="gray")
    if not has_data:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first method on top, as in the tables
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(*xlim)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(axis="x", color="0.9", linewidth=0.8, zorder=0)
    for y in range(len(names)):  # faint row guides, so a dot can be followed to its label
        ax.axhline(y, color="0.95", linewidth=0.6, zorder=0)


def dot_legend(color: str, dots: str, clip: tuple[float, float] | None = None) -> list[Line2D]:
    """Legend entries of :func:`dot_rows`: what a dot is, the mean bar and (when clipping) the edge triangles."""
    handles = [Line2D([], [], linestyle="none", marker="o", color=color, label=dots),
               Line2D([], [], linestyle="none", marker="|", markersize=12, markeredgewidth=2.2, color="black", label="mean")]
    if clip is not None:
        handles.append(Line2D([], [], linestyle="none", marker=">", color=color, markeredgecolor="black",
                              label=f"outside [{clip[0]:g}, {clip[1]:g}]: drawn at the edge, value printed"))
    return handles


def hide_repeated_labels(axes: Sequence[Axes], rows: Sequence[Sequence[str]], cols: int) -> None:
    """Drop the method labels of a panel whose left neighbour lists the same methods (they share the rows)."""
    for i, ax in enumerate(axes):
        if i % cols and list(rows[i]) == list(rows[i - 1]):
            ax.set_yticklabels([])


def _seed_values(records: Sequence[Mapping[str, Any]] | None, metric: str) -> tuple[list[Any], dict[tuple[Any, Any, Any], dict[Any, float]]]:
    """(the seeds, {(dataset, similar, method): {seed: value}}) of ``metric``; non-numbers count as missing."""
    table: dict[tuple[Any, Any, Any], dict[Any, float]] = {}
    seeds = _ordered(r.get("seed") for r in records or ())
    for r in records or ():
        value = r.get(metric)
        ok = is_number(value) and math.isfinite(float(value))
        table.setdefault((r["dataset"], r.get("similar"), str(r["method"])), {})[r.get("seed")] = float(value) if ok else math.nan
    return seeds, table


def _seed_rows(seeds: Sequence[Any], table: Mapping[tuple[Any, Any, Any], Mapping[Any, float]], dataset: Any,
               similar: Any, methods: Sequence[str]) -> list[list[float]]:
    return [[table.get((dataset, similar, m), {}).get(s, math.nan) for s in seeds] for m in methods]


def _seeds_shown(summary: Sequence[Mapping[str, Any]], seeds: Sequence[Any], metric: str) -> str:
    """Which seeds a figure shows: named from the records, else counted from the summary's n."""
    if seeds:
        return seeds_text(seeds) + ("; bar: mean over seeds" if len(seeds) > 1 else "")
    n = max((r["metrics"].get(metric, {}).get("n", 0) for r in summary), default=0)
    return f"bar: mean of {n} seed{'' if n == 1 else 's'}; per-seed values not given"


def _panels_by_dataset(summary: Sequence[Mapping[str, Any]], order: Sequence[str]) -> list[tuple[Any, Any, list[str]]]:
    """(dataset, C, methods) per panel: C>0 in order of appearance, then the C=0 control beside them."""
    panels = []
    for dataset in _ordered(r["dataset"] for r in summary):
        rows = [r for r in summary if r["dataset"] == dataset]
        methods = in_order((str(r["method"]) for r in rows), order)
        similars = _ordered(r["similar"] for r in rows)
        control = [c for c in similars if format_c(c) == "0"]
        panels += [(dataset, c, methods) for c in [*(c for c in similars if c not in control), *control]]
    return panels


def ri_figure(summary: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]] | None = None) -> Figure:
    """Residual influence per method: one panel per (dataset, C), the C=0 control in its own panel beside C>0.

    A linear axis with the oracle's 0 and the original's 1 as reference lines; each seed a dot (from
    ``records``, when given), the mean over seeds a black bar; values outside :data:`RI_CLIP` at the edge.
    """
    order = method_order(summary)
    panels = _panels_by_dataset(summary, order) or [("(no results)", None, [])]
    lookup = {(r["dataset"], r["similar"], str(r["method"])): r for r in summary}
    seeds, table = _seed_values(records, RI)
    data = [(_seed_rows(seeds, table, d, c, ms), [metric_stat(lookup.get((d, c, m)), RI)[0] for m in ms]) for d, c, ms in panels]
    values = [v for rows, means in data for v in [*np.ravel(rows), *means] if math.isfinite(v)]
    inside = [v for v in values if RI_CLIP[0] <= v <= RI_CLIP[1]]
    below, above = any(v < RI_CLIP[0] for v in values), any(v > RI_CLIP[1] for v in values)
    # The axis spans the data and both references; a side with clipped values reaches the clip bound.
    lo = RI_CLIP[0] if below else min([0.0, *inside])
    hi = RI_CLIP[1] if above else max([1.0, *inside])
    margin = 0.06 * (hi - lo)
    xlim = (lo - margin, hi + margin)
    n_rows = max(len(ms) for _, _, ms in panels)
    fig, axes = panel_grid(len(panels), 4.3, ROW_HEIGHT * n_rows + 1.0, max_cols=2, extra_height=1.0)
    for ax, (dataset, c, methods), (rows, means) in zip(axes, panels, data):
        control = c is not None and format_c(c) == "0"
        dot_rows(ax, methods, rows, means, color=CONTROL_COLOR if control else SEED_COLOR, xlim=xlim, clip=RI_CLIP,
                 empty=f"no {RI} values")
        ax.axvline(0.0, color="tab:green", linestyle="--", linewidth=1.2, zorder=1)
        ax.axvline(1.0, color="tab:red", linestyle="--", linewidth=1.2, zorder=1)
        ax.set_title(f"{dataset}: {similar_label(c)}" if c is not None else str(dataset), fontsize=10)
        ax.set_xlabel(RI_LABEL, fontsize=9)
    hide_repeated_labels(axes, [ms for _, _, ms in panels], min(len(panels), 2))
    has_control = any(c is not None and format_c(c) == "0" for _, c, _ in panels)
    dots = "one seed" + (" (grey in the C=0 control)" if has_control else "")
    handles = [*dot_legend(SEED_COLOR, dots, RI_CLIP if below or above else None),
               Line2D([], [], color="tab:green", linestyle="--", label="0 = oracle (as if never trained on the targets)"),
               Line2D([], [], color="tab:red", linestyle="--", label="1 = original (the targets' influence fully remains)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Residual influence per method ({_seeds_shown(summary, seeds, RI)})", fontsize=11)
    return fig


def plot_residual_influence(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                            records: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Draw :func:`ri_figure` and write it as a PNG atomically to ``path``; returns ``path``.

    ``records`` (the results the summary was built from) add one dot per seed; without them only the means show.
    """
    return save_figure(ri_figure(summary, records), path)


def accuracy_figure(summary: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]] | None = None) -> Figure:
    """Target / near-duplicate / test accuracy per method: a row of panels per (dataset, C), one panel per metric.

    Each seed a dot (from ``records``, when given), the mean a black bar, the oracle's mean a dotted line.
    """
    order = method_order(summary)
    conditions = _panels_by_dataset(summary, order) or [("(no results)", None, [])]
    panels = [(d, c, ms, metric) for d, c, ms in conditions for metric in ACCURACY_METRICS]
    lookup = {(r["dataset"], r["similar"], str(r["method"])): r for r in summary}
    n_rows = max(len(ms) for _, _, ms in conditions)
    fig, axes = panel_grid(len(panels), 3.4, ROW_HEIGHT * n_rows + 1.0, max_cols=len(ACCURACY_METRICS), extra_height=0.9)
    tables = {metric: _seed_values(records, metric) for metric in ACCURACY_METRICS}
    for ax, (dataset, c, methods, metric) in zip(axes, panels):
        rows = _seed_rows(*tables[metric], dataset, c, methods)
        means = [metric_stat(lookup.get((dataset, c, m)), metric)[0] for m in methods]
        # similar_acc at C=0 has no values: there are no near-duplicates to score.
        dot_rows(ax, methods, rows, means, color=ACCURACY_COLORS[metric], xlim=(-0.03, 1.03), empty=f"no {metric} values")
        oracle = metric_stat(lookup.get((dataset, c, "oracle")), metric)[0]
        if math.isfinite(oracle):
            ax.axvline(oracle, color="tab:green", linestyle=":", linewidth=1.4, zorder=1)
        where = f"{dataset}, C={format_c(c)}" if c is not None else str(dataset)
        ax.set_title(f"{where}\n{metric} ({ACCURACY_NAMES[metric]})", fontsize=9)
        ax.set_xlabel("accuracy", fontsize=9)
    hide_repeated_labels(axes, [ms for _, _, ms, _ in panels], len(ACCURACY_METRICS))
    handles = [*dot_legend("tab:gray", "one seed (colour: metric)"),
               Line2D([], [], color="tab:green", linestyle=":", linewidth=1.4, label="oracle's mean")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Accuracy per method ({_seeds_shown(summary, tables['test_acc'][0], 'test_acc')})", fontsize=11)
    return fig


def plot_accuracies(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                    records: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Draw :func:`accuracy_figure` and write it as a PNG atomically to ``path``; returns ``path``."""
    return save_figure(accuracy_figure(summary, records), path)
