"""The basic metrics: accuracy per split, loss and confidence on the targets, the population
loss-threshold MIA and residual influence. A metric is ``fn(evaluation) -> float``; NaN means
undefined for this case. The registry (``METRICS``) is :mod:`.registry`; the families of metrics
(:mod:`.mia`, :mod:`.lira`, :mod:`.distance`, :mod:`.relearn`, :mod:`.reconstruction`) sit beside this module.
"""

from __future__ import annotations

import math

import torch

from .evaluation import Evaluation, MissingReference
from .registry import CLOSEST_TO_ORACLE, HIGHEST, METRICS
from .stats import loss_threshold_auc, mean_or_nan

# The forget splits should read as the oracle's; retain and test accuracy should stay high.
_ACCURACY_BEST = {"targets": CLOSEST_TO_ORACLE, "similar": CLOSEST_TO_ORACLE, "retain": HIGHEST, "test": HIGHEST}


def _register_accuracy(split: str) -> None:
    def accuracy(ev: Evaluation) -> float:
        return mean_or_nan(ev.outputs(split).correct)

    METRICS.register(f"{split.removesuffix('s')}_acc", meta={"default": True, "best": _ACCURACY_BEST[split]},
                     description=f"top-1 accuracy on the {split} split")(accuracy)


for _split in ("targets", "similar", "retain", "test"):
    _register_accuracy(_split)


_DEFAULT_FORGET_QUALITY = {"default": True, "best": CLOSEST_TO_ORACLE}


@METRICS.register("target_loss", meta=_DEFAULT_FORGET_QUALITY)
def target_loss(ev: Evaluation) -> float:
    """Mean per-sample loss on the forget targets."""
    return mean_or_nan(ev.outputs("targets").loss)


@METRICS.register("target_confidence", meta=_DEFAULT_FORGET_QUALITY)
def target_confidence(ev: Evaluation) -> float:
    """Mean softmax probability of the true label on the forget targets."""
    return mean_or_nan(ev.outputs("targets").confidence)


@METRICS.register("mia_auc", meta=_DEFAULT_FORGET_QUALITY)
def mia_auc(ev: Evaluation) -> float:
    """Population loss-threshold MIA: AUC of targets (members) against test samples (non-members)."""
    return loss_threshold_auc(ev.outputs("targets").loss, ev.outputs("test").loss)


def residual_influence_per_target(method_loss: torch.Tensor, original_loss: torch.Tensor, oracle_loss: torch.Tensor,
                                  min_gap: float) -> torch.Tensor:
    """RI_t = (ℓ_oracle − ℓ_method) / (ℓ_oracle − ℓ_original) per target [K]; NaN where the gap < min_gap.

    A target whose oracle and original losses nearly agree carries no measurable influence to
    remove: its ratio is noise over a tiny denominator, so it is marked NaN and left out.
    """
    gap = oracle_loss - original_loss
    ri = (oracle_loss - method_loss) / gap
    return torch.where(gap.abs() >= min_gap, ri, torch.full_like(ri, math.nan))


def _ri_values(ev: Evaluation) -> torch.Tensor:
    refs = ev.reference_losses()
    missing = [name for name in ("original", "oracle") if name not in refs]
    if missing:
        raise MissingReference(f"residual_influence needs reference target losses of {missing}; give "
                               "Evaluation(reference_target_loss=...)")
    return residual_influence_per_target(ev.outputs("targets").loss, refs["original"], refs["oracle"], ev.ri_min_gap)


@METRICS.register("residual_influence", meta=_DEFAULT_FORGET_QUALITY)
def residual_influence(ev: Evaluation) -> float:
    """Mean over targets of RI_t = (ℓ_oracle − ℓ_method)/(ℓ_oracle − ℓ_original).

    1: the target's influence on its own loss fully remains (as in ``original``); 0: the model
    behaves on the target like the oracle, which never saw it nor its near-duplicates. Targets
    with |ℓ_oracle − ℓ_original| < ``ev.ri_min_gap`` are excluded (see ``ri_targets_used``); with
    none left the value is NaN.
    """
    values = _ri_values(ev)
    return mean_or_nan(values[~torch.isnan(values)])


@METRICS.register("residual_influence_median", meta=_DEFAULT_FORGET_QUALITY)
def residual_influence_median(ev: Evaluation) -> float:
    """Median over the same targets as ``residual_influence``: robust to a few exploding ratios.

    Over-unlearning (a method pushing a target's loss far past the oracle's) gives large negative
    ratios that dominate the mean; the median shows where most targets stand.
    """
    values = _ri_values(ev)
    kept = values[~torch.isnan(values)]
    return float(kept.median()) if kept.numel() else math.nan


@METRICS.register("ri_targets_used", meta={"default": True})  # bookkeeping: never marked best
def ri_targets_used(ev: Evaluation) -> float:
    """How many targets passed the residual-influence denominator threshold."""
    return float((~torch.isnan(_ri_values(ev))).sum())
