"""Metric unit tests on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import unlearn_fast as uf
from unlearn_fast.data import make_blockmask_dataset
from unlearn_fast.evaluate import Evaluation, compute_metrics, loss_threshold_auc, residual_influence_per_target


def test_loss_threshold_auc_hand_cases():
    # Members all below non-members → 1; reversed → 0; one tie among 2×2 pairs → (3 + 0.5)/4.
    assert loss_threshold_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])) == 1.0
    assert loss_threshold_auc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert loss_threshold_auc(torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.9])) == pytest.approx(3.5 / 4)
    assert math.isnan(loss_threshold_auc(torch.tensor([]), torch.tensor([0.5])))


def test_residual_influence_per_target_hand_case():
    original = torch.tensor([0.0, 0.1, 0.50, 1.0])
    oracle = torch.tensor([1.0, 0.11, 0.50, 3.0])
    method = torch.tensor([0.25, 0.0, 0.2, 3.0])
    ri = residual_influence_per_target(method, original, oracle, min_gap=0.02)
    assert ri[0].item() == pytest.approx(0.75)
    assert math.isnan(ri[1]) and math.isnan(ri[2])  # gaps 0.01 and 0 are below 0.02
    assert ri[3].item() == pytest.approx(0.0)


class FixedLogits(nn.Module):
    """Logits looked up by the first pixel of the input, which the test sets to the sample's row."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def _toy_dataset():
    # 4 base train images, 1 target (id 0) with 2 copies (ids 4, 5); 2 test images.
    train_x = torch.ones(4, 1, 2, 2)
    ds = make_blockmask_dataset("toy", train_x, torch.tensor([0, 1, 0, 1]), torch.ones(2, 1, 2, 2), torch.tensor([0, 1]),
                                targets=1, copies=2, block=1, fraction=0.25, seed=0, num_classes=2)
    target = ds.forget_ids[0]
    x = ds.train.tensors[0]
    for row in range(len(x)):  # first pixel = row id (the copies may have it masked; set it back)
        x[row, 0, 0, 0] = row
    ds.test.tensors[0][:, 0, 0, 0] = torch.tensor([6.0, 7.0])
    return ds, target


def test_accuracy_confidence_and_loss_on_fixed_logits():
    ds, target = _toy_dataset()
    labels = torch.cat([ds.train.tensors[1], ds.test.tensors[1]])
    table = torch.zeros(8, 2)
    correct = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)  # per row: logit 2 on label or on the other class
    for row in range(8):
        cls = labels[row] if correct[row] else 1 - labels[row]
        table[row, cls] = 2.0
    ev = Evaluation(FixedLogits(table), ds, reference_target_loss={"original": torch.tensor([0.0]), "oracle": torch.tensor([1.0])})
    out = compute_metrics(ev, ["target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence"])
    p_right = math.exp(2) / (math.exp(2) + 1)
    retain = [i for i in range(4) if i != target]
    assert out["target_acc"] == float(correct[target])
    assert out["similar_acc"] == pytest.approx(correct[[4, 5]].float().mean().item())
    assert out["retain_acc"] == pytest.approx(correct[retain].float().mean().item())
    assert out["test_acc"] == pytest.approx(0.5)
    expected_conf = p_right if correct[target] else 1 - p_right
    assert out["target_confidence"] == pytest.approx(expected_conf)
    assert out["target_loss"] == pytest.approx(-math.log(expected_conf))


def test_residual_influence_metric_and_count():
    ds, target = _toy_dataset()
    table = torch.zeros(8, 2)
    ev = Evaluation(FixedLogits(table), ds, reference_target_loss={"original": torch.tensor([0.0]), "oracle": torch.tensor([2 * math.log(2)])})
    # Uniform logits: loss log 2, halfway between original (0) and oracle (2 log 2) → RI = 0.5.
    out = compute_metrics(ev, ["residual_influence", "ri_targets_used", "mia_auc"])
    assert out["residual_influence"] == pytest.approx(0.5)
    assert out["ri_targets_used"] == 1.0
    assert out["mia_auc"] == pytest.approx(0.5)  # all losses tie
    ev_tiny = Evaluation(FixedLogits(table), ds, ri_min_gap=10.0, reference_target_loss=ev.reference_target_loss)
    assert math.isnan(compute_metrics(ev_tiny, ["residual_influence"])["residual_influence"])


def test_metric_registry_errors(small_digits, trained_mlp):
    ev = Evaluation(trained_mlp, small_digits)
    with pytest.raises(ValueError, match="unknown metric 'f1'; valid metrics: target_acc"):
        compute_metrics(ev, ["f1"])
    with pytest.raises(ValueError, match=r"reference target losses of \['original', 'oracle'\]"):
        compute_metrics(ev, ["residual_influence"])
    with pytest.raises(ValueError, match="valid splits"):
        ev.outputs("validation")


def test_each_split_runs_the_model_once(small_digits, trained_mlp):
    calls = []
    handle = trained_mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        compute_metrics(Evaluation(trained_mlp, small_digits), ["target_acc", "target_loss", "target_confidence"])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_registry_names_are_complete():
    assert {"target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence",
            "mia_auc", "residual_influence"} <= set(uf.METRICS.names())


def test_evaluation_defaults_follow_the_model(small_digits, trained_mlp):
    ev = Evaluation(trained_mlp, small_digits)
    assert ev.device == next(trained_mlp.parameters()).device and ev.loss == "cross_entropy"
    with pytest.raises(ValueError, match="dataset must be a SimilarDataset"):
        Evaluation(trained_mlp, small_digits.train)
    with pytest.raises(ValueError, match="metrics holds values of the wrong type"):
        compute_metrics(ev, [3])
    assert set(compute_metrics(ev, "target_acc")) == {"target_acc"}  # one name, not its characters


def test_regression_targets_give_nan_accuracy():
    from unlearn_fast.evaluate import split_outputs

    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = split_outputs(nn.Flatten(), "mse", x, x.flatten(1) + 1.0, torch.device("cpu"))
    assert torch.allclose(out.loss, torch.full((3,), 4.0))  # 4 outputs, each off by 1, summed
    assert torch.isnan(out.correct).all() and torch.isnan(out.confidence).all()


def test_residual_influence_median_resists_one_exploding_ratio():
    ds, _ = _toy_dataset()
    ev = Evaluation(FixedLogits(torch.zeros(8, 2)), ds,
                    reference_target_loss={"original": torch.tensor([0.0]), "oracle": torch.tensor([2 * math.log(2)])})
    out = compute_metrics(ev, ["residual_influence", "residual_influence_median"])
    assert out["residual_influence_median"] == pytest.approx(out["residual_influence"]) == pytest.approx(0.5)


def test_default_metrics_skip_what_a_missing_reference_prevents(small_digits, trained_mlp):
    from unlearn_fast.evaluate import DEFAULT_METRICS, MissingReference

    other = uf.unlearn(trained_mlp, small_digits.forget_ids, "finetune", epochs=1, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="left out .* default metric"):
        alone = compute_metrics(Evaluation(other, small_digits, device="cpu"))
    assert {"residual_influence", "kl_to_oracle_targets", "relearn_steps"} <= set(alone.skipped)
    assert "'oracle' reference" in alone.skipped["kl_to_oracle_targets"]
    assert set(alone) | set(alone.skipped) == set(DEFAULT_METRICS) and not set(alone) & set(alone.skipped)
    with pytest.raises(MissingReference, match="needs the 'oracle' reference"):
        compute_metrics(Evaluation(other, small_digits, device="cpu"), ["kl_to_oracle_targets"])

    # The reference evaluations alone give residual influence: their target losses are taken from them.
    refs = {"original": Evaluation(trained_mlp, small_digits, device="cpu"), "oracle": Evaluation(other, small_digits, device="cpu")}
    losses = {name: ev.outputs("targets").loss for name, ev in refs.items()}
    names = ["residual_influence", "residual_influence_median", "ri_targets_used"]
    by_references = compute_metrics(Evaluation(trained_mlp, small_digits, device="cpu", references=refs), names)
    by_losses = compute_metrics(Evaluation(trained_mlp, small_digits, device="cpu", reference_target_loss=losses), names)
    assert by_references == by_losses and by_references["residual_influence"] == pytest.approx(1.0)
