"""Per-sample gradient norms ‖∇ℓ_i‖: ``grad_norms`` against torch.func (peer) and Opacus.

MLP 1024-1024-10, B=256. The peer materialises the per-sample gradients with torch.func
``vmap(grad)`` in chunks of 64 samples and takes their norms; Opacus (skipped when not installed)
does the same from ``GradSampleModule``'s ``grad_sample``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from func_peer import FUNC_CHUNK, func_per_sample_chunks

from unlearn_fast.influence.per_sample import grad_norms

GROUP = "grad_norms MLP 1024-1024-10 B=256"
ROUNDS = 5


def ours_norms(model, batch):
    return grad_norms(model, "cross_entropy", batch)


def func_norms(model, batch, chunk: int = FUNC_CHUNK):
    parts = [sum(g[n].reshape(g[n].shape[0], -1).pow(2).sum(1) for n in g) for g in func_per_sample_chunks(model, batch, chunk)]
    return torch.cat(parts).sqrt()


def opacus_norms(gsm, batch):
    x, y = batch
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    with torch.no_grad():
        total = sum(p.grad_sample.reshape(x.shape[0], -1).pow(2).sum(1) for p in gsm._module.parameters())
    gsm.zero_grad(set_to_none=True)  # drops p.grad and p.grad_sample
    return total.sqrt()


@pytest.fixture(scope="module")
def mlp():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    batch = (torch.randn(256, 1024), torch.randint(0, 10, (256,)))
    return model, batch, func_norms(model, batch)


def test_mlp_grad_norms(benchmark, mlp):
    model, batch, reference = mlp
    benchmark.group = GROUP
    result = benchmark.pedantic(ours_norms, args=(model, batch), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


def test_mlp_func_peer(benchmark, mlp):
    model, batch, _ = mlp
    benchmark.group = GROUP
    benchmark.extra_info["peer"] = True
    benchmark.pedantic(func_norms, args=(model, batch), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_mlp_opacus(benchmark, mlp):
    opacus = pytest.importorskip("opacus")
    model, batch, reference = mlp
    benchmark.group = GROUP
    gsm = opacus.GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    result = benchmark.pedantic(opacus_norms, args=(gsm, batch), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)
