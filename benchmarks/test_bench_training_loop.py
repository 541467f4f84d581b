"""The in-memory training loop against the standard torch DataLoader loop (peer), same recipe."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import unlearn_fast as uf
from unlearn_fast.train import fit, make_recipe

GROUP = "one epoch, digits mlp, batch 64"
RECIPE = make_recipe(epochs=1, lr=0.1, batch_size=64, weight_decay=5e-4, schedule="constant")


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(2)
    return uf.load_dataset("digits-blockmask")


def _model(ds):
    torch.manual_seed(0)
    return uf.build_model("mlp", ds.input_shape, ds.num_classes)


def _dataloader_epoch(model, ds):
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"], weight_decay=RECIPE["weight_decay"])
    loader = DataLoader(ds.train, batch_size=RECIPE["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_fit_epoch(benchmark, data):
    benchmark.group = GROUP
    x, y = data.train.tensors
    benchmark.pedantic(lambda: fit(_model(data), x, y, RECIPE, "cross_entropy", device="cpu", progress=False), rounds=10)


def test_dataloader_epoch_peer(benchmark, data):
    benchmark.group = GROUP
    benchmark.extra_info["peer"] = True
    benchmark.pedantic(lambda: _dataloader_epoch(_model(data), data), rounds=10)
