"""Metrics: one registry (``METRICS``) and :func:`evaluate`."""

from __future__ import annotations

from typing import Iterable

from .evaluation import DEFAULT_RI_MIN_GAP, SPLITS, Evaluation, split_outputs
from .metrics import METRICS, loss_threshold_auc, residual_influence_per_target

DEFAULT_METRICS = (
    "target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence",
    "mia_auc", "residual_influence", "ri_targets_used",
)


def evaluate(evaluation: Evaluation, metrics: Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Compute each named metric on ``evaluation``; unknown names raise, listing the valid ones."""
    names = list(metrics)
    entries = [METRICS.get(name) for name in names]
    return {entry.name: float(entry.fn(evaluation)) for entry in entries}


__all__ = [
    "DEFAULT_METRICS", "DEFAULT_RI_MIN_GAP", "Evaluation", "METRICS", "SPLITS", "evaluate", "loss_threshold_auc",
    "residual_influence_per_target", "split_outputs",
]
