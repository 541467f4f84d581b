"""Issue 17, defects 3, 7 and 9: no NaN model leaves a method or reaches the metrics silently, and
the unclear errors of the issue become ones that name the bad value and what is valid."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import unlearn_fast as uf
from helpers import same_params
from unlearn_fast.evaluate import Evaluation, compute_metrics
from unlearn_fast.similarity.index import SimilarityIndex
from unlearn_fast.similarity import minhash
from unlearn_fast.similarity.minhash import lsh_params, minhash_signatures, near_duplicate_pairs


def _poisoned(model: nn.Module, name: str = "3.bias") -> nn.Module:
    """A copy of ``model`` (context included) with one NaN entry in parameter ``name``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        dict(out.named_parameters())[name].view(-1)[0] = float("nan")
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    # equal_nan: a NaN input must come back bit-identical too, NaN included.
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k].isnan(), state[k].isnan()) and
                                              torch.equal(now[k].nan_to_num(), state[k].nan_to_num()) for k in now)


# -- defect 3: non-finite models ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["gradient_ascent", "finetune"])
def test_a_diverging_method_raises_naming_itself_and_the_parameter(trained_mlp, small_digits, method):
    before = _state(trained_mlp)
    with pytest.raises(FloatingPointError, match=rf"method {method!r} produced non-finite parameters: '[\w.]+' has "):
        uf.unlearn(trained_mlp, small_digits.forget_ids, method, lr=1e6, device="cpu", progress=False)
    assert _same_state(trained_mlp, before)


@pytest.mark.parametrize("method", uf.METHODS.names())
def test_every_method_refuses_a_non_finite_input_model(trained_mlp, small_digits, method):
    bad = _poisoned(trained_mlp)
    before = _state(bad)
    # ssd and fisher_forgetting used to say "overflow"; finetune/gradient_ascent returned a model ~90 % NaN.
    with pytest.raises(ValueError, match=r"the input model's parameter '3\.bias' has 1 non-finite entry \(NaN or inf\) of 10"):
        uf.unlearn(bad, small_digits.forget_ids, method, device="cpu", progress=False)
    assert _same_state(bad, before)


def test_influence_unlearn_refuses_a_non_finite_input_model(trained_mlp, small_digits):
    bad = _poisoned(trained_mlp, "1.weight")
    with pytest.raises(ValueError, match=r"parameter '1\.weight' has 1 non-finite entry"):
        uf.influence_unlearn(bad, small_digits.forget_ids, device="cpu", progress=False)


def test_a_non_finite_influence_result_never_leaves(trained_mlp, small_digits, monkeypatch):
    """The trust region accepts only finite steps; should that ever fail, the result is refused anyway."""
    import unlearn_fast.methods.influence as influence_module

    real = influence_module.newton_unlearn

    def corrupting(model, *args, **kwargs):
        report = real(model, *args, **kwargs)
        with torch.no_grad():
            model[3].weight.view(-1)[5] = float("inf")
        return report

    monkeypatch.setattr(influence_module, "newton_unlearn", corrupting)
    before = _state(trained_mlp)
    with pytest.raises(FloatingPointError, match=r"method 'influence' produced non-finite parameters: '3\.weight'"):
        uf.unlearn(trained_mlp, small_digits.forget_ids, "influence", device="cpu", progress=False)
    assert _same_state(trained_mlp, before)
    with pytest.raises(FloatingPointError, match=r"influence_unlearn produced non-finite parameters: '3\.weight'"):
        uf.influence_unlearn(copy.deepcopy(trained_mlp), small_digits.forget_ids, device="cpu", progress=False)


def test_metrics_refuse_a_non_finite_model(trained_mlp, small_digits):
    with pytest.raises(ValueError, match=r"the model's parameter '3\.bias' has 1 non-finite entry .*metrics of it"):
        compute_metrics(Evaluation(_poisoned(trained_mlp), small_digits), ["mia_auc"])


def test_metrics_refuse_non_finite_outputs_naming_the_split(small_digits):
    # Finite parameters, broken BatchNorm statistics (a buffer): once reported as mia_auc=nan.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)).eval()
    model[2].running_var.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite model outputs on the 'targets' split \(sample 0"):
        compute_metrics(Evaluation(model, small_digits), ["mia_auc"])


# -- defect 7: unclear errors -------------------------------------------------------------------

def _three_class_model(small_digits) -> nn.Module:
    torch.manual_seed(0)
    return uf.build_model("mlp", small_digits.input_shape, 3, hidden=(8,))


def test_train_refuses_a_model_with_too_few_classes(small_digits):
    # Was: IndexError: Target 7 is out of bounds.
    with pytest.raises(ValueError, match=r"the model outputs 3 class scores, but the training data has labels up to 9 "
                                         r"\(10 classes\)"):
        uf.train(_three_class_model(small_digits), small_digits, epochs=1, device="cpu", progress=False)


def test_evaluation_refuses_a_model_with_too_few_classes(small_digits):
    # Checked on the outputs the metrics compute anyway: each split still runs the model once.
    with pytest.raises(ValueError, match=r"the model outputs 3 class scores, but the 'test' split has labels up to 9"):
        compute_metrics(Evaluation(_three_class_model(small_digits), small_digits), ["test_acc"])


def test_unlearn_refuses_a_model_with_too_few_classes(small_digits):
    model = uf.attach(_three_class_model(small_digits), small_digits, weight_decay=5e-4,
                      recipe={"epochs": 1, "lr": 0.1, "batch_size": 64})
    with pytest.raises(ValueError, match=r"the model outputs 3 class scores, but the training data has labels up to 9"):
        uf.unlearn(model, small_digits.forget_ids, "finetune", device="cpu", progress=False)


def test_reference_losses_of_the_wrong_length(trained_mlp, small_digits):
    wrong = {"original": torch.zeros(3), "oracle": torch.ones(3)}
    # Was: RuntimeError: The size of tensor a (3) must match the size of tensor b (6).
    message = r"reference_target_loss\['original'\] has 3 values, but the dataset has 6 targets"
    with pytest.raises(ValueError, match=message):
        Evaluation(trained_mlp, small_digits, reference_target_loss=wrong)
    ev = Evaluation(trained_mlp, small_digits)
    ev.reference_target_loss = wrong  # as the study sets them, after construction
    with pytest.raises(ValueError, match=message):
        compute_metrics(ev, ["residual_influence"])
    with pytest.raises(ValueError, match=r"reference_target_loss\['oracle'\] has non-finite values"):
        Evaluation(trained_mlp, small_digits, reference_target_loss={"original": torch.zeros(6), "oracle": torch.full((6,), np.nan)})


def test_retrain_without_every_sample_says_so(trained_mlp, small_digits):
    n = len(small_digits.train)
    # Was: ValueError: cannot train on an empty set of samples.
    with pytest.raises(ValueError, match=rf"retrain: forgetting all {n} training samples leaves nothing to retrain on"):
        uf.unlearn(trained_mlp, list(range(n)), "retrain", device="cpu", progress=False)
    with pytest.raises(ValueError, match=rf"oracle: forgetting all {n} training samples leaves nothing to retrain on"):
        uf.unlearn(trained_mlp, list(range(n)), "oracle", device="cpu", progress=False)


# -- defect 9: minor ----------------------------------------------------------------------------

def test_num_perm_is_bounded_by_memory():
    MAX_NUM_PERM = minhash.MAX_NUM_PERM
    texts = ["a b c d e f", "a b c d e g"]
    with pytest.raises(ValueError, match=rf"num_perm=1000000000 exceeds the maximum {MAX_NUM_PERM}: .*"
                                         r"2 texts × 1000000000 × 8 bytes = 16\.0 GB"):
        minhash_signatures(texts, num_perm=10**9)
    with pytest.raises(ValueError, match=rf"num_perm=1000000000 exceeds the maximum {MAX_NUM_PERM}"):
        lsh_params(0.8, 10**9)
    with pytest.raises(ValueError, match=rf"num_perm=1000000000 exceeds the maximum {MAX_NUM_PERM}"):
        near_duplicate_pairs(texts, num_perm=10**9)
    assert minhash_signatures(texts, num_perm=MAX_NUM_PERM).shape == (2, MAX_NUM_PERM)


@pytest.mark.parametrize("vectors", [torch.randn(10, 4, dtype=torch.complex64),
                                     np.ones((10, 4), dtype=np.complex128)], ids=["torch", "numpy"])
def test_similarity_index_refuses_complex_vectors(vectors):
    with pytest.raises(ValueError, match=r"vectors must be real, got complex dtype (torch\.)?complex(64|128)"):
        SimilarityIndex(vectors)
    index = SimilarityIndex(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"vectors must be real"):
        index.add(vectors)
    with pytest.raises(ValueError, match=r"queries must be real"):
        index.knn(vectors, 2)


@pytest.mark.parametrize("gap", [-1, -1e-9, float("nan"), float("inf"), "0.1"])
def test_ri_min_gap_must_be_finite_and_non_negative(trained_mlp, small_digits, gap):
    with pytest.raises(ValueError, match=r"ri_min_gap=.* must be a finite number in \[0\.0, inf\]"):
        Evaluation(trained_mlp, small_digits, ri_min_gap=gap)
