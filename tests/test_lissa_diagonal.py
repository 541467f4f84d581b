"""The ``lissa`` solver and the ``diagonal`` (Jacobi) CG preconditioner, against dense float64 references.

References: the GGN of the MLP problems is ``test_solvers.dense`` (torch.func); the empirical Fisher's
diagonal is (1/N) Σ_i g_i² from ``per_sample_grads`` (torch.func); other GGN diagonals come from the
operator applied to the identity (that operator is checked against torch.func in test_curvature.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_solvers import _indefinite_hessian, dense, mlp_problem
from torch import nn

from unlearn_fast.influence import kfac as kfac_module
from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.lissa import SCALE_SAFETY, estimate_lambda_max, lissa_scale
from unlearn_fast.influence.per_sample import per_sample_grads
from unlearn_fast.influence.preconditioners import (
    diagonal_preconditioner,
    fisher_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
)
from unlearn_fast.influence.solvers import (
    PRECONDITIONERS,
    SolverWarning,
    _cg,
    solve,
    solve_operator,
)
from unlearn_fast.influence.vectors import trainable

DT = torch.float64


def dense_fisher(model, loss, x, y) -> torch.Tensor:
    """(1/N) Σ g_i g_iᵀ from torch.func per-sample gradients."""
    g = per_sample_grads(model, loss, (x, y))
    rows = torch.cat([g[n].reshape(x.shape[0], -1) for n in trainable(model)], dim=1)
    return rows.T @ rows / x.shape[0]


def dense_operator(op: CurvatureOperator) -> torch.Tensor:
    """C (without the shift) as a dense matrix, through the operator."""
    eye = torch.eye(op.num_params, dtype=DT)
    return op.matvec(eye) - op.shift * eye


def gradient_rhs(model, loss, x, y) -> torch.Tensor:
    """Σ_i ∇ℓ_i over the given samples: the kind of right-hand side influence_unlearn solves for."""
    g = per_sample_grads(model, loss, (x, y))
    return torch.cat([g[n].sum(0).reshape(-1) for n in trainable(model)])


# -- lissa ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_lissa_reaches_the_exact_solution(kind):
    model, x, y = mlp_problem(0)
    size = sum(p.numel() for p in model.parameters())
    c = dense(model, x, y, "ggn") if kind == "ggn" else dense_fisher(model, "cross_entropy", x, y)
    a = c + (1e-1 + 1e-3) * torch.eye(size, dtype=DT)
    b = torch.randn(3, size, dtype=DT)
    b[1] = 0
    expected = torch.linalg.solve(a, b.T).T
    res = solve(model, "cross_entropy", (x, y), b, solver="lissa", curvature=kind, damping=1e-1, weight_decay=1e-3,
                tol=1e-9, max_iter=2000, batch_size=8)
    assert res.converged and res.solver == "lissa" and "lissa: converged" in res.message
    assert res.relative_residual <= 1e-9 and torch.equal(res.solution[1], torch.zeros(size, dtype=DT))
    # cond(A) ≤ 10 here, so a residual of 1e-9 bounds the error by 1e-8
    assert ((res.solution - expected).norm(dim=1)[[0, 2]] / expected[[0, 2]].norm(dim=1)).max() <= 1e-8
    # the rate of the module doc: (1 − λ_min/s)^j ≤ tol within ln(1/tol)·s/λ_min steps (seen: 176 ggn)
    evals = torch.linalg.eigvalsh(a)
    scale = SCALE_SAFETY * estimate_lambda_max(CurvatureOperator(model, "cross_entropy", (x, y), kind=kind,
                                                                damping=1e-1, weight_decay=1e-3))
    assert res.iterations <= math.ceil(math.log(1e9) * scale / float(evals[0])) + 1


def test_lissa_with_small_damping_warns_and_recommends_cg():
    model, x, y = mlp_problem(4)
    b = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DT)
    with pytest.warns(SolverWarning, match="lissa did not converge within max_iter=50") as record:
        res = solve(model, "cross_entropy", (x, y), b, solver="lissa", damping=1e-4, tol=1e-8, max_iter=50)
    assert len(record) == 1 and not res.converged and res.iterations == 50
    assert "(1 − λ_min/scale)^j" in res.message and "use solver='cg'" in res.message
    assert f"relative residual {res.relative_residual:.3g}" in res.message


def test_power_iteration_bounds_lambda_max_and_the_scale_exceeds_it():
    """‖A v‖ never exceeds λ_max; after 20 steps it was within 1.3% of it on seeds 0-3 (seen 0.988-1.000)."""
    for seed in range(4):
        model, x, y = mlp_problem(seed)
        op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
        lam_max = float(torch.linalg.eigvalsh(dense(model, x, y, "ggn"))[-1]) + 1e-2
        estimate = estimate_lambda_max(op, seed=seed)
        assert lam_max / 1.05 <= estimate <= lam_max * (1 + 1e-10), (seed, estimate / lam_max)
        assert estimate == estimate_lambda_max(op, seed=seed)  # seeded
        assert lissa_scale(op, seed=seed) == SCALE_SAFETY * estimate >= lam_max
        assert lissa_scale(op, 3.5) == 3.5  # a given scale is used as it is


def test_lissa_scale_below_half_lambda_max_is_reported_as_diverged():
    model, x, y = mlp_problem(1)
    lam_max = float(torch.linalg.eigvalsh(dense(model, x, y, "ggn"))[-1]) + 1e-1
    b = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=DT)
    with pytest.warns(SolverWarning, match="lissa diverged: rhs 0 at iteration .*rhs 1 at iteration .*scale="):
        res = solve(model, "cross_entropy", (x, y), b, solver="lissa", damping=1e-1, tol=1e-8, max_iter=1000,
                    solver_options={"scale": lam_max / 2.5})
    assert not res.converged and res.iterations < 1000 and res.relative_residual > 1
    # the exact λ_max is a valid scale
    ok = solve(model, "cross_entropy", (x, y), b, solver="lissa", damping=1e-1, tol=1e-8, max_iter=1000,
               solver_options={"scale": lam_max, "power_iterations": 1})
    assert ok.converged


def test_lissa_on_an_indefinite_hessian_diverges_along_negative_curvature():
    model, x, y, _, evecs = _indefinite_hessian()
    with pytest.warns(SolverWarning, match="lissa diverged: rhs 0 .*not positive definite"):
        res = solve(model, "cross_entropy", (x, y), evecs[:, 0], solver="lissa", curvature="hessian", tol=1e-8)
    assert not res.converged


def test_solver_options_are_validated():
    model, x, y = mlp_problem(6, n=5)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    with pytest.raises(ValueError, match=r"solver_options key\(s\) \['scal'\] not accepted by solver='lissa'; "
                                         r"valid keys: 'scale', 'power_iterations', 'seed'"):
        solve(model, "cross_entropy", (x, y), b, solver="lissa", solver_options={"scal": 1.0})
    with pytest.raises(ValueError, match="valid keys: none \\(cg takes no options\\)"):
        solve(model, "cross_entropy", (x, y), b, solver_options={"scale": 1.0})
    with pytest.raises(ValueError, match="solver_options must be a dict"):
        solve(model, "cross_entropy", (x, y), b, solver="lissa", solver_options=[("scale", 1.0)])
    for options, what in [({"scale": -1.0}, "scale=-1.0"), ({"power_iterations": 0}, "power_iterations=0"),
                          ({"seed": -1}, "seed=-1"), ({"scale": 1.0, "seed": 0.5}, "seed=0.5")]:
        with pytest.raises(ValueError, match=what):
            solve(model, "cross_entropy", (x, y), b, solver="lissa", damping=1e-1, solver_options=options)


# -- curvature diagonals -------------------------------------------------------------------------
class Scale(nn.Module):
    """A parameter without a rule (the fallback path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.s


def diagonal_problem(name: str):
    torch.manual_seed(3)
    if name == "mlp":
        model, x, y = mlp_problem(3, n=21)
        return model, "cross_entropy", x, y
    if name == "conv":  # Conv2d: T = 16 output pixels per sample
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()
        return model, "cross_entropy", torch.randn(13, 2, 4, 4, dtype=DT), torch.randint(0, 3, (13,))
    if name == "sequence":  # T = 5 positions through both Linear layers, and a fallback parameter
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Scale(4), nn.Linear(4, 2), nn.Flatten()).double()
        return model, "mse", torch.randn(13, 5, 3, dtype=DT), torch.randn(13, 10, dtype=DT)
    # Embedding + LayerNorm (non-Kronecker rules) into a sequence Linear
    model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.Flatten()).double()
    return model, "cross_entropy", torch.randint(0, 7, (13, 3)), torch.randint(0, 6, (13,))


@pytest.mark.parametrize("name", ["mlp", "conv", "sequence", "embedding"])
def test_exact_fisher_and_ggn_diagonals_match_the_dense_ones(name, monkeypatch):
    model, loss, x, y = diagonal_problem(name)
    monkeypatch.setattr(kfac_module, "MAX_INTERMEDIATE", 40)  # T > 1 squares in chunks of a few samples
    fisher = CurvatureOperator(model, loss, (x, y), kind="fisher", damping=1e-2, batch_size=5)
    expected = torch.diagonal(dense_fisher(model, loss, x, y))
    torch.testing.assert_close(fisher_diagonal(fisher), expected, rtol=1e-10, atol=1e-12)
    ggn = CurvatureOperator(model, loss, (x, y), kind="ggn", damping=1e-2, batch_size=5)
    reference = dense(model, x, y, "ggn") if name == "mlp" else dense_operator(ggn)
    torch.testing.assert_close(ggn_diagonal(ggn), torch.diagonal(reference), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="kind='fisher'"):
        fisher_diagonal(ggn)


def test_hutchinson_diagonal_converges_to_the_dense_diagonal():
    """Rademacher probes: d̂_i − C_ii is a mean of m terms of variance σ_i² = Σ_{j≠i} C_ij² (z_i² = 1), so
    |error| ≤ 5 σ_i/√m for every coordinate (a 5σ bound: P = 51 coordinates, seeded)."""
    model, x, y = mlp_problem(0)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    c = dense(model, x, y, "ggn")
    sigma = (c.pow(2).sum(1) - torch.diagonal(c).pow(2)).sqrt()
    for probes in (16, 2048):
        error = (hutchinson_diagonal(op, probes=probes) - torch.diagonal(c)).abs()
        assert (error <= 5 * sigma / math.sqrt(probes) + 1e-12).all(), (probes, float((error / sigma).max()))
    # a diagonal C is found exactly by one probe
    diag = torch.rand(op.num_params, dtype=DT)

    class DiagonalOp:
        num_params, dtype, device, shift = op.num_params, DT, torch.device("cpu"), 0.5

        def matvec(self, z):
            return z * (diag + self.shift)

    torch.testing.assert_close(hutchinson_diagonal(DiagonalOp(), probes=1), diag, rtol=1e-14, atol=1e-15)


class WithUnused(nn.Module):
    """``net`` plus a trainable layer that the forward never reaches (its gradient is zero)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.unused = net, nn.Linear(2, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_diagonal_preconditioner_is_spd_with_a_floor():
    """Zero curvature for an unused layer and no damping: M is floored at eps·max(M), never 0; a Hessian
    diagonal estimate with negative entries is clamped."""
    net, x, y = mlp_problem(2)
    model = WithUnused(net)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher")
    m = diagonal_preconditioner(op).diagonal
    assert bool((m > 0).all()) and float(m[-6:].min()) == torch.finfo(DT).eps * float(m.max())
    hess = CurvatureOperator(model, "cross_entropy", (x, y), kind="hessian", damping=1e-3)
    raw = hutchinson_diagonal(hess, probes=4)
    assert bool((raw < 0).any())
    assert bool((diagonal_preconditioner(hess, probes=4).diagonal >= 1e-3).all())


# -- diagonal-preconditioned CG ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_diagonal_preconditioned_cg_reaches_the_exact_solution(kind):
    model, x, y = mlp_problem(5)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, damping=1e-2, weight_decay=1e-3)
    b = torch.randn(2, op.num_params, dtype=DT)
    expected = solve_operator(op, b, solver="exact").solution
    res = solve_operator(op, b, tol=1e-10, max_iter=500, preconditioner="diagonal")
    assert res.converged and "diagonal preconditioner" in res.message
    torch.testing.assert_close(res.solution, expected, rtol=1e-7, atol=1e-9)
    # the Hutchinson path (2 probes < 3 outputs): a noisy but SPD M still gives the exact solution
    x_h, _, problems = _cg(op, b, tol=1e-10, max_iter=500, progress=False,
                           precondition=diagonal_preconditioner(op, probes=2))
    assert not problems
    torch.testing.assert_close(x_h, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind,ratio", [("fisher", 0.25), ("ggn", 0.6)])
def test_diagonal_preconditioner_cuts_cg_iterations_on_badly_scaled_logistic_regression(kind, ratio):
    """Binary logistic regression, 30 features on scales 1e-2 … 1e2, damping 1e-4, b = Σ of 5 sample
    gradients. Measured on seeds 0-5: fisher 157-161 → 17-19 iterations (ratio ≤ 0.12, exact Fisher
    diagonal), ggn 87-124 → 23-36 (ratio ≤ 0.40, exact GGN diagonal). Hutchinson's estimate instead made
    it worse (111 → 967 with 32 probes), see preconditioners.py; so does Jacobi on 3 classes for the ggn
    (355 → 528) and on a well-scaled MLP (49 → 79): measure first."""
    torch.manual_seed(0)
    x = torch.randn(300, 30, dtype=DT) * torch.logspace(-2, 2, 30, dtype=DT)
    y = torch.randint(0, 2, (300,))
    model = nn.Linear(30, 2).double()
    b = gradient_rhs(model, "cross_entropy", x[:5], y[:5])
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, damping=1e-4)
    plain = solve_operator(op, b, tol=1e-8, max_iter=1000)
    pre = solve_operator(op, b, tol=1e-8, max_iter=1000, preconditioner="diagonal")
    assert plain.converged and pre.converged
    assert pre.iterations <= ratio * plain.iterations, (plain.iterations, pre.iterations)


def test_bad_preconditioner_input_names_the_choices():
    model, x, y = mlp_problem(6, n=5)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    assert PRECONDITIONERS == ("kfac", "ekfac", "diagonal", "nystrom", "woodbury")
    with pytest.raises(ValueError, match="preconditioner='jacobi' is not valid; valid choices: 'kfac', 'ekfac', 'diagonal', 'nystrom', 'woodbury'"):
        solve(model, "cross_entropy", (x, y), b, preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner='diagonal' works with solver='cg' only, not solver='lissa'"):
        solve(model, "cross_entropy", (x, y), b, solver="lissa", preconditioner="diagonal")
    with pytest.raises(ValueError, match="solver='newton' is not valid; valid choices: .*'lissa'"):
        solve(model, "cross_entropy", (x, y), b, solver="newton")
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    with pytest.raises(ValueError, match="probes=0"):
        diagonal_preconditioner(op, probes=0)
