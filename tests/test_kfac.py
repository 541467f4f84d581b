"""K-FAC / EKFAC: factors against their definitions, dense Kronecker references, EKFAC ≤ K-FAC error,
the solvers through ``solve`` and ``influence_unlearn``, the CG preconditioner and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unlearn_fast as uf
from helpers import LOGISTIC_LAMBDA, flat
from unlearn_fast.influence import kfac as kfac_module
from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.kfac import fit_kronecker
from unlearn_fast.influence.per_sample import per_sample_grads
from unlearn_fast.influence.solvers import (
    PRECONDITIONERS,
    SOLVERS,
    SolverWarning,
    _cg,
    solve,
    solve_operator,
)
from unlearn_fast import influence_unlearn
from unlearn_fast.influence.vectors import as_dict, as_flat, trainable

DT = torch.float64


def mlp_problem(seed: int, n: int = 40, loss: str = "cross_entropy"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,)) if loss == "cross_entropy" else torch.randn(n, 3, dtype=DT)
    return model, x, y


class SumPositions(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.sum(1)


class MeanPositions(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.mean(1)


class Scale(nn.Module):
    """A parameter without a rule: it takes the fallback (materialised) path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.s


def dense_fisher(model, loss, x, y) -> torch.Tensor:
    """(1/N) Σ g_i g_iᵀ from torch.func per-sample gradients (the reference, independent of the factors)."""
    params = trainable(model)
    g = per_sample_grads(model, loss, (x, y))
    rows = torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)
    return rows.T @ rows / x.shape[0]


def dense(kron, size: int) -> torch.Tensor:
    """(M + shift·I) as a dense matrix, column by column through ``matvec``."""
    return kron.matvec(torch.eye(size, dtype=DT))


def block_embedding(block, params) -> torch.Tensor:
    """E [d_out·d_in', P]: row (o, i) of the block layout (row-major) → its entry of the flat vector."""
    d_out, d_in = block.eigenvalues.shape
    units = torch.eye(d_out * d_in, dtype=DT).reshape(-1, d_out, d_in)
    parts = block.split(units)
    full = {n: parts[n] if n in parts else torch.zeros(units.shape[0], *p.shape, dtype=DT) for n, p in params.items()}
    return as_flat(full, params)


# -- factors and the Kronecker formula ------------------------------------------------------------
def test_mlp_factors_match_their_definition_and_the_dense_kronecker_solve():
    model, x, y = mlp_problem(0)
    n = x.shape[0]
    # independent forward/backward by hand: a = layer inputs with the bias column, g = ∂ℓ_i/∂ outputs
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    h = x @ w1.T + b1
    r = h.relu()
    dz = (r @ w2.T + b2).softmax(1) - F.one_hot(y, 3).to(DT)
    dh = (dz @ w2) * (h > 0).to(DT)
    ones = torch.ones(n, 1, dtype=DT)
    expected = [(torch.cat([x, ones], 1), dh), (torch.cat([r, ones], 1), dz)]

    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", weight_decay=1e-2, damping=1e-3, batch_size=16)
    kron = fit_kronecker(op)
    assert [b.module_name for b in kron.blocks] == ["0", "2"] and kron.diagonal == {} and kron.passes == 1
    params = trainable(model)
    m = torch.zeros(op.num_params, op.num_params, dtype=DT)
    for block, (a, g) in zip(kron.blocks, expected):
        a_bar, g_bar = a.T @ a / n, g.T @ g / n
        torch.testing.assert_close(block.a_factor, a_bar, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(block.g_factor, g_bar, rtol=1e-12, atol=1e-14)
        e = block_embedding(block, params)
        m += e.T @ torch.kron(g_bar, a_bar) @ e  # the block, placed at its parameters' flat indices
    a_full = m + op.shift * torch.eye(op.num_params, dtype=DT)

    torch.testing.assert_close(dense(kron, op.num_params), a_full, rtol=1e-10, atol=1e-12)
    b = torch.randn(3, op.num_params, dtype=DT)
    expected_x = torch.linalg.solve(a_full, b.T).T
    torch.testing.assert_close(kron.solve(b), expected_x, rtol=1e-9, atol=1e-12)
    res = solve(model, "cross_entropy", (x, y), b, solver="kfac", curvature="fisher", weight_decay=1e-2, damping=1e-3)
    torch.testing.assert_close(res.solution, expected_x, rtol=1e-9, atol=1e-12)
    # dict form in, dict form out, single vector keeps its shape
    single = {k: v[0] for k, v in as_dict(b[:1], params).items()}
    out = kron.solve(single)
    assert set(out) == set(single) and all(out[k].shape == single[k].shape for k in single)
    torch.testing.assert_close(as_flat({k: v[None] for k, v in out.items()}, params)[0], expected_x[0])


@pytest.mark.parametrize("model_kind", ["mlp", "sequence", "conv"])
def test_ekfac_is_the_diagonal_of_c_in_the_kronecker_eigenbasis(model_kind, monkeypatch):
    """Per block: diag((Q_G⊗Q_A)ᵀ C (Q_G⊗Q_A)) = s, and K-FAC's block is Ḡ ⊗ Ā (T = 1, T > 1, conv)."""
    torch.manual_seed(1)
    if model_kind == "mlp":
        model, x, y = mlp_problem(1, n=24)
    elif model_kind == "sequence":  # T = 6 positions through one Linear, summed
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), SumPositions()).double()
        x, y = torch.randn(24, 6, 3, dtype=DT), torch.randint(0, 3, (24,))
        monkeypatch.setattr(kfac_module, "MAX_INTERMEDIATE", 40)  # chunks of 3 samples for the [chunk, d_out, d_in'] path
    else:  # Conv2d: T = 16 output pixels
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()
        x, y = torch.randn(12, 1, 4, 4, dtype=DT), torch.randint(0, 3, (12,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", damping=1e-3, batch_size=10)
    c = dense_fisher(model, "cross_entropy", x, y)
    k_kfac, k_ekfac = fit_kronecker(op), fit_kronecker(op, eigen_correct=True)
    assert k_ekfac.passes == 2 and len(k_ekfac.blocks) == 2
    params = trainable(model)
    for plain, corrected in zip(k_kfac.blocks, k_ekfac.blocks):
        e = block_embedding(corrected, params)
        q = torch.kron(corrected.q_g, corrected.q_a)
        s = torch.diagonal(q.T @ (e @ c @ e.T) @ q)
        torch.testing.assert_close(corrected.eigenvalues.reshape(-1), s, rtol=1e-9, atol=1e-12)
        block_m = e @ (dense(k_kfac, op.num_params) - op.shift * torch.eye(op.num_params, dtype=DT)) @ e.T
        torch.testing.assert_close(block_m, torch.kron(plain.g_factor, plain.a_factor), rtol=1e-9, atol=1e-12)
    # the trace of C is kept exactly by EKFAC (blocks and diagonal alike)
    m_ekfac = dense(k_ekfac, op.num_params) - op.shift * torch.eye(op.num_params, dtype=DT)
    assert float(m_ekfac.trace()) == pytest.approx(float(c.trace()), rel=1e-9)


def test_expand_normalisation_for_sequences():
    """T > 1: Ā = Σ_i Σ_t a aᵀ / (N·T), Ḡ = Σ_i Σ_t g gᵀ / N (inputs and output gradients known by hand)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), SumPositions()).double()
    x, y = torch.randn(10, 5, 3, dtype=DT), torch.randint(0, 2, (10,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", damping=1e-3)
    (block,) = fit_kronecker(op).blocks
    a = torch.cat([x, torch.ones(10, 5, 1, dtype=DT)], -1).reshape(-1, 4)
    dz = model(x).softmax(1).detach() - F.one_hot(y, 2).to(DT)  # the same output gradient at every position
    g = dz.repeat_interleave(5, dim=0)
    torch.testing.assert_close(block.a_factor, a.T @ a / 50, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.g_factor, g.T @ g / 10, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_ekfac_error_is_at_most_kfac_error(seed):
    """‖M_ekfac − C‖_F ≤ ‖M_kfac − C‖_F against the dense empirical Fisher (a theorem: same eigenbasis)."""
    model, x, y = mlp_problem(10 + seed, n=30)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", damping=1e-3)
    eye = op.shift * torch.eye(op.num_params, dtype=DT)
    c = dense_fisher(model, "cross_entropy", x, y)
    err_kfac = float((dense(fit_kronecker(op), op.num_params) - eye - c).norm())
    err_ekfac = float((dense(fit_kronecker(op, eigen_correct=True), op.num_params) - eye - c).norm())
    assert err_ekfac <= err_kfac * (1 + 1e-12)
    # one Linear layer (T = 1): the same holds, and the block error is then the whole error
    torch.manual_seed(seed)
    lin = nn.Linear(5, 3).double()
    xl, yl = torch.randn(30, 5, dtype=DT), torch.randint(0, 3, (30,))
    op = CurvatureOperator(lin, "cross_entropy", (xl, yl), kind="fisher", damping=1e-3)
    c = dense_fisher(lin, "cross_entropy", xl, yl)
    eye = op.shift * torch.eye(op.num_params, dtype=DT)
    errs = [float((dense(fit_kronecker(op, eigen_correct=ek), op.num_params) - eye - c).norm() / c.norm()) for ek in (False, True)]
    assert errs[1] <= errs[0] and errs[0] > 1e-3  # K-FAC is not exact here


def test_when_the_approximations_are_exact():
    torch.manual_seed(3)
    # N = 1: the Fisher is one rank-one Kronecker product: K-FAC and EKFAC are both exact
    lin = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([1])
    op = CurvatureOperator(lin, "cross_entropy", (x, y), kind="fisher", damping=1e-3)
    c = dense_fisher(lin, "cross_entropy", x, y) + op.shift * torch.eye(op.num_params, dtype=DT)
    for ek in (False, True):
        torch.testing.assert_close(dense(fit_kronecker(op, eigen_correct=ek), op.num_params), c, rtol=1e-9, atol=1e-12)
    # one-hot inputs, one output, no bias: C is diagonal in the factors' eigenbasis, so EKFAC is exact,
    # while K-FAC's mean(g²)·frequency is not (the g² differ between the input classes)
    lin = nn.Linear(4, 1, bias=False).double()
    x = F.one_hot(torch.arange(20) % 4, 4).to(DT)
    y = torch.randn(20, 1, dtype=DT) * torch.arange(1, 21, dtype=DT)[:, None]
    op = CurvatureOperator(lin, "mse", (x, y), kind="fisher", damping=1e-3)
    c = dense_fisher(lin, "mse", x, y) + op.shift * torch.eye(4, dtype=DT)
    torch.testing.assert_close(dense(fit_kronecker(op, eigen_correct=True), 4), c, rtol=1e-9, atol=1e-12)
    assert float((dense(fit_kronecker(op), 4) - c).norm() / c.norm()) > 0.1


def test_diagonal_blocks_for_embedding_layernorm_and_fallback_parameters():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(7, 4), Scale(4), nn.LayerNorm(4), MeanPositions(), nn.Linear(4, 3)).double()
    x = torch.randint(0, 7, (15, 5))  # repeated ids inside a sample: rows are summed before squaring
    y = torch.randint(0, 3, (15,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", damping=1e-3, batch_size=4)
    kron = fit_kronecker(op)
    assert [b.module_name for b in kron.blocks] == ["4"]
    assert set(kron.diagonal) == {"0.weight", "1.s", "2.weight", "2.bias"}
    ref = per_sample_grads(model, "cross_entropy", (x, y))
    for name, diag in kron.diagonal.items():
        torch.testing.assert_close(diag, ref[name].pow(2).mean(0), rtol=1e-10, atol=1e-14)
    b = torch.randn(2, op.num_params, dtype=DT)
    torch.testing.assert_close(kron.matvec(kron.solve(b)), b, rtol=1e-9, atol=1e-11)


# -- random output cotangents (curvature="ggn") --------------------------------------------------------
def test_sampled_factors_estimate_the_ggn_and_are_seeded():
    torch.manual_seed(5)
    lin = nn.Linear(3, 3).double()
    x, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 3, (20,))
    op = CurvatureOperator(lin, "cross_entropy", (x, y), kind="ggn", damping=1e-3)
    (block,) = fit_kronecker(op, samples=300).blocks
    p = lin(x).softmax(1).detach()
    exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)  # E_y[g gᵀ] for the output layer
    assert float((block.g_factor - exact).norm() / exact.norm()) < 0.05
    # the same seed gives the same draws; another seed other draws
    same = fit_kronecker(op, seed=0).blocks[0].g_factor
    assert torch.equal(same, fit_kronecker(op, seed=0).blocks[0].g_factor)
    assert not torch.equal(same, fit_kronecker(op, seed=1).blocks[0].g_factor)
    # mse: u = √2 ε makes E[g gᵀ] = 2 I, the GGN's H
    op = CurvatureOperator(lin, "mse", (x, torch.randn(20, 3, dtype=DT)), kind="ggn", damping=1e-3)
    (block,) = fit_kronecker(op, samples=300).blocks
    assert float((block.g_factor - 2 * torch.eye(3, dtype=DT)).norm() / (2 * 3 ** 0.5)) < 0.05


def test_cotangent_draws_are_unbiased_with_far_less_variance_than_label_draws():
    """One confident sample (p_max = 0.944): u uᵀ over 20,000 draws of our cotangents averages to H (to 2%
    of ‖H‖; measured 0.5%), and its mean squared error E‖u uᵀ − H‖² is far below that of label draws
    y ~ softmax(z), g = p − e_y (computed exactly by enumerating y). Measured: 1.54 against 30.2 times
    ‖H‖² (20×); asserted: at least 5×."""
    from unlearn_fast.influence.cotangents import output_cotangents

    lin = nn.Linear(1, 4).double()
    op = CurvatureOperator(lin, "cross_entropy", (torch.zeros(2, 1, dtype=DT), torch.zeros(2, dtype=torch.long)), kind="ggn",
                           damping=1e-3)
    z = torch.tensor([[4.0, 0.5, 0.0, -0.5]], dtype=DT)
    p = z.softmax(1)[0]
    h = torch.diag(p) - torch.outer(p, p)
    u = output_cotangents(op.loss, z.expand(20_000, 4), torch.Generator().manual_seed(0))
    outer = u[:, :, None] * u[:, None, :]
    assert float((outer.mean(0) - h).norm() / h.norm()) < 0.02
    ours = float((outer - h).pow(2).sum((1, 2)).mean())
    labels = sum(float(p[y]) * float((torch.outer(p - e, p - e) - h).pow(2).sum()) for y, e in enumerate(torch.eye(4, dtype=DT)))
    assert ours * 5 <= labels, (ours / float(h.pow(2).sum()), labels / float(h.pow(2).sum()))


# -- through solve and influence_unlearn ---------------------------------------------------------
def test_solve_reports_the_approximation_error_without_a_warning():
    model, x, y = mlp_problem(6)
    b = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DT)
    assert {"kfac", "ekfac"} <= set(SOLVERS) and {"kfac", "ekfac"} <= set(PRECONDITIONERS)
    for solver, passes in (("kfac", 1), ("ekfac", 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            res = solve(model, "cross_entropy", (x, y), b, solver=solver, weight_decay=1e-2, damping=1e-3, tol=1e-8)
        assert res.converged and res.approximate and res.iterations == passes and res.relative_residual > 1e-8
        assert "approximation error" in res.message and f"{res.relative_residual:.3g}" in res.message


def test_callable_loss_with_the_empirical_fisher():
    model, x, y = mlp_problem(7)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    named = solve(model, "cross_entropy", (x, y), b, solver="ekfac", curvature="fisher", damping=1e-2)
    custom = solve(model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none"), (x, y), b,
                   solver="ekfac", curvature="fisher", damping=1e-2)
    torch.testing.assert_close(custom.solution, named.solution, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_influence_unlearn_with_kronecker_solvers_on_breast_cancer(breast_cancer_logistic, solver):
    """Measured ‖θ − θ_retrain‖ / ‖θ* − θ_retrain‖ (curvature='ggn', seed 0): kfac 0.367, ekfac 0.374
    (exact GGN solve: 0.013). The Kronecker factor Ā is the unweighted input covariance while the GGN
    weights each x_i by p_i(1 − p_i); that basis mismatch, not the label sampling, limits the ratio
    (0.375 for both with 100 draws per sample). Bound: 0.6."""
    model, data, forget, retrained = breast_cancer_logistic
    m = uf.attach(copy.deepcopy(model), data, "cross_entropy", weight_decay=LOGISTIC_LAMBDA)
    before, target = flat(m), flat(retrained)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        report = influence_unlearn(m, forget, solver=solver, curvature="ggn", damping=0.0, device="cpu", progress=False)
    ratio = float((flat(m) - target).norm() / (before - target).norm())
    assert ratio <= 0.6, ratio
    assert report.converged and report.iterations == (1 if solver == "kfac" else 2)


# -- the K-FAC preconditioner for CG -------------------------------------------------------------
def test_preconditioned_cg_maths_and_solution():
    model, x, y = mlp_problem(8)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", weight_decay=1e-2, damping=1e-3)
    a = op.matvec(torch.eye(op.num_params, dtype=DT))
    b = torch.randn(2, op.num_params, dtype=DT)
    inverse = torch.linalg.inv(a)
    _, iterations, problems = _cg(op, b, tol=1e-10, max_iter=100, progress=False, precondition=lambda r: r @ inverse)
    assert iterations <= 2 and not problems  # M = A: PCG is done in one step (two for rounding)
    expected = torch.linalg.solve(a, b.T).T
    for pre in PRECONDITIONERS:
        res = solve_operator(op, b, solver="cg", tol=1e-10, max_iter=500, preconditioner=pre)
        assert res.converged and not res.approximate and f"{pre} preconditioner" in res.message
        torch.testing.assert_close(res.solution, expected, rtol=1e-7, atol=1e-9)


def test_kfac_preconditioner_cuts_cg_iterations_on_ill_scaled_logistic_regression():
    """Measured here: 48 → 15 iterations (kfac and ekfac alike); seeds 0-3 with N=300: fisher 48-50 → 13-15,
    ggn 43-45 → 14-16. On Linear-ReLU-Linear nets it does NOT help (digits MLP: 94 → 243 fisher,
    121 → 224 ggn), see kronecker_preconditioner's docstring."""
    torch.manual_seed(0)
    x = torch.randn(120, 8, dtype=DT) * torch.logspace(-2, 1, 8, dtype=DT)  # features on scales 0.01 … 10
    y = torch.randint(0, 3, (120,))
    model = nn.Linear(8, 3).double()
    b = torch.randn(27, dtype=DT)
    plain = solve(model, "cross_entropy", (x, y), b, curvature="fisher", damping=1e-4, tol=1e-8, max_iter=500)
    pre = solve(model, "cross_entropy", (x, y), b, curvature="fisher", damping=1e-4, tol=1e-8, max_iter=500,
                preconditioner="kfac")
    assert plain.converged and pre.converged
    assert pre.iterations <= plain.iterations / 2, (plain.iterations, pre.iterations)
    torch.testing.assert_close(pre.solution, plain.solution, rtol=1e-6, atol=1e-8)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_names_the_choices():
    model, x, y = mlp_problem(9, n=8)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    with pytest.raises(ValueError, match="curvature='hessian' has no Kronecker.*'ggn'.*'fisher'"):
        solve(model, "cross_entropy", (x, y), b, solver="kfac", curvature="hessian", damping=1e-2)
    with pytest.raises(ValueError, match="weight_decay \\+ damping > 0"):
        solve(model, "cross_entropy", (x, y), b, solver="ekfac", damping=0.0)
    custom = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none")
    op = CurvatureOperator(model, custom, (x, y), kind="fisher", damping=1e-2)
    with pytest.raises(ValueError, match="curvature='ggn'.*named loss \\(cross_entropy, mse\\).*curvature='fisher'"):
        fit_kronecker(op, curvature="ggn")
    with pytest.raises(ValueError, match="curvature='diag' is not valid; valid choices: 'ggn', 'fisher'"):
        fit_kronecker(op, curvature="diag")
    with pytest.raises(ValueError, match="samples=0"):
        fit_kronecker(op, samples=0)
    with pytest.raises(ValueError, match="preconditioner='jacobi'.*'kfac', 'ekfac'"):
        solve(model, "cross_entropy", (x, y), b, damping=1e-2, preconditioner="jacobi")
    with pytest.raises(ValueError, match="solver='cg' only, not solver='exact'"):
        solve(model, "cross_entropy", (x, y), b, solver="exact", damping=1e-2, preconditioner="kfac")
    with pytest.raises(ValueError, match="solver='kfack'.*'kfac', 'ekfac'"):
        solve(model, "cross_entropy", (x, y), b, solver="kfack", damping=1e-2)
