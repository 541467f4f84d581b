"""Inverse curvature solves against dense references (torch.func matrices, torch.linalg solves)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from unlearn_fast.influence import solvers
from unlearn_fast.influence.curvature import CurvatureOperator, curvature_vp
from unlearn_fast.influence.solvers import SolverWarning, solve, solve_operator
from unlearn_fast.influence.vectors import as_dict, as_flat, flat_params, trainable


def mlp_problem(seed: int, n: int = 30, train_steps: int = 0):
    """A float64 Linear-ReLU-Linear net on random data; ``train_steps`` of full-batch SGD make it trained-ish."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(train_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def dense(model, x, y, kind: str) -> torch.Tensor:
    """The [P, P] GGN or Hessian of the mean cross-entropy, built with torch.func (independent of the operator)."""
    params = trainable(model)

    def outputs(theta):
        chunks, i = {}, 0
        for name, p in params.items():
            chunks[name] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return functional_call(model, chunks, (x,))

    theta = flat_params(params)
    if kind == "hessian":
        return hessian(lambda th: F.cross_entropy(outputs(th), y))(theta)
    jac, p = jacrev(outputs)(theta), outputs(theta).softmax(dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nop,noq,nqr->pr", jac, h, jac) / x.shape[0]


def test_cg_reaches_the_exact_solution_for_three_rhs():
    model, x, y = mlp_problem(0)
    size = sum(p.numel() for p in model.parameters())
    a = dense(model, x, y, "ggn") + (1e-2 + 1e-3) * torch.eye(size, dtype=torch.float64)
    b = torch.randn(3, size, dtype=torch.float64)
    expected = torch.linalg.solve(a, b.T).T
    res = solve(model, "cross_entropy", (x, y), b, solver="cg", curvature="ggn", damping=1e-2, weight_decay=1e-3,
                tol=1e-11, max_iter=1000, batch_size=8)
    assert res.converged and res.solver == "cg" and res.solution.shape == (3, size)
    assert ((res.solution - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-6
    assert res.relative_residual <= 1e-11 and len(res.residuals) == 3 and 0 < res.iterations <= 1000

    # dict form in, dict form out; a single vector keeps its shape
    single = {n: t[0] for n, t in as_dict(b[:1], trainable(model)).items()}
    res_d = solve(model, "cross_entropy", (x, y), single, damping=1e-2, weight_decay=1e-3, tol=1e-11, max_iter=1000)
    assert set(res_d.solution) == set(single) and all(res_d.solution[n].shape == single[n].shape for n in single)
    flat = as_flat({n: t[None] for n, t in res_d.solution.items()}, trainable(model))[0]
    assert (flat - expected[0]).norm() / expected[0].norm() <= 1e-6


def test_exact_solve_residual_below_1e10():
    model, x, y = mlp_problem(1)
    size = sum(p.numel() for p in model.parameters())
    b = torch.randn(2, size, dtype=torch.float64)
    res = solve(model, "cross_entropy", (x, y), b, solver="exact", damping=1e-3)
    assert res.converged and res.relative_residual <= 1e-10
    a = dense(model, x, y, "ggn") + 1e-3 * torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(res.solution, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-10)


def test_reported_residual_is_the_true_one():
    model, x, y = mlp_problem(2)
    size = sum(p.numel() for p in model.parameters())
    b = torch.randn(2, size, dtype=torch.float64)
    res = solve(model, "cross_entropy", (x, y), b, damping=1e-2, tol=1e-3)  # loose: a visible residual
    ax = curvature_vp(model, "cross_entropy", (x, y), res.solution, kind="ggn", damping=1e-2)
    true = ((b - ax).norm(dim=1) / b.norm(dim=1)).tolist()
    assert res.residuals == pytest.approx(true, rel=1e-6)
    assert res.relative_residual == pytest.approx(max(true), rel=1e-6) and 0 < max(true) <= 1e-3


def test_zero_rhs_gives_zero_solution():
    model, x, y = mlp_problem(3)
    b = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    b[1] = 0
    res = solve(model, "cross_entropy", (x, y), b, damping=1e-2, tol=1e-8)
    assert res.converged and torch.equal(res.solution[1], torch.zeros_like(b[1])) and res.residuals[1] == 0


def test_max_iter_reached_warns_once_and_reports_not_converged():
    model, x, y = mlp_problem(4)
    b = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.warns(SolverWarning, match="max_iter=2") as record:
        res = solve(model, "cross_entropy", (x, y), b, damping=1e-4, tol=1e-12, max_iter=2)
    assert len(record) == 1
    assert not res.converged and res.iterations == 2 and res.relative_residual > 1e-12
    assert f"{res.relative_residual:.3g}" in res.message


def _indefinite_hessian():
    """A trained-ish ReLU net whose undamped Hessian has a clearly negative eigenvalue (checked here)."""
    for seed in range(20):
        model, x, y = mlp_problem(seed, train_steps=20)
        evals, evecs = torch.linalg.eigh(dense(model, x, y, "hessian"))
        if evals[0] < -1e-3 * evals[-1]:
            return model, x, y, evals, evecs
    raise AssertionError("no seed gave an indefinite Hessian")


def test_negative_curvature_guard_stops_that_column_only():
    model, x, y, _, evecs = _indefinite_hessian()
    b = torch.stack([evecs[:, 0], evecs[:, -1]])  # pᵀAp = λ_min < 0 at the first step; λ_max > 0
    with pytest.warns(SolverWarning, match="negative curvature"):
        res = solve(model, "cross_entropy", (x, y), b, curvature="hessian", tol=1e-8)
    assert not res.converged and "rhs 0" in res.message and "raise damping or use curvature='ggn'" in res.message
    assert res.residuals[1] <= 1e-8  # the other column went on and converged (in one step: an eigenvector)
    # exact still solves the indefinite system (LU instead of Cholesky); softmax's shift invariance makes
    # the Hessian singular, so check H x = b with the dense reference rather than x against b / λ
    exact = solve(model, "cross_entropy", (x, y), b, solver="exact", curvature="hessian")
    assert exact.converged and exact.relative_residual <= 1e-10
    h = dense(model, x, y, "hessian")
    assert ((exact.solution @ h.T - b).norm(dim=1) / b.norm(dim=1)).max() <= 1e-10


def test_operator_can_be_reused_across_solves():
    model, x, y = mlp_problem(5)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    b = torch.randn(op.num_params, dtype=torch.float64)
    cg, exact = solve_operator(op, b, tol=1e-10), solve_operator(op, b, solver="exact")
    assert cg.solution.shape == b.shape and (cg.solution - exact.solution).norm() <= 1e-7 * exact.solution.norm()


def test_bad_arguments_name_the_choices(monkeypatch):
    model, x, y = mlp_problem(6, n=5)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(ValueError, match="solver='newton'.*'cg', 'exact'"):
        solve(model, "cross_entropy", (x, y), b, solver="newton")
    with pytest.raises(ValueError, match="curvature='kfac'.*'ggn', 'hessian', 'fisher'"):
        solve(model, "cross_entropy", (x, y), b, curvature="kfac")
    with pytest.raises(ValueError, match="tol"):
        solve(model, "cross_entropy", (x, y), b, tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        solve(model, "cross_entropy", (x, y), b, max_iter=0)
    monkeypatch.setattr(solvers, "EXACT_MAX_PARAMS", 10)
    with pytest.raises(ValueError, match="EXACT_MAX_PARAMS=10.*solver='cg'"):
        solve(model, "cross_entropy", (x, y), b, solver="exact", damping=1e-2)


class _DriftingOperator:
    """A = diag(1..P) whose first products carry a small error: CG's recursive residual then drifts away
    from b − Ax, as rounding makes it do in float32 over many iterations."""

    def __init__(self, size: int, drift_products: int) -> None:
        self.diag = torch.linspace(1.0, 50.0, size, dtype=torch.float64)
        self.calls, self.drift_products = 0, drift_products

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = v * self.diag
        if self.calls <= self.drift_products:
            out = out + 1e-3 * v.norm(dim=-1, keepdim=True) * torch.ones_like(v) / v.shape[-1] ** 0.5
        return out


def test_cg_stops_on_the_true_residual_not_on_its_drifting_recursion():
    op = _DriftingOperator(40, drift_products=5)
    b = torch.ones(1, 40, dtype=torch.float64)
    x, _, problems = solvers._cg(op, b, tol=1e-8, max_iter=500, progress=False)
    true = float((b - x * op.diag).norm() / b.norm())
    assert not problems and true <= 1e-8, true  # stopping on the recursion alone left it at 4e-5


class _NoisyOperator(_DriftingOperator):
    """Every product carries fresh noise of relative size 1e-6: a floor no residual can get under."""

    def __init__(self, size: int) -> None:
        super().__init__(size, drift_products=0)
        self.gen = torch.Generator().manual_seed(0)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(v.shape, generator=self.gen, dtype=v.dtype)
        return super().matvec(v) + 1e-6 * v.norm(dim=-1, keepdim=True) * noise / v.shape[-1] ** 0.5


def test_cg_gives_up_replacing_after_max_replacements():
    """Below a floor, the true residual never meets tol: the column stops after MAX_REPLACEMENTS
    restarts instead of running to max_iter (the caller's true-residual check then reports the floor)."""
    b = torch.ones(1, 40, dtype=torch.float64)
    op = _NoisyOperator(40)
    _, iterations, problems = solvers._cg(op, b, tol=1e-12, max_iter=5000, progress=False)
    assert iterations < 1000 and not problems
    # one true-residual product per check: at most MAX_REPLACEMENTS restarts, fewer once a restart
    # stops halving the true residual (the floor is reached)
    assert 1 <= op.calls - iterations <= solvers.MAX_REPLACEMENTS + 1
