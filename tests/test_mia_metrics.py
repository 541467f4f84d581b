"""Population membership-inference metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from test_distance_metrics import _evaluation
from test_metrics import _toy_dataset
from unlearn_fast.evaluate import compute_metrics



def test_population_mias_hand_cases():
    from unlearn_fast.evaluate.mia import entropy, threshold_auc

    assert threshold_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert threshold_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == pytest.approx(3.5 / 4)
    assert math.isnan(threshold_auc(torch.tensor([]), torch.tensor([1.0])))
    assert math.isnan(threshold_auc(torch.tensor([float("nan")]), torch.tensor([1.0])))
    assert entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([math.log(2), 0.0])


def test_population_mias_on_fixed_logits():
    ds, target = _toy_dataset()
    labels = torch.cat([ds.train.tensors[1], ds.test.tensors[1]])
    table = torch.zeros(8, 2)
    for row in range(8):  # train rows confident and right, test rows (6, 7) unsure
        table[row, labels[row]] = 4.0 if row < 6 else 0.5
    names = [f"mia_{k}_auc_{s}" for k in ("loss", "confidence", "entropy") for s in ("targets", "similar")]
    out = compute_metrics(_evaluation(table, ds), names + ["mia_auc"])
    assert all(out[n] == 1.0 for n in names), out  # every member scores above every non-member
    assert out["mia_auc"] == out["mia_loss_auc_targets"]
    table[target] = torch.tensor([0.0, 0.0])  # the target now less sure than the test rows (p = 0.5 vs 0.62)
    out = compute_metrics(_evaluation(table, ds), ["mia_confidence_auc_targets", "mia_entropy_auc_targets"])
    assert out["mia_confidence_auc_targets"] == 0.0 and out["mia_entropy_auc_targets"] == 0.0
