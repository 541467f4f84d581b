"""The method registry and the reference methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unlearn_fast as uf
from helpers import same_params
from unlearn_fast.context import get_context
from unlearn_fast.train import fit, make_recipe



def test_registry_lists_methods_with_defaults():
    assert {"retrain", "oracle", "finetune", "gradient_ascent"} <= set(uf.METHODS.names())
    for entry in uf.METHODS:
        assert entry.description, entry.name
    assert uf.METHODS.get("finetune").defaults == {"epochs": 5, "lr": 0.02, "batch_size": None}


def test_unknown_method_and_option(trained_mlp, small_digits):
    with pytest.raises(ValueError, match="unknown method 'forget_all'; valid methods: ") as info:
        uf.unlearn(trained_mlp, small_digits.forget_ids, "forget_all")
    assert all(name in str(info.value) for name in uf.METHODS.names())
    with pytest.raises(ValueError, match="valid options: batch_size, epochs, lr"):
        uf.unlearn(trained_mlp, small_digits.forget_ids, "finetune", momentum=0.5)


def test_retrain_equals_training_without_the_ids(trained_mlp, small_digits):
    ids = small_digits.forget_ids
    retrained = uf.unlearn(trained_mlp, ids, "retrain", device="cpu", progress=False)
    ctx = get_context(trained_mlp)
    reference = uf.build_model("mlp", small_digits.input_shape, 10, hidden=(32,))
    reference.load_state_dict(ctx.initial_state)
    x, y = small_digits.train.tensors
    keep = torch.as_tensor([i for i in range(len(x)) if i not in set(ids)])
    fit(reference, x[keep], y[keep], ctx.recipe, "cross_entropy", device="cpu", progress=False)
    assert same_params(retrained, reference)
    assert get_context(retrained).removed_ids == tuple(sorted(ids))


def test_oracle_also_removes_near_duplicates(trained_mlp, small_digits):
    oracle = uf.unlearn(trained_mlp, small_digits.forget_ids, "oracle", device="cpu", progress=False)
    assert set(get_context(oracle).removed_ids) == set(small_digits.forget_ids) | set(small_digits.similar_ids())


def test_without_near_duplicates_retrain_is_the_oracle():
    ds = uf.load_dataset("digits-blockmask", targets=4, copies=0, seed=1)
    torch.manual_seed(1)
    model = uf.train(uf.build_model("mlp", ds.input_shape, 10, hidden=(16,)), ds, epochs=1, seed=1, device="cpu", progress=False)
    a = uf.unlearn(model, ds.forget_ids, "retrain", progress=False)
    b = uf.unlearn(model, ds.forget_ids, "oracle", progress=False)
    assert same_params(a, b)


@pytest.mark.parametrize("method", ["finetune", "gradient_ascent", "retrain"])
def test_unlearn_leaves_the_input_model_alone(trained_mlp, small_digits, method):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    out = uf.unlearn(trained_mlp, small_digits.forget_ids[:2], method, progress=False)
    assert out is not trained_mlp and not same_params(out, trained_mlp)
    assert all(torch.equal(before[k], v) for k, v in trained_mlp.state_dict().items())
    assert get_context(trained_mlp).removed_ids == ()


def test_gradient_ascent_raises_target_loss(trained_mlp, small_digits):
    ids = small_digits.forget_ids
    x, y = small_digits.train.tensors
    loss = lambda m: torch.nn.functional.cross_entropy(m(x[ids]), y[ids]).item()  # noqa: E731
    out = uf.unlearn(trained_mlp, ids, "gradient_ascent", progress=False)
    assert loss(out) > loss(trained_mlp)


def test_requests_compose(trained_mlp, small_digits):
    first = uf.unlearn(trained_mlp, [0, 1], "finetune", epochs=1, progress=False)
    second = uf.unlearn(first, [2], "retrain", progress=False)
    assert get_context(second).removed_ids == (0, 1, 2)
    with pytest.raises(ValueError, match=r"\[1\] were already unlearned"):
        uf.unlearn(second, [1], "retrain", progress=False)


@pytest.mark.parametrize("ids, message", [
    ([], "forget_ids is empty"),
    ([0, 0, 3], r"duplicated ids: \[0\]"),
    ([-1, 5], r"outside \[0, "),
    ([10**6], r"outside \[0, "),
    ([1.5, 2], "must hold ints"),
    ([True], "must hold ints"),
    ("0,1", "must be a sequence of int sample ids"),
    (np.array([0.0, 1.0]), "must hold integers, got dtype float64"),
    (torch.tensor([[0, 1]]), "must be 1-D"),
])
def test_bad_forget_ids(trained_mlp, ids, message):
    with pytest.raises(ValueError, match=message):
        uf.unlearn(trained_mlp, ids, "retrain", progress=False)


def test_array_ids_accepted(trained_mlp):
    out = uf.unlearn(trained_mlp, np.array([3, 4]), "finetune", epochs=1, progress=False)
    assert get_context(out).removed_ids == (3, 4)
    out = uf.unlearn(trained_mlp, torch.tensor([5]), "finetune", epochs=1, progress=False)
    assert get_context(out).removed_ids == (5,)


def test_attached_model_needs_a_recipe_to_retrain(small_digits):
    model = uf.attach(uf.build_model("mlp", (1, 8, 8), 10, hidden=(8,)), small_digits, weight_decay=0.0)
    with pytest.raises(ValueError, match="pass them as method options"):
        uf.unlearn(model, [0], "retrain", progress=False)
    out = uf.unlearn(model, [0], "retrain", epochs=1, lr=0.1, batch_size=64, progress=False)
    assert get_context(out).removed_ids == (0,)


def test_oracle_needs_ground_truth(small_digits):
    model = uf.attach(uf.build_model("mlp", (1, 8, 8), 10, hidden=(8,)), small_digits.train, recipe=make_recipe(epochs=1, lr=0.1, batch_size=64, weight_decay=0.0))
    with pytest.raises(ValueError, match="oracle needs near-duplicate ground truth"):
        uf.unlearn(model, [0], "oracle", progress=False)


def test_data_keyword_supplies_a_context(small_digits):
    model = uf.build_model("mlp", (1, 8, 8), 10, hidden=(8,))
    with pytest.raises(ValueError, match="pass them as method options"):
        uf.unlearn(model, [0], "gradient_ascent", data=small_digits, progress=False)
    out = uf.unlearn(model, [0], "gradient_ascent", data=small_digits, batch_size=8, progress=False)
    assert get_context(out).removed_ids == (0,) and not hasattr(model, "unlearn_fast_context")


def test_retrain_of_an_attached_zoo_model_redraws_its_init(small_digits):
    recipe = make_recipe(epochs=1, lr=0.1, batch_size=64, weight_decay=0.0, seed=3)
    model = uf.attach(uf.build_model("mlp", (1, 8, 8), 10, hidden=(8,)), small_digits, recipe=recipe)
    rng_before = torch.get_rng_state()
    a = uf.unlearn(model, [0], "retrain", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    b = uf.unlearn(model, [0], "retrain", progress=False)
    assert same_params(a, b)


def test_retrain_of_a_custom_model_needs_its_initial_weights(small_digits):
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(64, 10))

        def forward(self, x):
            return x.flatten(1) @ self.weight

    recipe = make_recipe(epochs=1, lr=0.1, batch_size=64, weight_decay=0.0)
    model = uf.attach(Custom(), small_digits, recipe=recipe)
    with pytest.raises(ValueError, match="retraining needs the model's initial weights"):
        uf.unlearn(model, [0], "retrain", progress=False)
    start = {"weight": torch.full((64, 10), 0.5)}
    model = uf.attach(Custom(), small_digits, recipe=recipe, initial_state=start)
    with torch.no_grad():
        model.weight.fill_(7.0)  # "trained" weights must not leak into the retrain
    a = uf.unlearn(model, [0], "retrain", progress=False)
    b = uf.unlearn(uf.attach(Custom(), small_digits, recipe=recipe, initial_state=start), [0], "retrain", progress=False)
    assert same_params(a, b)


def test_data_override_replaces_the_ground_truth(trained_mlp, small_digits):
    from dataclasses import replace

    no_duplicates = replace(small_digits, similar={t: [] for t in small_digits.forget_ids})
    out = uf.unlearn(trained_mlp, small_digits.forget_ids, "oracle", data=no_duplicates, progress=False)
    assert set(get_context(out).removed_ids) == set(small_digits.forget_ids)


def test_oracle_after_an_earlier_request_drops_its_near_duplicates_too(trained_mlp, small_digits):
    first, rest = small_digits.forget_ids[:2], small_digits.forget_ids[2:]
    step1 = uf.unlearn(trained_mlp, first, "retrain", progress=False)
    step2 = uf.unlearn(step1, rest, "oracle", progress=False)
    assert set(get_context(step2).removed_ids) == set(small_digits.forget_ids) | set(small_digits.similar_ids())


@pytest.mark.parametrize("method", ["random_label", "graddiff", "bad_teacher"])
def test_none_options_take_the_recorded_training_values(trained_mlp, small_digits, method):
    """One rule for every method: lr/epochs/batch_size None mean the recipe recorded at training."""
    recipe = get_context(trained_mlp).recipe
    ids = small_digits.forget_ids
    implicit = uf.unlearn(trained_mlp, ids, method, lr=None, epochs=1, batch_size=None, device="cpu", progress=False)
    explicit = uf.unlearn(trained_mlp, ids, method, lr=recipe["lr"], epochs=1, batch_size=recipe["batch_size"],
                          device="cpu", progress=False)
    assert same_params(implicit, explicit)
