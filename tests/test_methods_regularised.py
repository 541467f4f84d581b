"""graddiff, l1_sparse (methods/regularised.py), fisher_forgetting and ssd (methods/dampening.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import unlearn_fast as uf
from unlearn_fast.methods import dampening  # registers fisher_forgetting, ssd
from unlearn_fast.methods import regularised  # registers graddiff, l1_sparse
from helpers import forget_report, same_params
from unlearn_fast.context import get_context
from unlearn_fast.methods.registry import UnlearnTask

# Allowed test-accuracy drop below the original's (0.958) on the quick task, per method, at the
# defaults. Measured at seed 0 (seed 1 in brackets): graddiff 0.944 (0.953), l1_sparse 0.960
# (0.960), fisher_forgetting 0.938 (0.951), ssd 0.936 (0.956); the bounds leave ~1 point of slack.
TEST_ACC_DROP = {"graddiff": 0.025, "l1_sparse": 0.01, "fisher_forgetting": 0.03, "ssd": 0.03}
METHOD_NAMES = list(TEST_ACC_DROP)


@pytest.fixture(scope="module")
def quick_results(quick_task):
    """Each method at its defaults on the quick task's forget_all, with the input's state before and after."""
    results = {}
    for name in METHOD_NAMES:
        before = {k: v.clone() for k, v in quick_task.original.state_dict().items()}
        out = uf.unlearn(quick_task.original, quick_task.forget_all, name, device="cpu", progress=False)
        after = quick_task.original.state_dict()
        unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        results[name] = (out, forget_report(quick_task, out), unchanged)
    return results


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_forget_losses_move_toward_the_oracle(quick_results, name):
    _, report, _ = quick_results[name]
    for key in ("target_loss", "similar_loss"):
        oracle, original, method = report["oracle"][key], report["original"][key], report["method"][key]
        assert abs(method - oracle) < abs(original - oracle), (name, key, original, method, oracle)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_test_accuracy_is_kept(quick_results, name):
    _, report, _ = quick_results[name]
    assert report["method"]["test_acc"] >= report["original"]["test_acc"] - TEST_ACC_DROP[name], report


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_input_model_unchanged(quick_results, quick_task, name):
    out, _, unchanged = quick_results[name]
    assert unchanged and out is not quick_task.original
    assert get_context(quick_task.original).removed_ids == ()
    assert set(get_context(out).removed_ids) == set(quick_task.forget_all)
    assert all(torch.isfinite(p).all() for p in out.parameters())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_deterministic_on_cpu(trained_mlp, small_digits, name):
    ids = small_digits.forget_ids
    a = uf.unlearn(trained_mlp, ids, name, device="cpu", progress=False)
    b = uf.unlearn(trained_mlp, ids, name, device="cpu", progress=False)
    assert same_params(a, b) and not same_params(a, trained_mlp)


@pytest.mark.parametrize("name, option, value", [
    ("graddiff", "forget_weight", -1.0),
    ("graddiff", "forget_cap", 0.0),
    ("graddiff", "forget_cap", math.inf),
    ("graddiff", "lr", 0.0),
    ("graddiff", "epochs", 0),
    ("l1_sparse", "gamma", -0.1),
    ("l1_sparse", "gamma", math.nan),
    ("l1_sparse", "gamma", "big"),
    ("fisher_forgetting", "alpha", -1e-3),
    ("fisher_forgetting", "max_std", math.inf),
    ("fisher_forgetting", "seed", -1),
    ("fisher_forgetting", "seed", 1.5),
    ("ssd", "alpha", -2.0),
    ("ssd", "lam", math.nan),
    ("ssd", "lam", True),
])
def test_bad_hyperparameters_raise(trained_mlp, small_digits, name, option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        uf.unlearn(trained_mlp, small_digits.forget_ids, name, device="cpu", progress=False, **{option: value})


# -- mechanisms, on cases with a known answer -------------------------------------------------------

def test_capped_forget_term_has_no_gradient_past_the_cap():
    losses = torch.tensor([0.5, 3.0, 1.5], requires_grad=True)
    value = regularised.capped_forget_loss(losses, 1.0)
    value.backward()
    assert value.item() == pytest.approx(2.5 / 3)  # (0.5 + 1 + 1) / 3
    assert torch.equal(losses.grad, torch.tensor([1 / 3, 0.0, 0.0]))  # samples past the cap pass no gradient


def test_graddiff_stays_finite_where_gradient_ascent_diverges(quick_task):
    ids = quick_task.forget_all  # 550 samples: targets and near-duplicates
    with pytest.raises(FloatingPointError, match="method 'gradient_ascent' produced non-finite parameters"):
        uf.unlearn(quick_task.original, ids, "gradient_ascent", device="cpu", progress=False)
    # gradient_ascent's lr and a forget weight ten times the default: the capped term still bounds it
    out = uf.unlearn(quick_task.original, ids, "graddiff", lr=0.05, forget_weight=10.0, device="cpu", progress=False)
    assert all(torch.isfinite(p).all() for p in out.parameters())
    x, y = get_context(out).tensors()
    with torch.no_grad():
        forget_loss = nn.functional.cross_entropy(out(x[ids]), y[ids], reduction="none")
    assert torch.isfinite(forget_loss).all()


def test_linear_decay_schedule():
    assert [regularised.linear_decay(0.2, t, 4) for t in range(4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])


def test_l1_sparse_with_zero_gamma_is_finetune(trained_mlp, small_digits):
    ids = small_digits.forget_ids
    plain = uf.unlearn(trained_mlp, ids, "finetune", epochs=2, lr=0.05, device="cpu", progress=False)
    zero = uf.unlearn(trained_mlp, ids, "l1_sparse", epochs=2, lr=0.05, gamma=0.0, device="cpu", progress=False)
    assert same_params(plain, zero)
    sparse = uf.unlearn(trained_mlp, ids, "l1_sparse", epochs=2, lr=0.05, gamma=0.05, device="cpu", progress=False)
    def l1(m: nn.Module) -> float:
        return sum(float(p.detach().abs().sum()) for p in m.parameters())

    assert l1(sparse) < l1(plain)


def test_fisher_noise_std_formula():
    fisher = torch.tensor([0.0, 1.0, 16.0, 1e-8])
    # σ = min(α F^{-1/4}, σ_max): F = 0 → σ_max; 1 → α; 16 → α/2; 1e-8 → 100 α, capped
    assert torch.allclose(dampening.fisher_noise_std(fisher, 0.5, 1.0), torch.tensor([1.0, 0.5, 0.25, 1.0]))
    assert torch.equal(dampening.fisher_noise_std(fisher, 0.0, 1.0), torch.zeros(4))


def _linear_mse_task(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: bool) -> nn.Module:
    """A Linear(d, 1) model with the given weights, attached to (x [N, d], y [N, 1]) under the mse loss."""
    model = nn.Linear(x.shape[1], 1, bias=bias)
    with torch.no_grad():
        model.weight.copy_(weight.reshape(1, -1))
        if bias:
            model.bias.zero_()
    return uf.attach(model, TensorDataset(x, y), loss="mse")


def test_fisher_forgetting_noise_follows_the_formula():
    # mse per sample ℓ = (w·x + b − y)², so g_w = 2 r x and g_b = 2 r (r the residual):
    # the retain Fisher by hand is F_w = mean(4 r² x²), F_b = mean(4 r²).
    gen = torch.Generator().manual_seed(0)
    n, groups, per_group = 400, (0.0, 0.1, 1.0, 10.0), 500
    scales = torch.tensor(groups).repeat_interleave(per_group)           # [2000]: feature scale per group
    x = torch.randn(n, scales.numel(), generator=gen) * scales            # scale-0 features are identically 0
    w = torch.randn(scales.numel(), generator=gen) * 0.01
    y = torch.randn(n, 1, generator=gen)
    forget = list(range(50))
    model = _linear_mse_task(x, y, w, bias=True)
    keep = torch.arange(50, n)
    r = (x[keep] @ w - y[keep, 0])
    f_weight = (4 * r[:, None] ** 2 * x[keep] ** 2).mean(0)
    f_bias = (4 * r ** 2).mean()

    task = UnlearnTask(get_context(model), forget, torch.device("cpu"), progress=False)
    fisher = dampening.fisher_importances(model, task, task.retain_ids())  # the project's fisher_diagonal
    assert torch.allclose(fisher["weight"][0], f_weight, rtol=1e-4)
    assert torch.allclose(fisher["bias"], f_bias.reshape(1), rtol=1e-4)

    alpha, max_std = 0.02, 0.5
    out = uf.unlearn(model, forget, "fisher_forgetting", alpha=alpha, max_std=max_std, seed=3, device="cpu", progress=False)
    std = torch.where(f_weight > 0, alpha * f_weight.clamp_min(1e-30) ** -0.25, torch.tensor(max_std)).clamp(max=max_std)
    z = (out.weight.detach()[0] - w) / std                                  # should be N(0, 1) in every group
    for g in range(len(groups)):
        part = z[g * per_group:(g + 1) * per_group]
        assert abs(float(part.mean())) < 0.2 and 0.85 < float(part.std()) < 1.15, (groups[g], part.mean(), part.std())
    assert torch.all(std[:per_group] == max_std) and torch.all(std[per_group:] < max_std)  # zero Fisher → the cap
    again = uf.unlearn(model, forget, "fisher_forgetting", alpha=alpha, max_std=max_std, seed=3, device="cpu", progress=False)
    other = uf.unlearn(model, forget, "fisher_forgetting", alpha=alpha, max_std=max_std, seed=4, device="cpu", progress=False)
    assert same_params(out, again) and not same_params(out, other)


def test_ssd_dampens_exactly_the_selected_parameters():
    # Linear(3, 1) without bias, w = (1, 1, 1), mse: g_i = 2 (w·x_i − y_i) x_i.
    #   forget  x0 = (1, 0, 1), y0 = 0: r = 2, g = (4, 0, 4), g² = (16, 0, 16)
    #   retain  x1 = (0, 1, 1), y1 = 0: r = 2, g = (0, 4, 4), g² = (0, 16, 16)
    #           x2 = (1, 1, 0), y2 = 2: r = 0, g = 0
    # I_forget = (16, 0, 16); I_full = mean over all three = (16/3, 16/3, 32/3).
    # α = 2: w0 has I_f / I_full = 3 > α → β = min(λ (16/3) / 16, 1) = min(λ/3, 1);
    #        w1 has I_f = 0, w2 has ratio 1.5 < α: both unchanged (well clear of the boundary).
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([[0.0], [0.0], [2.0]])
    model = _linear_mse_task(x, y, torch.ones(3), bias=False)
    for lam, beta in ((1.0, 1 / 3), (0.6, 0.2), (6.0, 1.0)):  # λ = 6: β = min(2, 1) = 1
        out = uf.unlearn(model, [0], "ssd", alpha=2.0, lam=lam, device="cpu", progress=False)
        assert torch.allclose(out.weight.detach(), torch.tensor([[beta, 1.0, 1.0]]), rtol=1e-6), (lam, out.weight)
    # α ≥ |D| / |D_f| = 3 selects nothing: I_f / I_full ≤ 3 always
    out = uf.unlearn(model, [0], "ssd", alpha=3.0, lam=1.0, device="cpu", progress=False)
    assert torch.equal(out.weight.detach(), torch.ones(1, 3))
    assert torch.equal(model.weight.detach(), torch.ones(1, 3))


def test_ssd_factors_known_values():
    imp_f = torch.tensor([0.0, 1.0, 4.0, 9.0])
    imp_d = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # α = 2: only entries with I_f > 2 are selected; β = min(λ I_D / I_f, 1)
    assert torch.allclose(dampening.ssd_factors(imp_f, imp_d, 2.0, 1.0), torch.tensor([1.0, 1.0, 0.25, 1 / 9]))
    assert torch.allclose(dampening.ssd_factors(imp_f, imp_d, 2.0, 6.0), torch.tensor([1.0, 1.0, 1.0, 2 / 3]))
