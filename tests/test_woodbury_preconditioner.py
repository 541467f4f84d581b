"""The Woodbury CG preconditioner from the heaviest pseudo-samples, against dense float64 references.

References are independent of the operator: per-sample Jacobians by torch.func's ``jacrev`` (GGN
pseudo-samples g_{i,r} = J_iᵀ √p_{i,r} (e_r − p_i)) and per-sample gradients by ``vmap(grad)`` (Fisher).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ScaledLinear, assert_cg_done_in_one_step
from test_curvature import _theta
from test_solvers import dense, mlp_problem
from torch.func import functional_call, grad, jacrev, vmap

from unlearn_fast.influence import solve
from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.woodbury import woodbury_preconditioner


def pseudo_samples(model, x, y, kind: str) -> torch.Tensor:
    """Rows whose outer products average to the curvature: [N·R, P] (GGN) or [N, P] (Fisher)."""
    theta, split = _theta(model)
    if kind == "fisher":
        def loss(th, xi, yi):
            return F.cross_entropy(functional_call(model, split(th), (xi[None],)), yi[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)
    jac = jacrev(lambda th: functional_call(model, split(th), (x,)))(theta)  # [N, O, P]
    p = functional_call(model, split(theta), (x,)).softmax(dim=1)
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    roots = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])  # [N, r, O]: column r of L is √p_r (e_r − p)
    return torch.einsum("nro,nop->nrp", roots, jac).reshape(-1, theta.numel())


def reference_inverse(rows: torch.Tensor, n: int, shift: float, rank: int) -> torch.Tensor:
    """(s I + (1/N) Σ_{top-``rank`` rows by norm} g gᵀ)⁻¹, dense."""
    top = rows.pow(2).sum(1).topk(rank).indices
    kept = rows[top]
    m = shift * torch.eye(rows.shape[1], dtype=rows.dtype) + kept.T @ kept / n
    return torch.linalg.inv(m)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("batch_size", [40, 7])  # one batch, and a merge of the heaviest across six
def test_apply_is_the_inverse_of_the_heaviest_pseudo_samples_curvature(kind, batch_size):
    model, x, y = mlp_problem(0, n=40, train_steps=50)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, damping=1e-2, batch_size=batch_size)
    rows = pseudo_samples(model, x, y, kind)
    apply = woodbury_preconditioner(op, rank=15)
    eye = torch.eye(op.num_params, dtype=torch.float64)
    torch.testing.assert_close(apply(eye), reference_inverse(rows, 40, op.shift, 15), rtol=1e-9, atol=1e-9)
    norms = rows.pow(2).sum(1)
    assert apply.rank == 15
    assert apply.captured == pytest.approx(float(norms.topk(15).values.sum() / norms.sum()), rel=1e-9)


def test_all_pseudo_samples_make_m_the_curvature_and_cg_exact_in_one_step():
    model, x, y = mlp_problem(1, n=6, train_steps=20)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-3)
    b = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = dense(model, x, y, "ggn") + op.shift * torch.eye(op.num_params, dtype=torch.float64)
    apply = woodbury_preconditioner(op, rank=1000)  # capped at N·R = 18
    assert apply.rank == 18 and apply.captured == pytest.approx(1.0)
    torch.testing.assert_close(apply(b), torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-8)
    assert_cg_done_in_one_step(op, b, "woodbury", {"rank": 18})


def test_iterations_fall_as_the_rank_grows_on_a_trained_net():
    """N·R = 180 pseudo-samples, P = 51: measured 63 plain CG iterations, then 57 / 22 / 8 at m = 20 / 80 / 160."""
    model, x, y = mlp_problem(2, n=60, train_steps=200)
    b = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    kw = dict(curvature="ggn", damping=1e-3, tol=1e-8, max_iter=2000)
    plain = solve(model, "cross_entropy", (x, y), b, **kw)
    counts = []
    for rank in (20, 80, 160):
        pre = solve(model, "cross_entropy", (x, y), b, preconditioner="woodbury", preconditioner_options={"rank": rank}, **kw)
        assert pre.converged
        torch.testing.assert_close(pre.solution, plain.solution, rtol=1e-6, atol=1e-6)
        counts.append(pre.iterations)
    assert plain.converged and plain.iterations > counts[0] > counts[1] > counts[2]
    assert counts[2] * 4 < plain.iterations


def test_fallback_parameters_of_the_fisher_are_kept_too():
    torch.manual_seed(0)  # 'scale' has no rule: the Fisher materialises its per-sample gradients
    model, x, y = ScaledLinear(3, 4).double(), torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 4, (12,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="fisher", damping=1e-2, batch_size=5)
    apply = woodbury_preconditioner(op, rank=4)
    eye = torch.eye(op.num_params, dtype=torch.float64)
    torch.testing.assert_close(apply(eye), reference_inverse(pseudo_samples(model, x, y, "fisher"), 12, op.shift, 4),
                               rtol=1e-9, atol=1e-9)
    ggn = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    with pytest.raises(ValueError, match=r"per-layer rule for every parameter; \['scale'\] have none; use preconditioner='nystrom'"):
        woodbury_preconditioner(ggn)


def test_rank_whose_rows_exceed_the_cache_is_refused(monkeypatch):
    from unlearn_fast.influence import curvature

    model, x, y = mlp_problem(0, n=8)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    monkeypatch.setattr(curvature, "CACHE_BYTES", 10_000)  # rows of (4 + 6) + (6 + 3) float64 = 152 bytes each
    woodbury_preconditioner(op, rank=32)
    with pytest.raises(ValueError, match=r"rank=33 would keep .* \(152 bytes per pseudo-sample\).*lower rank"):
        woodbury_preconditioner(op, rank=33)


def test_bad_input_names_the_problem():
    model, x, y = mlp_problem(0, n=8)
    with pytest.raises(ValueError, match="curvature='hessian' is indefinite"):
        woodbury_preconditioner(CurvatureOperator(model, "cross_entropy", (x, y), kind="hessian", damping=1e-2))
    with pytest.raises(ValueError, match=r"weight_decay \+ damping > 0"):
        woodbury_preconditioner(CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn"))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    with pytest.raises(ValueError, match="rank"):
        woodbury_preconditioner(op, rank=0)
    b = torch.randn(op.num_params, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"key\(s\) \['seed'\].*valid keys: 'rank'"):
        solve(model, "cross_entropy", (x, y), b, damping=1e-2, preconditioner="woodbury",
              preconditioner_options={"seed": 1})
