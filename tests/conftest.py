"""Shared fixtures: small, fast datasets and trained models for the tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# HYPOTHESIS_PROFILE=ci (set by .ci/run) draws the same examples on every run, so that CI is
# reproducible; local runs keep drawing new ones (that is how a cancelling float32 sum that the kernel
# tests' old tolerance could not absorb was found).
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before the kernels are defined (imported), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the kernel tests draw many shapes; autotuning each would cost seconds apiece.
os.environ.setdefault("UNLEARN_FAST_TRITON_AUTOTUNE", "0")

import unlearn_fast as uf
from helpers import logistic_problem, retrained_logistic

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_digits() -> uf.SimilarDataset:
    """digits-blockmask with 6 targets × 3 copies (seed 0)."""
    return uf.load_dataset("digits-blockmask", targets=6, copies=3, seed=0)


@pytest.fixture(scope="session")
def trained_mlp(small_digits: uf.SimilarDataset) -> torch.nn.Module:
    """A small MLP trained for 3 epochs on ``small_digits``, with its training context."""
    torch.manual_seed(0)
    model = uf.build_model("mlp", small_digits.input_shape, small_digits.num_classes, hidden=(32,))
    return uf.train(model, small_digits, epochs=3, lr=0.1, batch_size=64, weight_decay=5e-4, seed=0, device="cpu", progress=False)


@pytest.fixture(scope="session")
def breast_cancer_logistic():
    """The certified-removal setting: L2-regularised logistic regression on sklearn's breast cancer.

    Returns (model at the optimum, TensorDataset, 25 forget ids, model retrained to the optimum
    without them), all float64.
    """
    model, data = logistic_problem("breast_cancer")
    forget = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:25].tolist()
    return model, data, forget, retrained_logistic(data, forget)


@pytest.fixture(scope="session")
def quick_task():
    """The study's ``--quick`` task at seed 0, with its near-duplicates: digits-blockmask at its
    defaults (50 targets × 10 copies), ``original`` trained with the study's quick recipe, and the
    oracle (retrained without the targets and their copies). Method tests unlearn ``forget_all``
    (targets and copies: exactly what the oracle never saw) from ``original`` and compare with both
    (see helpers.forget_report)."""
    from types import SimpleNamespace

    from unlearn_fast.data import default_recipe
    from unlearn_fast.study import QUICK_EPOCH_DIVISOR

    data = uf.load_dataset("digits-blockmask", seed=0)
    recipe = default_recipe("digits-blockmask")
    model_name = recipe.pop("model")
    recipe["epochs"] = max(1, recipe["epochs"] // QUICK_EPOCH_DIVISOR)
    torch.manual_seed(0)
    original = uf.train(uf.build_model(model_name, data.input_shape, data.num_classes), data, seed=0, device="cpu",
                        progress=False, **recipe)
    oracle = uf.unlearn(original, data.forget_ids, "oracle", device="cpu", progress=False)
    forget_all = sorted({*data.forget_ids, *data.similar_ids()})
    return SimpleNamespace(data=data, original=original, oracle=oracle, forget_all=forget_all)
