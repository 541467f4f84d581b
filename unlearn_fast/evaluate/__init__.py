"""Metrics: one registry (``METRICS``) and :func:`compute_metrics`."""

from __future__ import annotations

from typing import Iterable

from .evaluation import DEFAULT_RI_MIN_GAP, SPLITS, Evaluation, split_outputs
from ..validation import as_list
from .metrics import METRICS, loss_threshold_auc, residual_influence_per_target
from . import distance as _distance  # noqa: F401,E402  (registers the distance-to-oracle metrics)
from . import mia as _mia  # noqa: F401,E402  (registers the population MIAs)
from . import relearn as _relearn  # noqa: F401,E402  (registers relearn_steps)
from . import reconstruction as _reconstruction  # noqa: F401,E402  (registers the reconstruction-SSIM metrics)
from .lira import ShadowEvidence  # noqa: E402  (importing registers LiRA and U-LiRA)

DEFAULT_METRICS = (
    "target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence",
    "mia_auc", "residual_influence", "residual_influence_median", "kl_to_oracle_targets", "js_to_oracle_similar",
    "weight_distance_to_oracle", "mia_svc_auc_targets", "relearn_steps", "reconstruction_ssim_targets",
    "reconstruction_ssim_gap_to_oracle", "ri_targets_used",
)


def compute_metrics(evaluation: Evaluation, metrics: str | Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Compute each named metric on ``evaluation``; unknown names raise, listing the valid ones."""
    if not isinstance(evaluation, Evaluation):
        raise ValueError(f"evaluation must be an unlearn_fast.Evaluation, got {type(evaluation).__name__}")
    entries = [METRICS.get(name) for name in as_list(metrics, "metrics", str)]
    return {entry.name: float(entry.fn(evaluation)) for entry in entries}


__all__ = [
    "DEFAULT_METRICS", "DEFAULT_RI_MIN_GAP", "Evaluation", "METRICS", "SPLITS", "ShadowEvidence", "compute_metrics", "loss_threshold_auc",
    "residual_influence_per_target", "split_outputs",
]
