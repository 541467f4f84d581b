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
from torch.func import functional_call, grad, vmap

from unlearn_fast.influence.per_sample import grad_norms

GROUP = "grad_norms MLP 1024-1024-10 B=256"
FUNC_CHUNK = 64
ROUNDS = 5


def ours_norms(model, batch):
    return grad_norms(model, "cross_entropy", batch)


def func_norms(model, batch, chunk: int = FUNC_CHUNK):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    x, y = batch
    parts = []
    for s in range(0, x.shape[0], chunk):
        g = per_sample(params, x[s:s + chunk], y[s:s + chunk])
        parts.append(sum(g[n].reshape(g[n].shape[0], -1).pow(2).sum(1) for n in params))
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
