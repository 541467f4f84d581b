"""One linearisation solved at several dampings: warm starts (x0) and what ``prepared`` keeps between solves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from test_solvers import dense, mlp_problem
from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.solvers import solve_operator


def _problem(seed: int = 3, wide: bool = False):
    model, x, y = mlp_problem(seed, train_steps=20)
    if wide:  # enough parameters (1,000+) that CG converges well before P iterations
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5)).double()
        x, y = torch.randn(300, 20, dtype=torch.float64), torch.randint(0, 5, (300,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", weight_decay=1e-3)
    b = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, x, y, op, b


def test_warm_start_reaches_the_same_solution_in_fewer_iterations():
    model, x, y, op, b = _problem(wide=True)
    op.set_damping(1e-2)
    near = solve_operator(op, b, tol=1e-10, max_iter=2000).solution
    op.set_damping(5e-3)
    cold = solve_operator(op, b, tol=1e-8, max_iter=2000)
    warm = solve_operator(op, b, tol=1e-8, max_iter=2000, x0=near)
    expected = torch.linalg.solve(dense(model, x, y, "ggn") + (1e-3 + 5e-3) * torch.eye(op.num_params, dtype=torch.float64), b)
    for result in (cold, warm):
        assert result.converged and result.relative_residual <= 1e-8
        assert float((result.solution - expected).norm() / expected.norm()) <= 1e-6
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)
    # the residual the result carries is the true one, b − A x
    torch.testing.assert_close(warm.residual[0], b - op.matvec(warm.solution), rtol=0, atol=1e-12)


def test_a_start_at_the_solution_costs_one_product():
    _, _, _, op, b = _problem()
    op.set_damping(1e-2)
    exact = solve_operator(op, b, tol=1e-12, max_iter=500).solution
    again = solve_operator(op, b, tol=1e-6, max_iter=500, x0=exact)
    assert again.converged and again.iterations <= 2


def test_bad_start_is_refused():
    _, _, _, op, b = _problem()
    with pytest.raises(ValueError, match="x0 must be a finite vector shaped like rhs"):
        solve_operator(op, b, x0=torch.full_like(b, float("nan")))
    with pytest.raises(ValueError, match="vector has shape"):
        solve_operator(op, b, x0=b[:-1])


@pytest.mark.parametrize("solver", ["exact", "kfac", "ekfac"])
def test_prepared_direct_solves_match_fresh_ones_at_another_damping(solver):
    _, _, _, op, b = _problem()
    prepared: dict = {}
    op.set_damping(1e-2)
    first = solve_operator(op, b, solver=solver, prepared=prepared)
    assert first.iterations > 0 and prepared
    op.set_damping(3e-2)
    reused = solve_operator(op, b, solver=solver, prepared=prepared)
    fresh = solve_operator(op, b, solver=solver)
    assert reused.iterations == 0 < fresh.iterations  # nothing rebuilt
    torch.testing.assert_close(reused.solution, fresh.solution, rtol=1e-10, atol=1e-12)


def test_prepared_preconditioner_is_built_once():
    _, _, _, op, b = _problem()
    prepared: dict = {}
    op.set_damping(1e-2)
    solve_operator(op, b, preconditioner="nystrom", prepared=prepared)
    built = prepared[("preconditioner", "nystrom")]
    op.set_damping(2e-2)
    result = solve_operator(op, b, preconditioner="nystrom", prepared=prepared, tol=1e-8, max_iter=500)
    assert prepared[("preconditioner", "nystrom")] is built and result.converged  # still a valid SPD preconditioner


def test_set_damping_moves_the_shift():
    _, _, _, op, b = _problem()
    op.set_damping(0.5)
    assert op.shift == pytest.approx(0.501)
    torch.testing.assert_close(op.matvec(b) - op.matvec(torch.zeros_like(b)), op.matvec(b))
    with pytest.raises(ValueError, match="damping=-1"):
        op.set_damping(-1.0)


@settings(max_examples=12, deadline=None)
@given(width=st.integers(1, 12), n=st.integers(2, 40), seed=st.integers(0, 10_000),
       damping=st.floats(1e-4, 1.0), start_scale=st.floats(0.0, 3.0), solver=st.sampled_from(["cg", "lissa"]))
def test_any_start_reaches_the_dense_solution(width, n, seed, damping, start_scale, solver):
    """From any x0 (zero, near, far), cg and lissa reach (A + δI)⁻¹ b to their tolerance: the warm start
    only changes where they begin. Float64 against torch.linalg.solve of the dense matrix."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2)).double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", weight_decay=1e-3, damping=damping)
    b = torch.randn(op.num_params, dtype=torch.float64)
    a = dense(model, x, y, "ggn") + (1e-3 + damping) * torch.eye(op.num_params, dtype=torch.float64)
    expected = torch.linalg.solve(a, b)
    # LiSSA contracts the error by about 1 − 1/cond(A) per iteration, so reaching 1e-9 takes about
    # cond(A)·ln(1e9) of them: cases beyond the 20 000 allowed say nothing about warm starts.
    assume(solver == "cg" or float(torch.linalg.cond(a)) * math.log(1e9) < 0.8 * 20_000)
    x0 = start_scale * torch.randn_like(b) * expected.norm() / op.num_params ** 0.5
    result = solve_operator(op, b, solver=solver, tol=1e-9, max_iter=20_000, x0=x0)
    assert result.converged and result.relative_residual <= 1e-9, result.message
    # a relative residual r bounds the relative error by cond(A)·r
    assert float((result.solution - expected).norm() / expected.norm()) <= 2e-9 * float(torch.linalg.cond(a))
