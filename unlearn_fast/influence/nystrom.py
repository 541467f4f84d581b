"""The randomized Nyström preconditioner for CG (``preconditioner="nystrom"``).

A = C + μ I as in :mod:`.curvature` (μ = λ + δ, weight decay plus damping). A rank-ℓ sketch of C,

    Ω [P, ℓ] orthonormal (QR of a seeded Gaussian),  Y = C Ω  (ℓ products, batched 16 at a time),
    Ĉ = Y (Ωᵀ Y)⁺ Yᵀ = U diag(λ̂) Uᵀ                (U [P, ℓ] orthonormal, λ̂ descending, ≥ 0),

gives the preconditioner of Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning",
SIAM J. Matrix Anal. Appl. 44(2):

    M⁻¹ = (λ̂_ℓ + μ) U diag(1 / (λ̂ + μ)) Uᵀ + (I − U Uᵀ).

It maps the sketched top of C's spectrum onto about λ̂_ℓ + μ and leaves the complement alone, so the
preconditioned spectrum lies in roughly [μ / (λ_ℓ + μ), 1]: CG then needs about √((λ_ℓ + μ)/μ)
iterations instead of √((λ_1 + μ)/μ). Unlike the Kronecker and diagonal preconditioners, it keeps the
cluster of eigenvalues at μ that an over-parameterised net's C has (its rank is at most N·outputs):
on the digits MLP of benchmarks/test_bench_cg.py (P = 85k, μ = 1e-3) those raised the GGN's CG
iterations from 175 to 472–481, while deflating K-FAC's own top eigen-directions (an eigenvalue
floor on K-FAC) made them 189–480 too: K-FAC's top eigenvectors are not C's.

The sketch is computed stably (Tropp, Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", NeurIPS): the core Ωᵀ Y (formed in the operator's
dtype) is shifted by ν I before its Cholesky factor L (in float64), Y by ν Ω, and ν is taken off the
eigenvalues again. ν = eps·√P·(‖Y‖_F + μ) covers the rounding of Y: a P-term sum per entry, plus
the μ Ω taken off (C + μ I) Ω, which dominates when μ ≫ ‖C‖. If the shifted core is still not
positive definite, ν grows tenfold, twice, before the curvature is declared indefinite.

Cost: ℓ products before CG starts (not counted in its iterations, as for the other preconditioners);
about 5·P·ℓ floats of the operator's dtype at the peak (Ω, Y, Y L⁻ᵀ, U and the SVD's workspace;
measured 311 MiB at P = 506k, ℓ = 32), so restrict ``layers`` on large models; two [k, P] × [P, ℓ]
products per application. Measured (benchmarks/RESULTS.md): the GGN solve of the CG benchmark 1.8–2.1× faster
(175 → 52–55 iterations plus 32 sketch products), the default digits ``influence_unlearn`` 1.35×
(72 → 24). The sketch's products come 16 at a time, so a GGN operator serves them in its factored
form (:mod:`.ggn_factors`): the 32 took 322–340 ms there against 479–520 ms linearised (warm), of which
about 100 ms is the QR, triangular solve and SVD above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..validation import check_int_in, check_positive_int
from .curvature import CurvatureOperator, check_psd_with_shift

# Rank of the sketch. On the digits MLP (N = 1,437, P = 85k, μ = 1e-3, the GGN; benchmarks/RESULTS.md),
# CG took 175 plain iterations and 128, 79, 60, 52, 41, 34 with ℓ = 8, 16, 24, 32, 48, 64: the whole
# solve took 1.00–1.08 s for ℓ = 16–48 (1.95 s plain, 1.45 s at ℓ = 8, 1.40 s at ℓ = 64).
NYSTROM_RANK = 32
SKETCH_CHUNK = 16  # vectors per batched product: bounds the vmapped activations like a K = 16 solve
SHIFT_RETRIES = 3  # ν, 10ν, 100ν before the core is declared not positive definite


def nystrom_sketch(op: CurvatureOperator, *, rank: int = NYSTROM_RANK, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [P, ℓ] orthonormal, λ̂ [ℓ] descending ≥ 0) with U diag(λ̂) Uᵀ ≈ C, the curvature of ``op``
    without its shift μ. U has the operator's dtype, λ̂ is float64. ``rank`` ℓ is capped at P."""
    rank = min(check_positive_int(rank, "rank"), op.num_params)
    seed = check_int_in(seed, "seed", 0, 2**63 - 1)
    gen = torch.Generator(device=op.device).manual_seed(seed)
    omega = torch.linalg.qr(torch.randn(op.num_params, rank, generator=gen, device=op.device, dtype=op.dtype))[0]
    y = torch.empty_like(omega)
    for s in range(0, rank, SKETCH_CHUNK):
        block = omega[:, s:s + SKETCH_CHUNK].T.contiguous()
        y[:, s:s + SKETCH_CHUNK] = (op.matvec(block) - op.shift * block).T  # op gives (C + μ I) v: take μ v off
    # Rounding in Y is about eps·√P·‖(C + μI)Ω‖ (a P-term sum per entry, plus the μ taken off): a core
    # Ωᵀ Y of a C with rank below ℓ is otherwise indefinite by that much (measured: float32 GGNs of 2–3
    # samples and Fishers of ≤ 5 at ℓ = 32 failed with ν = eps·‖Y‖).
    nu = torch.finfo(op.dtype).eps * op.num_params ** 0.5 * (float(y.norm()) + op.shift)
    core = (omega.T @ y).double()
    core = (core + core.T) / 2
    eye = torch.eye(rank, dtype=torch.float64, device=op.device)
    for _ in range(SHIFT_RETRIES):
        chol, info = torch.linalg.cholesky_ex(core + nu * eye)
        if int(info) == 0:
            break
        nu *= 10
    else:
        raise ValueError(f"the Nyström sketch's core Ωᵀ C Ω is not positive definite even shifted by {nu / 10:.3g}: "
                         f"the curvature '{op.kind}' is not positive semi-definite to {op.dtype} precision "
                         "(a Hessian never is in general); use curvature='ggn' or 'fisher', float64, or a smaller rank")
    y.add_(omega, alpha=nu)  # Y_ν = Y + νΩ, so that Ωᵀ Y_ν = core + νI = L Lᵀ
    del omega
    b = torch.linalg.solve_triangular(chol.to(op.dtype), y.T, upper=False).T  # Y_ν L⁻ᵀ, [P, ℓ]
    del y
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return u, (sigma.double().square() - nu).clamp_min(0)


def nystrom_preconditioner(op: CurvatureOperator, *, rank: int = NYSTROM_RANK, seed: int = 0,
                           progress: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """r [K, P] ↦ M⁻¹ r (module doc) for preconditioned CG on ``op``; SPD for μ > 0.

    The returned function carries ``.basis`` U [P, ℓ] and ``.eigenvalues`` λ̂ [ℓ] of the sketch.
    ``progress`` is accepted for the builders' common signature (the sketch is ⌈ℓ/16⌉ products).
    """
    check_psd_with_shift(op, "preconditioner='nystrom'", "M⁻¹ divides by λ̂ + μ, and λ̂ is 0 beyond C's rank")
    u, lam = nystrom_sketch(op, rank=rank, seed=seed)
    # r ↦ r + (r U) diag((λ̂_ℓ + μ)/(λ̂ + μ) − 1) Uᵀ: the module doc's M⁻¹, applied without forming it
    scale = ((lam[-1] + op.shift) / (lam + op.shift) - 1).to(op.dtype)

    def apply(r: torch.Tensor) -> torch.Tensor:
        return r + ((r @ u) * scale) @ u.T

    apply.basis = u  # type: ignore[attr-defined]
    apply.eigenvalues = lam  # type: ignore[attr-defined]
    return apply


__all__ = ["NYSTROM_RANK", "nystrom_preconditioner", "nystrom_sketch"]
