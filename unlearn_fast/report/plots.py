"""Bar charts of a study summary (see :func:`unlearn_fast.report.summary.summarize`).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly rather than
pyplot, so plotting neither needs a display nor switches the caller's global backend. Every
PNG is written atomically: a crash mid-plot leaves any earlier image intact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic_io import atomic_path
from .summary import format_c, metric_stat

RI_YLABEL = "residual influence (1 = fully remains, 0 = oracle)"
# Past this |value| (a mean or a CI end) the RI axis turns symmetric-log, linear within ±1: a few exploding
# ratios (tiny denominators, one seed's over-shoot) would otherwise flatten every other bar to zero.
RI_SYMLOG_ABOVE = 5.0
ACCURACY_METRICS = ("target_acc", "similar_acc", "test_acc")


def similar_label(similar: Any) -> str:
    """Legend label for one near-duplicate count C."""
    c = format_c(similar)
    return "C=0 (control)" if c == "0" else f"C={c} near-duplicates"


def _ordered(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _grouped_bars(ax: Axes, categories: Sequence[Any], series: Sequence[tuple[str, Sequence[tuple[float, float]]]]) -> int:
    """Draw one bar per (category, series); NaN means are skipped, NaN CIs drawn without error bars.

    Returns the number of bars drawn, so callers can say so when there was nothing to show.
    """
    n_series = max(len(series), 1)
    width = 0.8 / n_series
    drawn = 0
    colors = [f"C{i}" for i in range(n_series)]
    for i, (label, stats) in enumerate(series):
        offset = (i - (n_series - 1) / 2) * width
        xs = [j + offset for j, (m, _) in enumerate(stats) if math.isfinite(m)]
        means = [m for m, _ in stats if math.isfinite(m)]
        cis = [c if math.isfinite(c) else 0.0 for m, c in stats if math.isfinite(m)]
        if not xs:
            continue  # an empty series would get a legend entry for bars that are not there
        ax.bar(xs, means, width=width * 0.95, color=colors[i], label=label)
        ax.errorbar(xs, means, yerr=cis, fmt="none", ecolor="black", capsize=3, linewidth=1)
        drawn += len(xs)
    ax.set_xticks(range(len(categories)))
    ax.set_xlim(-0.5, max(len(categories), 1) - 0.5)
    ax.set_xticklabels([str(c) for c in categories], rotation=20, ha="right")
    return drawn


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} values", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    # The temporary name ends in .tmp, so the format cannot be inferred from the suffix.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def _datasets(summary: Sequence[Mapping[str, Any]]) -> list[Any]:
    return _ordered([r["dataset"] for r in summary])


def plot_residual_influence(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars of mean residual influence: x = methods, one bar per C, CI error bars.

    One panel per dataset. Dashed reference lines mark 1 (influence fully remains) and 0
    (oracle level). Writes a PNG atomically to ``path`` and returns it.
    """
    datasets = _datasets(summary) or ["(no results)"]
    n_methods = max(len(_ordered([r["method"] for r in summary])), 1)
    fig = Figure(figsize=(max(6.0, 1.6 + 1.3 * n_methods) * len(datasets), 4.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        rows = [r for r in summary if r["dataset"] == dataset]
        methods = _ordered([r["method"] for r in rows])
        similars = _ordered([r["similar"] for r in rows])
        lookup = {(r["similar"], r["method"]): r for r in rows}
        series = [(similar_label(c), [metric_stat(lookup.get((c, m)), "residual_influence") for m in methods])
                  for c in similars]
        drawn = _grouped_bars(ax, methods, series)
        ax.axhline(1.0, linestyle="--", color="tab:red", linewidth=1, label="1 = influence fully remains")
        ax.axhline(0.0, linestyle="--", color="tab:green", linewidth=1, label="0 = oracle level")
        if not drawn:
            _no_data(ax, "residual_influence")
        ends = [abs(m) + (c if math.isfinite(c) else 0.0) for _, stats in series for m, c in stats if math.isfinite(m)]
        symlog = max(ends, default=0.0) > RI_SYMLOG_ABOVE
        if symlog:
            ax.set_yscale("symlog", linthresh=1.0)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.1), max(high, 1.1))  # keep both reference lines in view
        ax.set_title(str(dataset))
        ax.set_ylabel(RI_YLABEL + ("\nsymlog axis: linear within ±1" if symlog else ""))
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracies(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars of target / similar / test accuracy per method, one panel per (dataset, C).

    Rows of panels are datasets, columns are near-duplicate counts C. Error bars are 95% CIs.
    Writes a PNG atomically to ``path`` and returns it.
    """
    datasets = _datasets(summary) or ["(no results)"]
    by_dataset = {d: [r for r in summary if r["dataset"] == d] for d in datasets}
    n_cols = max((len(_ordered([r["similar"] for r in rows])) for rows in by_dataset.values()), default=1) or 1
    n_methods = max(len(_ordered([r["method"] for r in summary])), 1)
    fig = Figure(figsize=(max(5.0, 1.5 + 1.1 * n_methods) * n_cols, 4.0 * len(datasets)))
    grid = fig.subplots(len(datasets), n_cols, squeeze=False)
    for i, dataset in enumerate(datasets):
        rows = by_dataset[dataset]
        similars = _ordered([r["similar"] for r in rows]) or [None]
        for j in range(n_cols):
            ax = grid[i][j]
            if j >= len(similars):
                ax.set_visible(False)  # this dataset ran fewer C values than another
                continue
            c = similars[j]
            sub = [r for r in rows if r["similar"] == c]
            methods = _ordered([r["method"] for r in sub])
            series = [(metric, [metric_stat(r, metric) for r in sub]) for metric in ACCURACY_METRICS]
            drawn = _grouped_bars(ax, methods, series)
            if not drawn:
                _no_data(ax, "accuracy")
            ax.set_ylim(0.0, 1.25)  # headroom above 1 for the legend
            ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
            ax.set_title(f"{dataset}: {similar_label(c)}" if c is not None else str(dataset))
            ax.set_ylabel("accuracy")
            if drawn:
                ax.legend(fontsize=8, loc="upper center", ncol=len(ACCURACY_METRICS))
    return _save(fig, path)
