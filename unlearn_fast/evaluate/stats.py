"""Statistics that metrics of several families share: a mean that is NaN on an empty split, and the
ROC AUC of a threshold attack. They read tensors only, so every metric module can import them."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def mean_or_nan(values: torch.Tensor) -> float:
    """Mean of ``values`` [n] as a float; NaN when n = 0 (a metric undefined for an empty split)."""
    return float(values.mean()) if values.numel() else math.nan


def threshold_auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """ROC AUC of "higher score ⇒ member" over member [m] and non-member [n] scores, ties counted as half.

    NaN when either side is empty or a score is not finite.
    """
    scores = torch.cat([member_scores, nonmember_scores]).double()
    if member_scores.numel() == 0 or nonmember_scores.numel() == 0 or not torch.isfinite(scores).all():
        return math.nan
    truth = np.r_[np.ones(member_scores.numel()), np.zeros(nonmember_scores.numel())]
    return float(roc_auc_score(truth, scores.numpy()))


def loss_threshold_auc(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """ROC AUC of the attack "lower loss ⇒ member" (Yeom et al. 2018), ties counted as half.

    0.5: members and non-members are indistinguishable; 1: every member has a lower loss than
    every non-member.
    """
    return threshold_auc(-member_loss, -nonmember_loss)
