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


def test_modified_entropy_hand_value():
    from unlearn_fast.evaluate.mia import modified_entropy

    p = torch.tensor([[0.7, 0.2, 0.1]])
    want = -(0.3 * math.log(0.7)) - (0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    assert modified_entropy(p, torch.tensor([0.7])).item() == pytest.approx(want)


def test_svc_attack_separates_simulated_members_and_not_identical_ones():
    """A known answer: features drawn from two well-separated distributions give AUC ≈ 1; from one
    distribution, AUC ≈ 0.5 (within sampling error for 200 + 200 scored samples)."""
    import numpy as np

    from unlearn_fast.evaluate.mia import svc_attack_auc

    rng = np.random.default_rng(1)
    members = rng.normal(1.0, 0.3, size=(400, 4))
    def nonmember(n):
        return rng.normal(-1.0, 0.3, size=(n, 4))
    assert svc_attack_auc(members, nonmember(200), rng.normal(1.0, 0.3, size=(200, 4)), nonmember(200)) > 0.99
    same = lambda n: rng.normal(0.0, 1.0, size=(n, 4))  # noqa: E731
    auc = svc_attack_auc(same(400), same(200), same(200), same(200))
    assert abs(auc - 0.5) < 0.1
    assert math.isnan(svc_attack_auc(same(400), same(1), same(5), same(5)))


def test_svc_mia_runs_end_to_end_and_repeats(trained_mlp, small_digits):
    """Plumbing on a trained model: an AUC in [0, 1], the same on a second evaluation (seeded split and subsample)."""
    from unlearn_fast.evaluate import Evaluation

    names = ["mia_svc_auc_targets", "mia_svc_auc_similar"]
    first = compute_metrics(Evaluation(trained_mlp, small_digits), names)
    assert all(0.0 <= v <= 1.0 for v in first.values()), first
    assert compute_metrics(Evaluation(trained_mlp, small_digits), names) == first
