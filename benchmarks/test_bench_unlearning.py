"""Cost of unlearning on digits-blockmask, against retraining (the peer every method must beat)."""

from __future__ import annotations

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.data import default_recipe

GROUP = "unlearn 50 targets, digits mlp"


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    data = uf.load_dataset("digits-blockmask")
    recipe = default_recipe("digits-blockmask")
    torch.manual_seed(0)
    model = uf.build_model(recipe.pop("model"), data.input_shape, data.num_classes)
    return uf.train(model, data, device="cpu", progress=False, **recipe), data


@pytest.mark.parametrize("method", ["finetune", "gradient_ascent"])
def test_unlearn_method(benchmark, trained, method):
    model, data = trained
    benchmark.group = GROUP
    benchmark.pedantic(uf.unlearn, args=(model, data.forget_ids, method), kwargs={"device": "cpu", "progress": False}, rounds=3)


def test_retrain_peer(benchmark, trained):
    model, data = trained
    benchmark.group = GROUP
    benchmark.extra_info["peer"] = True
    benchmark.pedantic(uf.unlearn, args=(model, data.forget_ids, "retrain"), kwargs={"device": "cpu", "progress": False}, rounds=3)
