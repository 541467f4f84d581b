"""The report's figures read well: page-friendly shapes, a linear RI axis with its references, one method
order in every figure, labelled seeds, and block-masked pixels that stand out from the image.

The records and details.json are synthetic (no study runs here), so each property is checked on data
chosen to break it: a method order unlike the old "original, retrain, ..., oracle" sort, RI far outside
the axis range, many methods and several C values for the aspect ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from unlearn_fast.report import build_report, summarize
from unlearn_fast.report.details import parse_details
from unlearn_fast.report.figures import (
    DETAIL_FIGURES,
    MASKED_PIXEL,
    ULIRA_PNG,
    mia_roc_figure,
    plot_target_grids,
    target_grid_figure,
    ulira_figure,
)
from unlearn_fast.report.plots import (
    RI_CAPTION,
    RI_CLIP,
    accuracy_figure,
    method_order,
    ri_figure,
)

# Not the order the old figures sorted into (original, retrain first, oracle last): the tables' order must win.
METHODS = ["zeta", "original", "oracle", "alpha", "retrain", "beta+similar"]
SHAPE = [1, 8, 8]


def _records(methods: list[str], similars: tuple[int, ...] = (10, 0), datasets: tuple[str, ...] = ("digits-blockmask",),
             seeds: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    ri = {"original": 1.0, "oracle": 0.0, "retrain": 0.9, "zeta": -60.0, "alpha": 0.4}
    return [{"schema_version": 1, "dataset": d, "method": m, "seed": s, "similar": c, "targets": 6,
             "residual_influence": ri.get(m, 0.2) + (0.0 if m in ("original", "oracle") else 0.05 * s),
             "target_acc": float(rng.uniform(0.5, 1)), "similar_acc": None if c == 0 else float(rng.uniform(0.5, 1)),
             "test_acc": float(rng.uniform(0.9, 1))}
            for d in datasets for c in similars for s in range(seeds) for m in methods]


def _digit(rng: np.random.Generator) -> np.ndarray:
    """A digit-like image: black background, bright strokes in the middle columns."""
    img = np.zeros(SHAPE)
    img[0, 1:7, 2:6] = rng.uniform(0.5, 1.0, (6, 4))
    return img


def _details(methods: list[str], similars: tuple[int, ...] = (10, 0), n: int = 3) -> dict:
    """A details.json in the study's format (seed 0); near-duplicates are targets with block (2:4, 2:4) zeroed."""
    rng = np.random.default_rng(1)
    conditions = []
    for c in similars:
        targets = [_digit(rng) for _ in range(n)]
        near = []
        for t in targets:
            masked = t.copy()
            masked[0, 2:4, 2:4] = 0.0
            near.append([masked.tolist()] * min(c, 2))
        conditions.append({
            "dataset": "digits-blockmask", "similar": c, "seed": 0, "image_shape": SHAPE,
            "target_ids": list(range(n)), "targets": [t.tolist() for t in targets], "near_duplicates": near,
            # details.json lists the models in its own order; the figures must not follow it
            "reconstructions": {m: [_digit(rng).tolist() for _ in range(n)] for m in reversed(methods)},
            "mia_scores": {m: {"members": (-rng.exponential(0.2, 5)).tolist(), "nonmembers": (-rng.exponential(0.4, 9)).tolist()}
                           for m in reversed(methods)},
            "ulira_accuracy": {m: rng.uniform(0.4, 0.9, n).tolist() for m in reversed(methods) if m != "original"},
        })
    return {"schema_version": 1, "conditions": conditions}


def _aspect(png: Path) -> float:
    with Image.open(png) as img:
        return img.width / img.height


@pytest.mark.parametrize("methods, similars, datasets", [
    (METHODS, (10, 0), ("digits-blockmask",)),
    (METHODS[:3], (10,), ("digits-blockmask",)),  # few methods, one C: the widest shape before the fix
    ([f"m{i}" for i in range(17)], (1, 3, 10, 0), ("a", "b")),
])
def test_every_report_png_is_at_most_about_two_to_one(tmp_path: Path, methods: list[str], similars: tuple[int, ...],
                                                     datasets: tuple[str, ...]) -> None:
    records = _records(methods, similars, datasets)
    (tmp_path / "results.json").write_text(json.dumps(records))
    (tmp_path / "details.json").write_text(json.dumps(_details(methods, similars)))
    build_report(tmp_path)
    pngs = sorted(tmp_path.glob("*.png"))
    assert {p.name for p in pngs} >= {"residual_influence.png", "accuracy.png", "mia_roc.png", "ulira.png", "targets.png"}
    for png in pngs:
        assert _aspect(png) <= 2.2, (png.name, Image.open(png).size)


def _vertical_lines(fig: Figure, ax_index: int = 0) -> set[float]:
    ax = fig.axes[ax_index]
    return {float(line.get_xdata()[0]) for line in ax.get_lines()
            if len(set(np.atleast_1d(line.get_xdata()))) == 1 and len(line.get_xdata()) == 2}


def test_ri_plot_is_linear_with_references_and_marks_clipped_values() -> None:
    records = _records(METHODS)
    fig = ri_figure(summarize(records), records)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # C=10, and the C=0 control in its own panel beside it
    assert "C=10" in panels[0].get_title() and "control" in panels[1].get_title()
    for i, ax in enumerate(panels):
        assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"
        assert {0.0, 1.0} <= _vertical_lines(fig, i)
        lo, hi = ax.get_xlim()
        # zeta's −60 does not squash the axis: it stops just past the stated clip range ...
        assert RI_CLIP[0] - 0.5 < lo < RI_CLIP[0] and 1.0 < hi < RI_CLIP[1] + 0.5
        # ... and the clipped seeds are printed at the edge
        assert any("-60" in t.get_text() for t in ax.texts)
    # one dot per seed: the three retrain seeds sit in the retrain row of the first panel
    row = method_order(summarize(records)).index("retrain")
    dots = [o for c in panels[0].collections for o in c.get_offsets() if abs(o[1] - row) < 0.3]
    assert sorted(round(float(x), 2) for x, _ in dots) == [0.9, 0.95, 1.0]
    legend = " ".join(t.get_text() for leg in fig.legends for t in leg.get_texts())
    assert "one seed" in legend and "mean" in legend and f"outside [{RI_CLIP[0]:g}, {RI_CLIP[1]:g}]" in legend
    assert "0 = oracle" in legend and "1 = original" in legend
    assert "seeds 0, 1, 2" in fig._suptitle.get_text()
    assert "linear axis" in RI_CAPTION and "triangle" in RI_CAPTION


def test_ri_plot_without_records_says_it_shows_means_only() -> None:
    fig = ri_figure(summarize(_records(METHODS)))
    assert "bar: mean of 3 seeds; per-seed values not given" in fig._suptitle.get_text()


def _row_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def test_one_method_order_in_every_figure() -> None:
    records = _records(METHODS)
    summary = summarize(records)
    order = method_order(summary)
    assert order == METHODS  # first appearance in the records, as the summary rows
    conditions = parse_details(_details(METHODS)).conditions
    assert list(conditions[0].mia_scores) == list(reversed(METHODS))  # details.json's own order differs
    assert _row_labels(ri_figure(summary, records).axes[0]) == order
    assert _row_labels(accuracy_figure(summary, records).axes[0]) == order
    assert _row_labels(ulira_figure(conditions, order).axes[0]) == [m for m in order if m != "original"]
    roc = mia_roc_figure(conditions, order).axes[0]
    assert [t.get_text().split(" (AUC")[0] for t in roc.get_legend().get_texts()] == [*order, "chance"]
    grid = target_grid_figure(conditions, order).axes[0]
    assert [t.removeprefix("recon: ") for t in _row_labels(grid) if t.startswith("recon: ")] == order


def test_detail_figures_name_their_seed() -> None:
    conditions = parse_details(_details(METHODS)).conditions
    fig = ulira_figure(conditions, METHODS)
    assert "seed 0" in fig._suptitle.get_text()
    assert all("seed 0" in ax.get_title() for ax in fig.axes if ax.get_visible())
    spec = next(f for f in DETAIL_FIGURES if f.name == ULIRA_PNG)
    assert "seed 0" in spec.title and "Seed 0 only" in spec.caption
    assert all("Seed 0 only" in f.caption for f in DETAIL_FIGURES)
    assert "seed 0" in mia_roc_figure(conditions, METHODS)._suptitle.get_text()
    assert "seed 0" in target_grid_figure(conditions, METHODS)._suptitle.get_text()


def test_masked_pixels_stand_out_in_the_target_grid(tmp_path: Path) -> None:
    conditions = parse_details(_details(METHODS, similars=(10,))).conditions
    fig = target_grid_figure(conditions, METHODS)
    mosaic = np.asarray(fig.axes[0].get_images()[0].get_array())
    pad = 1  # between 8-pixel images: max(1, 8 // 8)

    def cell(row: int, col: int) -> np.ndarray:
        top, left = pad + row * (8 + pad), pad + col * (8 + pad)
        return mosaic[top:top + 8, left:left + 8]

    target, near = cell(0, 0), cell(1, 0)  # rows: target, near-dup 1, ...; a column per target
    np.testing.assert_allclose(near[2:4, 2:4], np.broadcast_to(MASKED_PIXEL, (2, 2, 3)))
    background = target[0, 0]
    for colour in (np.zeros(3), np.ones(3), background):  # neither black, nor the padding, nor the image background
        assert np.abs(near[2:4, 2:4] - colour).max() > 0.3
    np.testing.assert_allclose(near[4:6], target[4:6])  # unmasked pixels are drawn as they are
    assert (near[0] == 0).all()  # the target's own black background stays black
    # the written PNG holds the colour too, and the caption names what is drawn
    png = np.asarray(Image.open(plot_target_grids(conditions, tmp_path / "t.png", METHODS)).convert("RGB")) / 255.0
    assert (np.abs(png - np.asarray(MASKED_PIXEL)).max(axis=-1) < 0.05).sum() > 50
    caption = next(f for f in DETAIL_FIGURES if f.name == "targets.png").caption
    assert "Orange pixels" in caption and "Grey cells" not in caption
