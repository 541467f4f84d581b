"""Figures from ``details.json``: MIA ROC curves, U-LiRA per-target accuracy, and image grids of the targets.

Like :mod:`.plots` (whose layout rules they follow: methods in the tables' order, panels in a grid no
wider than 2:1), every figure is a bare ``matplotlib.figure.Figure`` saved atomically through
:func:`.plots.save_figure`. details.json holds one seed (the study keeps per-sample evidence for seed 0
only), and every title names it. :data:`DETAIL_FIGURES` names each figure's file, title, caption and
the part of a condition it needs; Markdown and HTML both walk that one table, so they show the same
figures and say the same thing when a part is missing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_curve

from ..evaluate.mia import threshold_auc
from .details import Condition, Details
from .plots import MAX_ASPECT, ROW_HEIGHT, dot_legend, dot_rows, hide_repeated_labels, in_order, panel_grid, save_figure, seeds_text

MIA_ROC_PNG = "mia_roc.png"
ULIRA_PNG = "ulira.png"
GRIDS_PNG = "targets.png"
_REF_STYLE = {"original": ("black", "-"), "retrain": ("tab:red", "--"), "oracle": ("tab:green", "-.")}
# The other models cycle through colours that none of the references use, then through line styles.
_PALETTE = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_STYLES = ("-", "--", ":")
# Block-masked pixels are 0, as black as a digit's background, so a near-duplicate shows them in a colour
# that neither the images (greyscale digits) nor the grid uses. Mid-grey would be taken for ink: the digits
# have 17 grey levels.
MASKED_PIXEL = (1.0, 0.55, 0.0)  # orange
MISSING_CELL = (0.86, 0.86, 0.9)  # a light-grey grid cell with no image (fewer near-duplicates than rows)
_CELL = 0.6  # inches per image in the grids


def _seeds(conditions: Sequence[Condition]) -> str:
    return seeds_text(c.seed for c in conditions)


def _title(cond: Condition) -> str:
    return f"{cond.label}, seed {cond.seed}" if cond.seed is not None else cond.label


def _styles(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, line style) per model: fixed ones for the references, the palette in order for the rest."""
    others = [n for n in names if n not in _REF_STYLE]
    return {n: _REF_STYLE.get(n) or (_PALETTE[others.index(n) % len(_PALETTE)],
                                     _STYLES[others.index(n) // len(_PALETTE) % len(_STYLES)]) for n in names}


def mia_roc_figure(conditions: Sequence[Condition], order: Sequence[str] = ()) -> Figure:
    """ROC curves of the loss-threshold MIA (targets = members vs test samples), one curve per model in ``order``.

    One panel per condition; the legend under it gives each model's AUC (0.5 = targets look like unseen data).
    """
    n_models = max(len(c.mia_scores) for c in conditions)
    fig, axes = panel_grid(len(conditions), 5.0, 4.6 + 0.17 * math.ceil(n_models / 2), extra_height=0.4)
    for ax, cond in zip(axes, conditions):
        names = in_order(cond.mia_scores, order)
        styles = _styles(names)
        for name in names:
            members, nonmembers = cond.mia_scores[name]
            truth = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
            fpr, tpr, _ = roc_curve(truth, np.r_[members, nonmembers])
            color, line = styles[name]
            auc = threshold_auc(torch.as_tensor(members), torch.as_tensor(nonmembers))  # the metrics' one AUC
            ax.plot(fpr, tpr, color=color, linestyle=line, linewidth=2.0 if name in _REF_STYLE else 1.2,
                    label=f"{name} (AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate (test samples called members)", fontsize=9)
        ax.set_ylabel("true positive rate (targets called members)", fontsize=9)
        ax.set_title(_title(cond), fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.suptitle(f"Loss-threshold membership inference on the forget targets ({_seeds(conditions)})", fontsize=11)
    return fig


def plot_mia_roc(conditions: Sequence[Condition], path: str | os.PathLike[str], order: Sequence[str] = ()) -> Path:
    """Draw :func:`mia_roc_figure` and write it as a PNG atomically to ``path``."""
    return save_figure(mia_roc_figure(conditions, order), path)


def ulira_figure(conditions: Sequence[Condition], order: Sequence[str] = ()) -> Figure:
    """U-LiRA attack accuracy per method: a dot per target, a black bar at the mean over targets; 0.5 is the ideal."""
    rows = [in_order(c.ulira_accuracy, order) for c in conditions]
    n_rows = max(len(r) for r in rows)
    fig, axes = panel_grid(len(conditions), 4.3, ROW_HEIGHT * n_rows + 1.0, max_cols=2, extra_height=0.9)
    for ax, cond, methods in zip(axes, conditions, rows):
        values = [cond.ulira_accuracy[m] for m in methods]
        dot_rows(ax, methods, values, [float(v.mean()) for v in values], color="tab:purple", xlim=(-0.03, 1.03))
        ax.axvline(0.5, linestyle="--", color="tab:green", linewidth=1.2, zorder=1)
        ax.set_xlabel("U-LiRA accuracy on one target", fontsize=9)
        ax.set_title(_title(cond), fontsize=10)
    hide_repeated_labels(axes, rows, min(len(conditions), 2))
    handles = [*dot_legend("tab:purple", "one forget target"),
               Line2D([], [], linestyle="--", color="tab:green", label="0.5 = ideal (unlearned cannot be told from never trained)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"U-LiRA accuracy per forget target ({_seeds(conditions)}; bar: mean over targets)", fontsize=11)
    return fig


def plot_ulira(conditions: Sequence[Condition], path: str | os.PathLike[str], order: Sequence[str] = ()) -> Path:
    """Draw :func:`ulira_figure` and write it as a PNG atomically to ``path``."""
    return save_figure(ulira_figure(conditions, order), path)


def _rgb(image: np.ndarray) -> np.ndarray:
    """[C, H, W] or [H, W] in [0, 1] → [H, W, 3] for display (first channel when C is not 1 or 3)."""
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] >= 3:
        return np.transpose(image[:3], (1, 2, 0)).astype(float)
    return np.repeat(image[0][..., None], 3, axis=2).astype(float)


def show_masked(near: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A near-duplicate [H, W, 3] with the pixels its block mask zeroed painted :data:`MASKED_PIXEL`.

    details.json keeps images, not masks. A block-masked copy equals its target except where the mask set
    every channel to 0, so "0 here, not 0 in the target" finds those pixels; masked pixels that were
    already 0 in the target look the same either way and stay as they are.
    """
    zeroed = (near == 0).all(axis=-1) & (target != 0).any(axis=-1)
    out = near.copy()
    out[zeroed] = MASKED_PIXEL
    return out


def _grid_rows(cond: Condition, order: Sequence[str]) -> tuple[list[str], list[list[np.ndarray | None]], int]:
    """Row labels and rows of [H, W, 3] images (a column per shown target; None: no image), and how many
    rows hold data (the target and its near-duplicates) before the reconstructions."""
    targets = [_rgb(t) for t in cond.targets]
    near = [[_rgb(img) for img in cond.near_duplicates[i]] if i < len(cond.near_duplicates) else [] for i in range(len(targets))]
    n_near = max((len(g) for g in near), default=0)
    recon = in_order(cond.reconstructions, order)
    labels = ["target", *(f"near-dup {j + 1}" for j in range(n_near)), *(f"recon: {m}" for m in recon)]
    rows: list[list[np.ndarray | None]] = [list(targets)]
    rows += [[show_masked(g[j], t) if j < len(g) else None for g, t in zip(near, targets)] for j in range(n_near)]
    rows += [[_rgb(img) for img in cond.reconstructions[m]] for m in recon]
    return labels, rows, 1 + n_near


def _mosaic(rows: list[list[np.ndarray | None]], pad: int) -> np.ndarray:
    """Tile the images into one [H, W, 3] array with ``pad`` white pixels between cells."""
    h, w = rows[0][0].shape[:2]  # the first row holds the targets, which every column has
    out = np.ones((len(rows) * (h + pad) + pad, len(rows[0]) * (w + pad) + pad, 3))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top:top + h, left:left + w] = MISSING_CELL if img is None else img
    return out


def _grid_layout(shapes: Sequence[tuple[int, int]]) -> tuple[int, list[float], list[float]]:
    """Columns of the condition grid, with the column widths and row heights in inches.

    ``shapes`` are (rows, columns) of images per condition. Each candidate column count is sized with
    room for labels; the one closest to a 4:3 page-friendly shape that keeps within :data:`MAX_ASPECT` wins.
    """
    best = None
    for cols in range(1, min(len(shapes), 3) + 1):
        grid = [shapes[i:i + cols] for i in range(0, len(shapes), cols)]
        widths = [1.6 + _CELL * max(row[j][1] for row in grid if j < len(row)) for j in range(cols)]
        heights = [1.1 + _CELL * max(r for r, _ in row) for row in grid]
        aspect = sum(widths) / sum(heights)
        score = (aspect > MAX_ASPECT, abs(math.log(aspect / (4 / 3))))
        if best is None or score < best[0]:
            best = (score, cols, widths, heights)
    assert best is not None
    return best[1], best[2], best[3]


def target_grid_figure(conditions: Sequence[Condition], order: Sequence[str] = ()) -> Figure:
    """Per condition, a column per shown target: the target, its near-duplicates (block-masked pixels in
    orange), and its reconstruction under each model in ``order``."""
    grids = [(cond, *_grid_rows(cond, order)) for cond in conditions]
    cols, widths, heights = _grid_layout([(len(rows), len(rows[0])) for _, _, rows, _ in grids])
    fig_w = max(sum(widths), 6.0)  # room for the two-line title
    fig = Figure(figsize=(fig_w, max(sum(heights) + 0.4, fig_w / MAX_ASPECT)), layout="constrained")
    spec = fig.add_gridspec(len(heights), cols, width_ratios=widths, height_ratios=heights)
    for k, (cond, labels, rows, n_data) in enumerate(grids):
        ax = fig.add_subplot(spec[k // cols, k % cols])
        h, w = rows[0][0].shape[:2]
        pad = max(1, h // 8)
        ax.imshow(_mosaic(rows, pad), interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_xticks([pad + j * (w + pad) + w / 2 - 0.5 for j in range(len(rows[0]))])
        ax.set_xticklabels([f"id {t}" for t in cond.target_ids], rotation=35, ha="left", fontsize=8)
        ax.xaxis.tick_top()
        ax.set_yticks([pad + i * (h + pad) + h / 2 - 0.5 for i in range(len(rows))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.tick_params(length=0)
        if len(rows) > n_data:  # a rule between the data images and the reconstructions
            ax.axhline(pad / 2 - 0.5 + n_data * (h + pad), color="black", linewidth=1.5)
        missing = "" if cond.reconstructions else "\n(no reconstructions in details.json)"
        ax.set_xlabel(f"{_title(cond)}{missing}", fontsize=10)
    fig.suptitle(f"Forget targets, their near-duplicates (orange: masked pixels)\nand reconstructions ({_seeds(conditions)})",
                 fontsize=10)
    return fig


def plot_target_grids(conditions: Sequence[Condition], path: str | os.PathLike[str], order: Sequence[str] = ()) -> Path:
    """Draw :func:`target_grid_figure` and write it as a PNG atomically to ``path``."""
    return save_figure(target_grid_figure(conditions, order), path)


@dataclass(frozen=True)
class DetailFigure:
    """One figure drawn from ``details.json``: its file, heading, caption and the condition part it needs."""

    name: str
    title: str
    caption: str
    part: str
    has: Callable[[Condition], bool]
    plot: Callable[[Sequence[Condition], str | os.PathLike[str], Sequence[str]], Path]


# The study keeps per-sample evidence for its first seed only (study_details), while the tables average all seeds.
SEED_NOTE = "Seed 0 only: details.json keeps per-sample values for the first seed; the tables and the figures above average all seeds."
DETAIL_FIGURES = (
    DetailFigure(MIA_ROC_PNG, "Membership inference: ROC curves",
                 "ROC of the loss-threshold attack (score −loss): forget targets as members against test samples as "
                 "non-members, one curve per model, listed in the tables' order. A curve on the diagonal (AUC 0.5) "
                 f"means the targets look like unseen data. {SEED_NOTE}",
                 "MIA scores (`mia_scores`)", lambda c: bool(c.mia_scores), plot_mia_roc),
    DetailFigure(ULIRA_PNG, "U-LiRA per-target accuracy (seed 0)",
                 "Accuracy of the U-LiRA attack (shadow models) per method, in the tables' order: each dot one forget "
                 "target, the black bar their mean. 0.5 (dashed) is ideal: the attack cannot tell unlearned from "
                 f"never-seen. {SEED_NOTE}",
                 "U-LiRA accuracies (`ulira_accuracy`; shadow models were off or not computed)",
                 lambda c: bool(c.ulira_accuracy), plot_ulira),
    DetailFigure(GRIDS_PNG, "Targets, near-duplicates and reconstructions",
                 "Each column is one forget target: the target, its planted near-duplicates, and (below the rule) its "
                 "reconstruction under each model, in the tables' order. Orange pixels are the blocks a near-duplicate's "
                 "mask set to 0 (masked pixels that were already black in the target stay black); a light-grey cell: "
                 f"the target has fewer near-duplicates than the grid has rows. {SEED_NOTE}",
                 "target images (`image_shape` is null for non-image inputs, or no images were stored)",
                 lambda c: bool(c.targets), plot_target_grids),
)
DETAIL_FIGURE_FILES = tuple(f.name for f in DETAIL_FIGURES)


def write_detail_figures(details: Details, out: str | os.PathLike[str],
                         order: Sequence[str] = ()) -> tuple[dict[str, Path], dict[str, str]]:
    """Draw every figure of :data:`DETAIL_FIGURES` that some condition has data for, methods in ``order``
    (:func:`.plots.method_order` of the summary, so they match the tables; by default, details.json's own order).

    Returns (name → written path, name → why it could not be drawn). details.json is optional
    evidence, so a figure whose data passed the checks but still fails to plot is reported in the
    page instead of failing the whole report.
    """
    written, errors = {}, {}
    for spec in DETAIL_FIGURES:
        conditions = [c for c in details.conditions if spec.has(c)]
        if not conditions:
            continue
        try:
            written[spec.name] = spec.plot(conditions, Path(out) / spec.name, order)
        except Exception as exc:  # noqa: BLE001 -- optional evidence must not sink the report
            errors[spec.name] = f"Not shown: drawing it from details.json failed ({type(exc).__name__}: {exc})."
    return written, errors


def missing_note(spec: DetailFigure, details: Details) -> str:
    """The one line that stands in for a figure that could not be drawn."""
    if details.status == "absent":
        return f"Not shown: there is no details.json with {spec.part}."
    if details.status == "ignored":
        return f"Not shown: details.json was ignored ({details.reason})."
    return f"Not shown: details.json holds no {spec.part}."
