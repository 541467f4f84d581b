"""Distance to the oracle: how far a model's outputs and weights are from the model retrained without
the targets and their near-duplicates. Each metric reads ``ev.references["oracle"]`` (and, for the
weight distance, ``"original"``), evaluated on the same dataset.

- ``kl_to_oracle_<split>``: mean over the split's samples of KL(p_oracle ‖ p_model), in nats: the
  oracle's predictive distribution is the reference, so this is the extra code length of describing
  the oracle's outputs with the model's. 0 when they agree; unbounded.
- ``js_to_oracle_<split>``: mean Jensen-Shannon divergence, ½KL(p‖m) + ½KL(q‖m) with m = (p+q)/2, in
  nats: symmetric and at most ln 2, so over-confident mismatches cannot dominate the mean.
- ``agreement_with_oracle_<split>``: the fraction of samples whose top-1 predictions agree.
- ``weight_distance_to_oracle``: ‖θ − θ_oracle‖ / ‖θ_original − θ_oracle‖ over all parameters: 1 for
  ``original``, 0 for the oracle itself. SGD's trajectory dominates it for retrained models (see
  benchmarks/RESULTS.md), so read it beside the output distances.

Splits: targets, similar (the planted near-duplicates) and test. NaN where a split is empty or the
outputs are not class probabilities.
"""

from __future__ import annotations

import math

import torch

from .evaluation import Evaluation
from .registry import CLOSEST_TO_ORACLE, METRICS

_EPS = 1e-12  # keeps log(0) finite: a probability under 1e-12 counts as 1e-12


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p_i ‖ q_i) per row of probability tables p, q [n, C] (float64) → [n]."""
    p, q = p.double(), q.double()
    return (p * (torch.log(p.clamp_min(_EPS)) - torch.log(q.clamp_min(_EPS)))).sum(1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p_i ‖ q_i) per row [n] for probability tables [n, C]."""
    return _kl_rows(p, q)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row [n] (nats, within [0, ln 2]) for probability tables [n, C]."""
    m = (p.double() + q.double()) / 2
    return (_kl_rows(p, m) + _kl_rows(q, m)) / 2


def _pair(ev: Evaluation, split: str, metric: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    mine = ev.outputs(split).probabilities
    theirs = ev.reference("oracle", metric).outputs(split).probabilities
    if mine.numel() == 0 or theirs.numel() == 0:
        return None
    return mine, theirs


def _register(split: str) -> None:
    def kl(ev: Evaluation, metric: str = f"kl_to_oracle_{split}") -> float:
        pair = _pair(ev, split, metric)
        return math.nan if pair is None else float(kl_divergence(pair[1], pair[0]).mean())

    def js(ev: Evaluation, metric: str = f"js_to_oracle_{split}") -> float:
        pair = _pair(ev, split, metric)
        return math.nan if pair is None else float(js_divergence(pair[1], pair[0]).mean())

    def agreement(ev: Evaluation, metric: str = f"agreement_with_oracle_{split}") -> float:
        pair = _pair(ev, split, metric)
        return math.nan if pair is None else float((pair[0].argmax(1) == pair[1].argmax(1)).double().mean())

    # Of these, the study's defaults are the KL on the targets and the JS on their near-duplicates.
    METRICS.register(f"kl_to_oracle_{split}", meta={"default": split == "targets", "best": CLOSEST_TO_ORACLE},
                     description=f"mean KL(p_oracle ‖ p_model) on the {split} split, nats")(kl)
    METRICS.register(f"js_to_oracle_{split}", meta={"default": split == "similar", "best": CLOSEST_TO_ORACLE},
                     description=f"mean Jensen-Shannon divergence to the oracle on the {split} split, nats")(js)
    METRICS.register(f"agreement_with_oracle_{split}", meta={"best": CLOSEST_TO_ORACLE},
                     description=f"top-1 agreement with the oracle on the {split} split")(agreement)


for _split in ("targets", "similar", "test"):
    _register(_split)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([torch.zeros(0, dtype=torch.float64)] + [p.detach().reshape(-1).double().cpu() for p in model.parameters()])


@METRICS.register("weight_distance_to_oracle", meta={"default": True, "best": CLOSEST_TO_ORACLE})
def weight_distance_to_oracle(ev: Evaluation) -> float:
    """‖θ − θ_oracle‖ / ‖θ_original − θ_oracle‖: 1 for original, 0 for the oracle (NaN if they coincide)."""
    refs = [ev.reference(name, "weight_distance_to_oracle") for name in ("oracle", "original")]
    oracle, original, mine = _flat(refs[0].model), _flat(refs[1].model), _flat(ev.model)
    if not (mine.shape == oracle.shape == original.shape):
        raise ValueError("weight_distance_to_oracle needs models of one architecture: parameter counts "
                         f"{mine.numel()} (model), {original.numel()} (original), {oracle.numel()} (oracle)")
    scale = float((original - oracle).norm())
    return math.nan if scale == 0 else float((mine - oracle).norm()) / scale
