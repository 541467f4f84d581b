"""The randomized Nyström CG preconditioner, against dense float64 curvatures."""

from __future__ import annotations

import pytest
import torch

from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.nystrom import nystrom_preconditioner, nystrom_sketch
from unlearn_fast.influence.solvers import solve_operator

from helpers import assert_cg_done_in_one_step
from test_lissa_diagonal import dense_fisher
from test_solvers import dense, mlp_problem


def operator(n: int, damping: float = 1e-3, seed: int = 0, kind: str = "ggn") -> CurvatureOperator:
    model, x, y = mlp_problem(seed, n=n, train_steps=50)
    return CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, damping=damping, batch_size=8)


def test_sketch_recovers_a_curvature_of_lower_rank_exactly():
    """The GGN of n samples with 3 classes has rank ≤ 2n; a sketch of larger rank spans its range."""
    op = operator(n=4)  # P = 51, rank(C) ≤ 8
    model, x, y = op.model, op.inputs, op.labels
    c = dense(model, x, y, "ggn")
    u, lam = nystrom_sketch(op, rank=12)
    assert u.shape == (op.num_params, 12) and lam.shape == (12,)
    torch.testing.assert_close(u.T @ u, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    assert bool((lam[:-1] >= lam[1:]).all()) and bool((lam >= 0).all())
    approx = u @ torch.diag(lam) @ u.T
    assert float((approx - c).norm() / c.norm()) < 1e-8


def test_preconditioned_cg_takes_one_step_when_the_sketch_spans_the_curvature():
    """With U spanning C's range and λ̂_ℓ = 0, M⁻¹ = μ (C + μI)⁻¹: M⁻¹A = μI, so CG is done in one step."""
    op = operator(n=4)
    b = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # the default rank (32, capped at P = 51) would do too; 12 just covers rank(C) ≤ 8
    assert_cg_done_in_one_step(op, b, "nystrom", {"rank": 12})


def test_preconditioner_is_symmetric_positive_definite_and_contracts():
    """Rank below C's: M⁻¹ is SPD with eigenvalues in [(λ̂_ℓ+μ)/(λ̂_1+μ), 1], and M⁻¹A's condition number
    is far below A's."""
    op = operator(n=30)  # rank(C) up to 51 = P
    apply = nystrom_preconditioner(op, rank=8)
    eye = torch.eye(op.num_params, dtype=torch.float64)
    m_inv = apply(eye)
    torch.testing.assert_close(m_inv, m_inv.T, atol=1e-12, rtol=0)
    eig = torch.linalg.eigvalsh(m_inv)
    lam = apply.eigenvalues
    assert float(eig.min()) >= float((lam[-1] + op.shift) / (lam[0] + op.shift)) * (1 - 1e-9)
    assert float(eig.max()) <= 1 + 1e-9
    c = dense(op.model, op.inputs, op.labels, "ggn")
    a = c + op.shift * eye
    root = torch.linalg.cholesky(m_inv)  # M⁻¹ = R Rᵀ: Rᵀ A R has the spectrum of M⁻¹A
    before = float(torch.linalg.cond(a))
    after = float(torch.linalg.cond(root.T @ a @ root))
    # The best any rank-8 deflation can do is (λ_9 + μ)/μ (130 here, against A's 1246); a random sketch
    # of this slowly decaying spectrum gets within a small factor of it (263 measured).
    best = float((torch.linalg.eigvalsh(c).flip(0)[8] + op.shift) / op.shift)
    assert after <= 3 * best and after < before / 3


def test_cg_with_nystrom_reaches_the_exact_solution_in_fewer_iterations():
    op = operator(n=30, damping=1e-4)
    a = dense(op.model, op.inputs, op.labels, "ggn") + op.shift * torch.eye(op.num_params, dtype=torch.float64)
    b = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.solve(a, b)
    plain = solve_operator(op, b, tol=1e-9, max_iter=2000)
    pre = solve_operator(op, b, tol=1e-9, max_iter=2000, preconditioner="nystrom")
    assert plain.converged and pre.converged
    assert float((pre.solution - expected).norm() / expected.norm()) < 1e-6
    assert pre.iterations < plain.iterations


def test_same_seed_same_sketch_and_the_fisher_is_recovered_too():
    op = operator(n=4, kind="fisher")  # the empirical Fisher of 4 samples has rank ≤ 4
    u1, lam1 = nystrom_sketch(op, rank=6, seed=3)
    u2, lam2 = nystrom_sketch(op, rank=6, seed=3)
    assert torch.equal(u1, u2) and torch.equal(lam1, lam2)
    c = dense_fisher(op.model, "cross_entropy", op.inputs, op.labels)
    assert float((u1 @ torch.diag(lam1) @ u1.T - c).norm() / c.norm()) < 1e-8
    other, _ = nystrom_sketch(op, rank=6, seed=4)
    assert not torch.equal(u1, other)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"weight_decay \+ damping > 0 \(got 0 \+ 0\)"):
        nystrom_preconditioner(operator(n=4, damping=0.0))
    model, x, y = mlp_problem(0, n=4)
    hess = CurvatureOperator(model, "cross_entropy", (x, y), kind="hessian", damping=1e-2)
    with pytest.raises(ValueError, match="curvature='hessian' is indefinite"):
        nystrom_preconditioner(hess)
    with pytest.raises(ValueError, match="rank"):
        nystrom_sketch(operator(n=4), rank=0)


@pytest.mark.parametrize(("kind", "n", "damping"), [("ggn", 2, 1e-3), ("ggn", 3, 1e4), ("fisher", 5, 1e4),
                                                    ("ggn", 15, 0.1), ("fisher", 50, 1e4)])
def test_float32_curvature_of_rank_below_the_sketch(kind, n, damping):
    """float32 GGNs/Fishers of a few samples have rank < ℓ = 32, so the sketch's core Ωᵀ C Ω is singular
    up to rounding, and taking a large μ off (C + μI)Ω leaves rounding of size eps·μ in Y. A shift of
    eps·‖Y‖, added to Y in float32, did not cover that: the damping-1e4 cases here failed with "not
    positive semi-definite" for every seed tried. The sketch must build, and PCG must solve."""
    torch.manual_seed(n)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))  # P = 1,994
    x, y = torch.randn(n, 20), torch.randint(0, 10, (n,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, damping=damping)
    apply = nystrom_preconditioner(op)
    assert apply.basis.dtype == torch.float32 and bool(torch.isfinite(apply.eigenvalues).all())
    b = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0))
    res = solve_operator(op, b, tol=1e-4, max_iter=200, preconditioner="nystrom")
    assert res.converged, res.message
    rank_bound = 9 * n if kind == "ggn" else n  # (classes − 1)·n for the GGN, n for the empirical Fisher
    if rank_bound <= 32:  # ℓ = 32 spans C's range: M⁻¹A is μI up to rounding
        assert res.iterations <= 3, res.message
    else:
        assert res.iterations <= solve_operator(op, b, tol=1e-4, max_iter=200).iterations


def test_preconditioner_options_are_validated_and_used():
    op = operator(n=4)
    b = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"preconditioner_options key\(s\) \['ranks'\] not accepted by "
                                         r"preconditioner='nystrom'; valid keys: 'rank', 'seed'"):
        solve_operator(op, b, preconditioner="nystrom", preconditioner_options={"ranks": 4})
    with pytest.raises(ValueError, match="given without a preconditioner"):
        solve_operator(op, b, preconditioner_options={"rank": 4})
    with pytest.raises(ValueError, match=r"preconditioner_options\['seed'\]=2.7 must be an int >= 0"):
        solve_operator(op, b, preconditioner="nystrom", preconditioner_options={"seed": 2.7})
    one = solve_operator(op, b, tol=1e-10, preconditioner="nystrom", preconditioner_options={"rank": 2})
    twelve = solve_operator(op, b, tol=1e-10, preconditioner="nystrom", preconditioner_options={"rank": 12})
    assert one.converged and twelve.converged and twelve.iterations < one.iterations


def test_study_refuses_bad_influence_options_before_training():
    """The method registry checks option values (not only names), so a study fails before any model is trained."""
    from unlearn_fast.study import check_method_options

    with pytest.raises(ValueError, match=r"preconditioner_options\['rank'\]=0 must be an int >= 1"):
        check_method_options({"influence": {"preconditioner": "nystrom", "preconditioner_options": {"rank": 0}}})
    with pytest.raises(ValueError, match="preconditioner='nystrom' works with solver='cg' only"):
        check_method_options({"influence": {"solver": "ekfac", "preconditioner": "nystrom"}})
    assert check_method_options({"influence": {"preconditioner": "nystrom", "preconditioner_options": {"rank": 8}}})
