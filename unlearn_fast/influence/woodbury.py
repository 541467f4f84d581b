"""Exact direct solve of the damped empirical Fisher by the Woodbury identity.

For ``kind="fisher"`` the operator is A = (1/N) JᵀJ + s I, with J [N, P] the per-sample gradients
(rows g_i = ∇ℓ_i) and s = λ + δ = ``op.shift`` > 0. Then

    A⁻¹ b = (1/s) (b − Jᵀ (N s I + J Jᵀ)⁻¹ J b),

an [N, N] system in place of a [P, P] one, exact up to rounding. J is never built: each batch's layer
factors are captured once (:func:`.per_sample.capture_factors`), and from them come

    J Jᵀ   block by block over pairs of batches   (:func:`.per_sample.factors_gram`, ghost forms per layer)
    J b    per batch                               (:func:`.per_sample.factors_dots`)
    Jᵀ y   per batch, as (diag(y)G)ᵀA              (:func:`.per_sample.factors_weighted_sum`)

Cost: one forward/backward pass over the data, the Gram (about N²·Σ_layers(d_in + d_out) multiply-adds
for plain Linear layers), one float64 Cholesky of [N, N] (N³/3) and two cheap passes over the cached
factors. Memory: every batch's factors at once (taken from the operator's cache, which keeps those that
fit CACHE_BYTES for the products that follow) and two float64 [N, N] matrices (the Gram and its Cholesky factor),
hence the cap ``WOODBURY_MAX_SAMPLES``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .curvature import CurvatureOperator
from .per_sample import Factors, factors_dots, factors_gram, factors_weighted_sum
from .vectors import as_dict, as_flat

# The Gram and its Cholesky factor are two float64 [N, N]: 6.4 GB at this N.
WOODBURY_MAX_SAMPLES = 20_000
# Rounds of iterative refinement (each one Fisher product) while a column's residual is above tol.
REFINEMENTS = 3


def _check_operator(op: CurvatureOperator) -> None:
    if op.kind != "fisher":
        raise ValueError(f"solver='woodbury' solves kind='fisher' only (the empirical Fisher (1/N) JᵀJ), "
                         f"got kind={op.kind!r}; valid choice: 'fisher', or use solver='cg' for {op.kind!r}")
    if op.shift <= 0:
        raise ValueError(f"solver='woodbury' needs weight_decay + damping > 0, got {op.shift:g}: (1/N) JᵀJ has rank "
                         f"at most N={op.n}, so it is singular whenever N < P={op.num_params}; set damping > 0")
    if op.n > WOODBURY_MAX_SAMPLES:
        gb = 2 * 8 * op.n ** 2 / 1e9
        raise ValueError(f"solver='woodbury' factors an N×N float64 Gram; N={op.n} is above WOODBURY_MAX_SAMPLES="
                         f"{WOODBURY_MAX_SAMPLES} (it would need about {gb:.1f} GB): use solver='cg'")


def _rows_of(op: CurvatureOperator) -> list[slice]:
    return [slice(s, min(s + op.batch_size, op.n)) for s in range(0, op.n, op.batch_size)]


def _gram(factors: list[Factors], rows: list[slice], n: int, progress: bool) -> torch.Tensor:
    """J Jᵀ [N, N] in float64 from the batches' factors: the upper block triangle, mirrored."""
    device = factors[0].captured.losses.device
    gram = torch.empty(n, n, dtype=torch.float64, device=device)
    pairs = [(p, q) for p in range(len(factors)) for q in range(p, len(factors))]
    for p, q in tqdm(pairs, desc="woodbury Gram", disable=not progress, leave=False):
        block = factors_gram(factors[p], factors[q], dtype=torch.float64)
        if p == q:  # AAᵀ ⊙ GGᵀ is symmetric only up to rounding; Cholesky reads one triangle
            block = (block + block.T) / 2
        else:
            gram[rows[q], rows[p]] = block.T
        gram[rows[p], rows[q]] = block
    return gram


def woodbury_solver(op: CurvatureOperator, b: torch.Tensor, *, tol: float, max_iter: int,
                    progress: bool) -> tuple[torch.Tensor, int, list[str]]:
    """X [K, P] with (C + s I) X_kᵀ = B_kᵀ for the empirical Fisher C of ``op``, B = ``b`` [K, P] (flat, op's dtype).

    Direct and exact up to rounding (float64 Gram and Cholesky; J b and Jᵀ y in the model's dtype,
    summed in float64), then up to REFINEMENTS rounds of iterative refinement while a column's
    relative residual is above ``tol``; ``max_iter`` does not apply and is accepted only for the ``SOLVERS``
    signature. Returns (X [K, P] in ``b``'s dtype, 1 pass over the data, no problems). Raises a
    ValueError for a kind other than "fisher", for s = weight_decay + damping = 0, for
    N > WOODBURY_MAX_SAMPLES, and when the Cholesky factorisation fails (rounding at a tiny shift).
    """
    _check_operator(op)
    as_dict(b, op.params)  # validates [K, P]
    rows = _rows_of(op)
    factors = [op.batch_factors(r.start) for r in rows]  # shared with the operator's products (the final residual)
    gram = _gram(factors, rows, op.n, progress)
    gram.diagonal().add_(op.n * op.shift)
    chol, info = torch.linalg.cholesky_ex(gram)
    del gram  # peak memory: two [N, N] only while factorising
    if int(info) != 0:
        raise ValueError(f"the Woodbury system N·s·I + J Jᵀ (N={op.n}, s={op.shift:g}) is not positive definite in "
                         "float64 (rounding at a tiny shift): raise damping or use solver='cg'")

    def apply(r: torch.Tensor) -> torch.Tensor:
        """(1/s)(r − Jᵀ (N s I + J Jᵀ)⁻¹ J r) for r [K, P]: J r and Jᵀ y summed in float64."""
        jr = torch.cat([factors_dots(f, as_dict(r, op.params)) for f in factors]).double()  # [N, K]
        y = torch.cholesky_solve(jr, chol)
        jty = {n: torch.zeros(r.shape[0], *p.shape, dtype=torch.float64, device=r.device) for n, p in op.params.items()}
        for f, rows_f in zip(factors, rows):
            for name, part in factors_weighted_sum(f, y[rows_f], op.params).items():
                jty[name] += part
        return (r.double() - as_flat(jty, op.params)) / op.shift

    x = apply(b)
    # The factors are in the model's dtype, so in float32 J r and Jᵀ y carry ~1e-7 relative rounding that
    # the 1/s scaling amplifies (measured residual 1.0e-4 on the digits MLP at s = 1e-3). Iterative
    # refinement with the same Cholesky factor removes it: each round costs one product (cached factors).
    bnorm = b.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(REFINEMENTS):
        residual = b.double() - op.matvec(x.to(b.dtype)).double()
        if bool((residual.norm(dim=1) <= tol * bnorm).all()):
            break
        x = x + apply(residual.to(b.dtype))
    if not torch.isfinite(x).all():
        raise ValueError("the Woodbury solution is non-finite: the per-sample gradients overflow (use float64)")
    return x.to(b.dtype), 1, []


__all__ = ["WOODBURY_MAX_SAMPLES", "woodbury_solver"]
