"""The randomized Nyström preconditioner for CG (``preconditioner="nystrom"``).

A = C + μ I as in :mod:`.curvature` (μ = λ + δ, weight decay plus damping). A rank-ℓ sketch of C,

    Ω [P, ℓ] orthonormal (QR of a seeded Gaussian),  Y = C Ω  (ℓ curvature products, one batched pass),
    Ĉ = Y (Ωᵀ Y)⁺ Yᵀ = U diag(λ̂) Uᵀ                (U [P, ℓ] orthonormal, λ̂ descending, ≥ 0),

gives the preconditioner of Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning",
SIAM J. Matrix Anal. Appl. 44(2):

    M⁻¹ = (λ̂_ℓ + μ) U diag(1 / (λ̂ + μ)) Uᵀ + (I − U Uᵀ).

It maps the sketched top of C's spectrum onto about λ̂_ℓ + μ and leaves the complement alone, so the
preconditioned spectrum lies in roughly [μ / (λ_ℓ + μ), 1]: CG then needs about √((λ_ℓ + μ)/μ)
iterations instead of √((λ_1 + μ)/μ). Unlike the Kronecker and diagonal preconditioners, it keeps the
cluster of eigenvalues at μ that an over-parameterised net's C has (its rank is at most N·outputs):
on the digits MLP of benchmarks/test_bench_cg.py (P = 85k, μ = 1e-3) those raised the GGN's CG
iterations from 175 to about 475, while deflating K-FAC's own top eigen-directions (an eigenvalue
floor on K-FAC) made them 189–480 too: K-FAC's top eigenvectors are not C's.

The sketch is computed stably (Tropp, Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", NeurIPS): Y is shifted by ν Ω before the Cholesky
factor of Ωᵀ Y_ν, and ν is taken off the eigenvalues again, with ν = eps·‖Y‖_F (eps of the products'
dtype: the size of the rounding in Y, which could otherwise make Ωᵀ Y indefinite). The ℓ × ℓ algebra
runs in float64, the tall [P, ℓ] matrices in the operator's dtype.

Cost: ℓ products before CG starts (not counted in its iterations, as for the other preconditioners);
about 4·P·ℓ floats of the operator's dtype at the peak (Ω, Y, Y L⁻ᵀ and U; 44 MB for the digits MLP
at ℓ = 32, so restrict ``layers`` on large models); two [k, P] × [P, ℓ] products per application.
Measured (benchmarks/RESULTS.md): the GGN solve of the CG benchmark 1.9–2.1× faster (175 → 52–55
iterations plus 32 sketch products), the default digits ``influence_unlearn`` 1.35× (72 → 24).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..validation import check_positive_int
from .curvature import CurvatureOperator

# Rank of the sketch. On the digits MLP (N = 1,437, P = 85k, μ = 1e-3, the GGN), CG took 186 plain
# iterations, and with the sketch ℓ + iterations = 25 + 61, 50 + 41, 100 + 25, 200 + 15 products:
# the sum is smallest near ℓ = 25–50. ℓ = 32 also keeps the sketch to two batched passes of 16.
NYSTROM_RANK = 32
SKETCH_CHUNK = 16  # vectors per batched product: bounds the vmapped activations like a K = 16 solve


def nystrom_sketch(op: CurvatureOperator, *, rank: int = NYSTROM_RANK, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [P, ℓ] orthonormal, λ̂ [ℓ] descending ≥ 0) with U diag(λ̂) Uᵀ ≈ C, the curvature of ``op``
    without its shift μ. U has the operator's dtype, λ̂ is float64. ``rank`` ℓ is capped at P."""
    rank = min(check_positive_int(rank, "rank"), op.num_params)
    gen = torch.Generator(device=op.device).manual_seed(int(seed))
    omega = torch.linalg.qr(torch.randn(op.num_params, rank, generator=gen, device=op.device, dtype=op.dtype))[0]
    rows = []
    for s in range(0, rank, SKETCH_CHUNK):
        block = omega[:, s:s + SKETCH_CHUNK].T.contiguous()
        rows.append(op.matvec(block) - op.shift * block)  # op gives (C + μ I) v: take μ v off again
    y = torch.cat(rows).T  # [P, ℓ]
    nu = torch.finfo(op.dtype).eps * float(y.norm())
    y_nu = y + nu * omega
    core = (omega.T @ y_nu).double()
    chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
    if int(info) != 0:  # C is not PSD along Ω (a Hessian): the sketch has no Nyström form
        raise ValueError("the Nyström sketch needs a positive semi-definite curvature (ggn or fisher); "
                         f"Ωᵀ C Ω is not (Cholesky failed at column {int(info)}): use curvature='ggn'")
    b = torch.linalg.solve_triangular(chol.to(op.dtype), y_nu.T, upper=False).T  # Y_ν L⁻ᵀ, [P, ℓ]
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return u, (sigma.double().square() - nu).clamp_min(0)


def nystrom_preconditioner(op: CurvatureOperator, *, rank: int = NYSTROM_RANK, seed: int = 0,
                           progress: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """r [K, P] ↦ M⁻¹ r (module doc) for preconditioned CG on ``op``; SPD for μ > 0.

    The returned function carries ``.basis`` U [P, ℓ] and ``.eigenvalues`` λ̂ [ℓ] of the sketch.
    ``progress`` is accepted for the builders' common signature (the sketch is ⌈ℓ/16⌉ products).
    """
    if op.kind == "hessian":
        raise ValueError("preconditioner='nystrom' needs a positive semi-definite curvature; curvature='hessian' "
                         "is indefinite in general: use curvature='ggn' or 'fisher'")
    if op.shift <= 0:
        raise ValueError(f"preconditioner='nystrom' needs weight_decay + damping > 0 (got {op.weight_decay:g} + "
                         f"{op.damping:g}): M⁻¹ divides by λ̂ + μ, and λ̂ is 0 beyond C's rank; raise damping")
    u, lam = nystrom_sketch(op, rank=rank, seed=seed)
    # r ↦ r + (r U) diag((λ̂_ℓ + μ)/(λ̂ + μ) − 1) Uᵀ: the module doc's M⁻¹, applied without forming it
    scale = ((lam[-1] + op.shift) / (lam + op.shift) - 1).to(op.dtype)
    basis = u

    def apply(r: torch.Tensor) -> torch.Tensor:
        return r + ((r @ basis) * scale) @ basis.T

    apply.basis = basis  # type: ignore[attr-defined]
    apply.eigenvalues = lam  # type: ignore[attr-defined]
    return apply


__all__ = ["NYSTROM_RANK", "nystrom_preconditioner", "nystrom_sketch"]
