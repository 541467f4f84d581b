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

from .evaluation import Evaluation, SplitOutputs
from .registry import CLOSEST_TO_ORACLE, METRICS
from .stats import threshold_auc


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
    METRICS.register(name, meta={"best": CLOSEST_TO_ORACLE},
                     description=f"{kind}-threshold MIA AUC, {split} vs test (0.5: indistinguishable)")(attack)


for _kind in ("loss", "confidence", "entropy"):
    for _split in ("targets", "similar"):
        _register(_kind, _split)


# ------------------------------------------------------------------------------------------------
# Learned attack: an SVC over four output features (the MIA used by SalUn, Fan et al. 2024, after
# Jia et al. 2023 and Song & Mittal 2021)

SVC_SEED = 0


def modified_entropy(probabilities: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Song & Mittal's (2021) modified entropy per sample: −(1−p_y) log p_y − Σ_{i≠y} p_i log(1−p_i),
    from the probability table [n, C] and the true-label probabilities p_y [n] → [n]."""
    p, p_y = probabilities.double(), confidence.double()
    tiny = 1e-300
    all_terms = (p * torch.log((1 - p).clamp_min(tiny))).sum(1)
    others = all_terms - p_y * torch.log((1 - p_y).clamp_min(tiny))
    return -(1 - p_y) * torch.log(p_y.clamp_min(tiny)) - others


def attack_features(outputs: SplitOutputs) -> np.ndarray:
    """[n, 4]: correctness, true-label confidence, entropy and modified entropy of each sample."""
    if outputs.probabilities.numel() == 0:
        raise ValueError("the SVC membership attack needs class outputs (logits [n, C] with integer labels)")
    columns = [outputs.correct.double(), outputs.confidence.double(), entropy(outputs.probabilities),
               modified_entropy(outputs.probabilities, outputs.confidence)]
    return torch.stack(columns, 1).numpy()


def svc_attack_auc(members: np.ndarray, nonmembers: np.ndarray, queries: np.ndarray, held_out: np.ndarray,
                   seed: int = SVC_SEED) -> float:
    """Fit an RBF SVC (C=3, gamma="auto", as in SalUn's code) on standardised features of known
    members [m, F] (label 1) against known non-members [n, F] (label 0), members subsampled to n so
    the classes balance; return the ROC AUC of its decision scores for ``queries`` [q, F] (treated
    as members) against ``held_out`` non-members [h, F], which the SVC never saw."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if min(len(members), len(nonmembers)) < 2 or len(queries) == 0 or len(held_out) == 0:
        return math.nan
    rng = np.random.default_rng(seed)
    if len(members) > len(nonmembers):
        members = members[rng.choice(len(members), size=len(nonmembers), replace=False)]
    x = np.concatenate([members, nonmembers])
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    scaler = StandardScaler().fit(x)
    svc = SVC(C=3, gamma="auto", kernel="rbf").fit(scaler.transform(x), y)
    scores = svc.decision_function(scaler.transform(np.concatenate([queries, held_out])))
    return threshold_auc(torch.as_tensor(scores[:len(queries)]), torch.as_tensor(scores[len(queries):]))


def _register_svc(split: str) -> None:
    name = f"mia_svc_auc_{split}"

    def attack(ev: Evaluation) -> float:
        test = attack_features(ev.outputs("test"))
        order = np.random.default_rng(SVC_SEED).permutation(len(test))
        half = len(test) // 2  # one half trains the attack, the other is the non-member side of the AUC
        return svc_attack_auc(attack_features(ev.outputs("retain")), test[order[:half]],
                              attack_features(ev.outputs(split)), test[order[half:]])

    attack.__doc__ = (f"SVC membership attack (SalUn's): trained on retain (members) vs half of test, then the ROC AUC "
                      f"of the {split} split against the other half of test.")
    # Fitting an SVC per model is too slow for --quick (1.9 s of a 36 s default study).
    METRICS.register(name, meta={"default": split == "targets", "quick": False, "best": CLOSEST_TO_ORACLE},
                     description=f"SVC MIA AUC over 4 output features, {split} vs held-out test")(attack)


for _split in ("targets", "similar"):
    _register_svc(_split)
