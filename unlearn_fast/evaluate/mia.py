"""Population membership-inference attacks: threshold attacks on one per-sample score, reported as ROC AUC.

Members are the forget targets (or their planted near-duplicates), non-members the held-out test
samples, both scored by the model under test. An AUC of 0.5 means the attack cannot tell them apart,
which is what a model that never trained on them gives (compare the oracle's row, which is the
right reference: digits' targets resemble test samples, so even the oracle need not sit at 0.5).

Scores, each "higher ⇒ member":
- loss: −ℓ (Yeom et al. 2018);
- confidence: the softmax probability of the true label (Salem et al. 2019);
- entropy: −H(p) of the predictive distribution (Salem et al. 2019; Song & Mittal 2021 use it
  among their metric-based attacks).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .evaluation import Evaluation, SplitOutputs
from .metrics import METRICS


def threshold_auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """ROC AUC of "higher score ⇒ member" over member [m] and non-member [n] scores, ties counted as half.

    NaN when either side is empty or a score is not finite.
    """
    scores = torch.cat([member_scores, nonmember_scores]).double()
    if member_scores.numel() == 0 or nonmember_scores.numel() == 0 or not torch.isfinite(scores).all():
        return math.nan
    truth = np.r_[np.ones(member_scores.numel()), np.zeros(nonmember_scores.numel())]
    return float(roc_auc_score(truth, scores.numpy()))


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats per row of a probability table [n, C] → [n] (0·log 0 = 0)."""
    p = probabilities.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(1)


def _score(outputs: SplitOutputs, kind: str) -> torch.Tensor:
    if kind == "loss":
        return -outputs.loss
    if kind == "confidence":
        return outputs.confidence
    if outputs.probabilities.numel() == 0:  # not class outputs: no entropy
        return torch.full_like(outputs.loss, math.nan)
    return -entropy(outputs.probabilities)


def _register(kind: str, split: str) -> None:
    name = f"mia_{kind}_auc_{split}"

    def attack(ev: Evaluation) -> float:
        return threshold_auc(_score(ev.outputs(split), kind), _score(ev.outputs("test"), kind))

    attack.__doc__ = f"Population MIA, score {kind}: ROC AUC of the {split} split (members) against test samples."
    METRICS.register(name, description=f"{kind}-threshold MIA AUC, {split} vs test (0.5: indistinguishable)")(attack)


for _kind in ("loss", "confidence", "entropy"):
    for _split in ("targets", "similar"):
        _register(_kind, _split)
