"""Distance-to-oracle metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from test_metrics import FixedLogits, _toy_dataset
from unlearn_fast.evaluate import Evaluation, compute_metrics
from unlearn_fast.evaluate.distance import js_divergence, kl_divergence


def test_kl_and_js_hand_values():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q).tolist() == pytest.approx([kl, 0.0])
    m = torch.tensor([0.375, 0.625])
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert js_divergence(p, q)[0].item() == pytest.approx(js)
    assert js_divergence(p, q)[0].item() == pytest.approx(js_divergence(q, p)[0].item())  # symmetric
    disjoint = js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert disjoint.item() == pytest.approx(math.log(2), rel=1e-9)  # the bound


def _evaluation(table: torch.Tensor, ds, **kwargs) -> Evaluation:
    return Evaluation(FixedLogits(table), ds, **kwargs)


def test_distance_metrics_against_the_oracle():
    ds, target = _toy_dataset()
    oracle_table = torch.zeros(8, 2)
    oracle_table[:, 0] = 2.0   # the oracle predicts class 0 everywhere, p = (e²/(e²+1), 1/(e²+1))
    model_table = oracle_table.clone()
    model_table[target] = torch.tensor([0.0, 2.0])  # the model disagrees on the target only
    oracle = _evaluation(oracle_table, ds)
    ev = _evaluation(model_table, ds, references={"oracle": oracle})
    out = compute_metrics(ev, ["kl_to_oracle_targets", "js_to_oracle_targets", "agreement_with_oracle_targets",
                               "kl_to_oracle_test", "agreement_with_oracle_test", "agreement_with_oracle_similar"])
    a = math.exp(2) / (math.exp(2) + 1)
    assert out["kl_to_oracle_targets"] == pytest.approx(a * math.log(a / (1 - a)) + (1 - a) * math.log((1 - a) / a))
    assert 0 < out["js_to_oracle_targets"] < math.log(2)
    assert out["agreement_with_oracle_targets"] == 0.0
    assert out["kl_to_oracle_test"] == pytest.approx(0.0, abs=1e-12) and out["agreement_with_oracle_test"] == 1.0
    assert out["agreement_with_oracle_similar"] == 1.0


class Affine(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((2, 2), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2] @ self.weight


def test_weight_distance_is_one_for_original_and_zero_for_the_oracle():
    ds, _ = _toy_dataset()
    original, oracle, halfway = (Evaluation(Affine(v), ds) for v in (1.0, 3.0, 2.0))
    refs = {"original": original, "oracle": oracle}
    for ev, want in ((original, 1.0), (oracle, 0.0), (halfway, 0.5)):
        ev.references = refs
        assert compute_metrics(ev, ["weight_distance_to_oracle"])["weight_distance_to_oracle"] == pytest.approx(want)


def test_missing_reference_is_named():
    ds, _ = _toy_dataset()
    ev = _evaluation(torch.zeros(8, 2), ds)
    with pytest.raises(ValueError, match=r"kl_to_oracle_targets needs the 'oracle' reference.*given: none"):
        compute_metrics(ev, ["kl_to_oracle_targets"])
    ev.references = {"oracle": ev}
    with pytest.raises(ValueError, match="needs the 'original' reference"):
        compute_metrics(ev, ["weight_distance_to_oracle"])

