"""Per-sample evidence of one study condition for the report: ``details.json``.

results.json holds one number per (method, seed, metric); the report's ROC curves, U-LiRA
per-target plot and image grids need per-sample values. The study keeps them for seed 0 of each
(dataset, C) condition, in this layout (read back, and its version owned, by :mod:`unlearn_fast.report.details`):

    {"schema_version": 1,
     "conditions": [{"dataset", "similar", "seed",
                     "image_shape": [C, H, W] or null,
                     "target_ids": [...],                       # the shown targets
                     "targets": [image, ...], "near_duplicates": [[image, ...], ...],
                     "reconstructions": {model: [image, ...]},  # when reconstruction SSIM ran
                     "mia_scores": {model: {"members": [...], "nonmembers": [...]}},  # −loss, targets vs test
                     "ulira_accuracy": {model: [per target, ...]}}]}           # when shadows ran
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .data.similar_dataset import SimilarDataset
from .evaluate.evaluation import Evaluation
from .evaluate.reconstruction import RECONSTRUCTION_METRICS
from .report.details import DETAILS_SCHEMA_VERSION  # noqa: F401  (the reader owns the version; the study writes it)

SHOWN_TARGETS = 6          # image-grid rows: enough to see a pattern, small enough to read
SHOWN_NEAR_DUPLICATES = 3  # per target


def _rounded(values: torch.Tensor) -> Any:
    """Nested lists of floats with 5 significant digits (NaN/inf → None), to keep the file small."""
    def nested(x: Any) -> Any:
        if isinstance(x, list):
            return [nested(v) for v in x]
        return float(f"{x:.5g}") if math.isfinite(x) else None

    return nested(values.detach().double().cpu().tolist())


def condition_details(dataset: str, copies: int, seed: int, data: SimilarDataset, evaluations: dict[str, Evaluation],
                      metrics: Iterable[str]) -> dict[str, Any]:
    """The details.json entry of one condition; ``evaluations`` by model name, as the study ran them."""
    metrics = set(metrics)
    first = next(iter(evaluations.values()))
    shown = list(data.forget_ids[:SHOWN_TARGETS])
    inputs, _ = first.split_tensors("targets")
    is_image = inputs.dim() == 4
    entry: dict[str, Any] = {"dataset": dataset, "similar": copies, "seed": seed,
                             "image_shape": list(inputs.shape[1:]) if is_image else None, "target_ids": shown}
    if is_image:
        similar_x, _ = first.split_tensors("similar")
        where = {j: i for i, j in enumerate(first.split_ids("similar"))}
        entry["targets"] = _rounded(inputs[:len(shown)])
        entry["near_duplicates"] = [_rounded(similar_x[[where[j] for j in data.similar.get(t, [])[:SHOWN_NEAR_DUPLICATES]]])
                                    for t in shown]
        if metrics & set(RECONSTRUCTION_METRICS):
            from .evaluate.reconstruction import reconstructions

            entry["reconstructions"] = {name: _rounded(reconstructions(ev)[:len(shown)]) for name, ev in evaluations.items()}
    entry["mia_scores"] = {name: {"members": _rounded(-ev.outputs("targets").loss), "nonmembers": _rounded(-ev.outputs("test").loss)}
                           for name, ev in evaluations.items()}
    if "ulira_accuracy_targets" in metrics:
        from .evaluate.lira import ulira_per_target

        entry["ulira_accuracy"] = {name: _rounded(ulira_per_target(ev)) for name, ev in evaluations.items()
                                   if ev.shadows is not None and ev.shadows.method_phi is not None}
    return entry
