"""Metrics: one registry (``METRICS``) and :func:`compute_metrics`.

The modules form a DAG, bottom up: :mod:`.registry` (``METRICS`` and the facts on each entry),
:mod:`.stats` and :mod:`.ssim` (shared statistics), :mod:`.evaluation` (the ``Evaluation``
container); above them the basic metrics (:mod:`.metrics`) and the families (:mod:`.distance`,
:mod:`.mia`, :mod:`.relearn`, :mod:`.reconstruction`, :mod:`.lira`), which import only those below.
Importing a family registers its metrics; they are imported here in the order that
:data:`DEFAULT_METRICS` (and so the study's columns) follows.
"""

from __future__ import annotations

import warnings
from typing import Iterable

from ..validation import as_list
from .evaluation import DEFAULT_RI_MIN_GAP, SPLITS, Evaluation, MissingReference, ShadowEvidence, split_outputs
from .registry import METRICS, default_metrics
from .stats import loss_threshold_auc
from .metrics import residual_influence_per_target
from . import distance as _distance  # noqa: F401  (registers the distance-to-oracle metrics)
from . import mia as _mia  # noqa: F401  (registers the population MIAs)
from . import relearn as _relearn  # noqa: F401  (registers relearn_steps)
from . import reconstruction as _reconstruction  # noqa: F401  (registers the reconstruction-SSIM metrics)
from . import lira as _lira  # noqa: F401  (registers LiRA and U-LiRA)

# The metrics registered with default=True, in registration order, bookkeeping last.
DEFAULT_METRICS = default_metrics()


class MetricValues(dict):
    """name → value, as a dict; ``skipped`` maps each default metric left out to the reason (the
    reference it needs and how to give it)."""

    skipped: dict[str, str]


def compute_metrics(evaluation: Evaluation, metrics: str | Iterable[str] | None = None) -> MetricValues:
    """Compute metrics on ``evaluation``: each named one (unknown names raise, listing the valid ones;
    one whose reference is missing raises, saying how to give it), or with ``metrics=None`` every
    metric of :data:`DEFAULT_METRICS` that the evaluation's references allow.

    With the defaults, a metric that needs a reference the evaluation lacks (``references=`` for the
    oracle or original, ``reference_target_loss=`` for residual influence) is left out rather than
    failing the call: a user asking for "the metrics" gets every one that can be computed, and the
    result's ``skipped`` (also in one warning) says which were not and what they need.
    """
    if not isinstance(evaluation, Evaluation):
        raise ValueError(f"evaluation must be an unlearn_fast.Evaluation, got {type(evaluation).__name__}")
    names = DEFAULT_METRICS if metrics is None else as_list(metrics, "metrics", str)
    entries = [METRICS.get(name) for name in names]
    values, skipped = MetricValues(), {}
    for entry in entries:
        try:
            values[entry.name] = float(entry.fn(evaluation))
        except MissingReference as exc:
            if metrics is not None:
                raise
            skipped[entry.name] = str(exc)
    values.skipped = skipped
    if skipped:
        warnings.warn(f"compute_metrics left out {len(skipped)} default metric(s) that need a reference this evaluation "
                      f"lacks: {', '.join(skipped)} (see the result's .skipped for what each needs)", UserWarning, stacklevel=2)
    return values


__all__ = [
    "DEFAULT_METRICS", "DEFAULT_RI_MIN_GAP", "Evaluation", "METRICS", "MetricValues", "MissingReference", "SPLITS", "ShadowEvidence", "compute_metrics", "loss_threshold_auc",
    "residual_influence_per_target", "split_outputs",
]
