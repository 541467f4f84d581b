"""Figures from ``details.json``: MIA ROC curves, U-LiRA per-target accuracy, and image grids of the targets.

Like :mod:`.plots`, every figure is a bare ``matplotlib.figure.Figure`` saved atomically through
:func:`.plots._save`. :data:`DETAIL_FIGURES` names each figure's file, title and the part of a
condition it needs; Markdown and HTML both walk that one table, so they show the same figures and
say the same thing when a part is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
import torch
from sklearn.metrics import roc_curve

from ..evaluate.mia import threshold_auc
from .details import Condition, Details
from .plots import _save

MIA_ROC_PNG = "mia_roc.png"
ULIRA_PNG = "ulira.png"
GRIDS_PNG = "targets.png"
# Reference models first, the oracle last, so columns and legends read original → ... → oracle.
_FIRST, _LAST = ("original", "retrain"), ("oracle",)
_REF_STYLE = {"original": ("black", "-"), "retrain": ("tab:red", "--"), "oracle": ("tab:green", "-.")}
# The other models cycle through colours that none of the references use.
_PALETTE = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_MISSING_CELL = (0.86, 0.86, 0.9)  # a grid cell with no image (fewer near-duplicates than columns)
_PANEL_COLUMNS = 3


def model_order(names: Sequence[str]) -> list[str]:
    """``original``, ``retrain``, the others in their order, then ``oracle``."""
    names = list(dict.fromkeys(names))
    return [n for n in _FIRST if n in names] + [n for n in names if n not in _FIRST + _LAST] + [n for n in _LAST if n in names]


def _styles(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, line style) per model: fixed ones for the references, the palette in order for the rest."""
    others = [n for n in names if n not in _REF_STYLE]
    return {n: _REF_STYLE.get(n) or (_PALETTE[others.index(n) % len(_PALETTE)], "-") for n in names}


def _panels(n: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure with ``n`` panels, at most :data:`_PANEL_COLUMNS` a row; spare panels hidden."""
    cols = min(n, _PANEL_COLUMNS)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_mia_roc(conditions: Sequence[Condition], path: str | os.PathLike[str]) -> Path:
    """ROC curves of the loss-threshold MIA (targets = members vs test samples), one curve per model.

    One panel per condition; the legend gives each model's AUC (0.5 = targets look like unseen data).
    """
    fig, axes = _panels(len(conditions), 6.2, 4.8)
    for ax, cond in zip(axes, conditions):
        names = model_order(list(cond.mia_scores))
        styles = _styles(names)
        for name in names:
            members, nonmembers = cond.mia_scores[name]
            truth = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
            scores = np.r_[members, nonmembers]
            fpr, tpr, _ = roc_curve(truth, scores)
            color, line = styles[name]
            width = 2.0 if name in _REF_STYLE else 1.2
            auc = threshold_auc(torch.as_tensor(members), torch.as_tensor(nonmembers))  # the metrics' one AUC
            ax.plot(fpr, tpr, color=color, linestyle=line, linewidth=width, label=f"{name} (AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate (test samples called members)")
        ax.set_ylabel("true positive rate (targets called members)")
        seed = f", seed {cond.seed}" if cond.seed is not None else ""
        ax.set_title(f"{cond.label}{seed}")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_ulira(conditions: Sequence[Condition], path: str | os.PathLike[str]) -> Path:
    """U-LiRA attack accuracy per target (dots) and its mean (bar) per method; 0.5 is the ideal."""
    n_methods = max(len(c.ulira_accuracy) for c in conditions)
    fig, axes = _panels(len(conditions), max(5.0, 1.4 + 0.9 * n_methods), 4.2)
    for ax, cond in zip(axes, conditions):
        methods = model_order(list(cond.ulira_accuracy))
        styles = _styles(methods)
        for x, name in enumerate(methods):
            acc = cond.ulira_accuracy[name]
            spread = np.linspace(-0.25, 0.25, acc.size) if acc.size > 1 else np.zeros(1)
            color = styles[name][0]
            ax.scatter(x + spread, acc, s=18, color=color, alpha=0.8, zorder=3)
            ax.hlines(float(acc.mean()), x - 0.35, x + 0.35, color="black", linewidth=2, zorder=4)
        ax.axhline(0.5, linestyle="--", color="tab:green", linewidth=1, label="0.5 = ideal (attack at chance)")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("U-LiRA accuracy per target")
        seed = f", seed {cond.seed}" if cond.seed is not None else ""
        ax.set_title(f"{cond.label}{seed} (dots: targets, bar: mean)")
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _rgb(image: np.ndarray) -> np.ndarray:
    """[C, H, W] or [H, W] in [0, 1] → [H, W, 3] for display (first channel when C is not 1 or 3)."""
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] >= 3:
        return np.transpose(image[:3], (1, 2, 0))
    return np.repeat(image[0][..., None], 3, axis=2)


def _grid_columns(cond: Condition) -> tuple[list[str], list[list[np.ndarray | None]]]:
    """Column titles and one row of images (None: no image) per shown target."""
    n_near = max((len(g) for g in cond.near_duplicates), default=0)
    recon = model_order(list(cond.reconstructions))
    titles = ["target", *(f"near-dup {j + 1}" for j in range(n_near)), *(f"recon: {m}" for m in recon)]
    rows = []
    for i, target in enumerate(cond.targets):
        near = cond.near_duplicates[i] if i < len(cond.near_duplicates) else []
        rows.append([target, *(near[j] if j < len(near) else None for j in range(n_near)),
                     *(cond.reconstructions[m][i] for m in recon)])
    return titles, rows


def _mosaic(rows: list[list[np.ndarray | None]], pad: int) -> np.ndarray:
    """Tile the images into one [H, W, 3] array with ``pad`` white pixels between cells."""
    first = _rgb(rows[0][0])  # every row starts with its target
    h, w = first.shape[:2]
    n_cols = len(rows[0])
    out = np.ones((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top:top + h, left:left + w] = _MISSING_CELL if img is None else _rgb(img)
    return out


def plot_target_grids(conditions: Sequence[Condition], path: str | os.PathLike[str]) -> Path:
    """Per condition, one row per shown target: the target, its near-duplicates, and its reconstruction
    under each model (original, retrain, the methods, oracle). Grey cells: no such near-duplicate."""
    grids = [(cond, *_grid_columns(cond)) for cond in conditions]
    n_cols = max(len(titles) for _, titles, _ in grids)
    heights = [len(rows) for _, _, rows in grids]
    fig = Figure(figsize=(1.6 + 0.8 * n_cols, 1.5 * len(grids) + 0.8 * sum(heights)))
    axes = fig.subplots(len(grids), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (cond, titles, rows) in zip(axes, grids):
        h, w = _rgb(rows[0][0]).shape[:2]
        pad = max(1, h // 8)
        ax.imshow(_mosaic(rows, pad), interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_xticks([pad + j * (w + pad) + w / 2 - 0.5 for j in range(len(titles))])
        ax.set_xticklabels(titles, rotation=35, ha="left", fontsize=8)
        ax.xaxis.tick_top()
        ax.set_yticks([pad + i * (h + pad) + h / 2 - 0.5 for i in range(len(rows))])
        ax.set_yticklabels([f"id {t}" for t in cond.target_ids], fontsize=8)
        ax.tick_params(length=0)
        n_near = sum(t.startswith("near-dup") for t in titles)
        if len(titles) > 1 + n_near:  # a rule between the data images and the reconstructions
            ax.axvline(pad / 2 - 0.5 + (1 + n_near) * (w + pad), color="black", linewidth=1.5)
        seed = f", seed {cond.seed}" if cond.seed is not None else ""
        missing = "" if cond.reconstructions else " (no reconstructions in details.json)"
        ax.set_xlabel(f"{cond.label}{seed}{missing}", fontsize=10)
    return _save(fig, path)


@dataclass(frozen=True)
class DetailFigure:
    """One figure drawn from ``details.json``: its file, heading, caption and the condition part it needs."""

    name: str
    title: str
    caption: str
    part: str
    has: Callable[[Condition], bool]
    plot: Callable[[Sequence[Condition], str | os.PathLike[str]], Path]


DETAIL_FIGURES = (
    DetailFigure(MIA_ROC_PNG, "Membership inference: ROC curves",
                 "ROC of the loss-threshold attack (score −loss): forget targets as members against test samples as "
                 "non-members, per model. A curve on the diagonal (AUC 0.5) means the targets look like unseen data.",
                 "MIA scores (`mia_scores`)", lambda c: bool(c.mia_scores), plot_mia_roc),
    DetailFigure(ULIRA_PNG, "U-LiRA per-target accuracy",
                 "Accuracy of the U-LiRA attack (shadow models) on each target, per method; 0.5 is ideal "
                 "(the attack cannot tell unlearned from never-seen).",
                 "U-LiRA accuracies (`ulira_accuracy`; shadow models were off or not computed)",
                 lambda c: bool(c.ulira_accuracy), plot_ulira),
    DetailFigure(GRIDS_PNG, "Targets, near-duplicates and reconstructions",
                 "Each row is one forget target: the target, its planted near-duplicates, and its reconstruction under "
                 "each model (original, retrain, the methods, oracle). Grey cells: no such near-duplicate.",
                 "target images (`image_shape` is null for non-image inputs, or no images were stored)",
                 lambda c: bool(c.targets), plot_target_grids),
)
DETAIL_FIGURE_FILES = tuple(f.name for f in DETAIL_FIGURES)


def write_detail_figures(details: Details, out: str | os.PathLike[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Draw every figure of :data:`DETAIL_FIGURES` that some condition has data for.

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
            written[spec.name] = spec.plot(conditions, Path(out) / spec.name)
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
