"""The ``lissa`` solver: x = A⁻¹ b by the LiSSA recursion, deterministic and full-batch.

A = C + (λ+δ) I is a :class:`.curvature.CurvatureOperator`. LiSSA (Agarwal, Bullins & Hazan 2017,
used for influence functions by Koh & Liang 2017) writes A⁻¹ = (1/s) Σ_i (I − A/s)^i, a Neumann series
that converges when 0 < A < 2s I, and sums it by the recursion

    x_0 = b,   x_{j+1} = b + (I − A/s) x_j,   estimate y_j = x_j / s.

The original draws a mini-batch Hessian per step; here ``op.matvec`` is the full-data product, so
the recursion is deterministic: it is Richardson iteration y_{j+1} = y_j + (b − A y_j)/s, i.e. a
truncated Neumann series. Its one product A x_j per step also gives the TRUE residual of y_j for free,
r_j = b − A x_j / s (= x_{j+1} − x_j), so every column is checked against ‖r_j‖ ≤ tol·‖b‖ at every
step without extra products, like every other solver, and stops on its own.

Convergence: r_j = (I − A/s)^j b, so ‖r_j‖ ≤ max(|1 − λ_min/s|, |1 − λ_max/s|)^j ‖b‖ and, with
s ≥ λ_max, (1 − λ_min/s)^j ‖b‖ with λ_min ≥ λ+δ: about (s/λ_min)·ln(1/tol) steps, slow for small
damping, where CG needs about ½√(λ_max/λ_min)·ln(2/tol). LiSSA is here as the reference method of the
influence-function literature and as a check on CG, not as the faster solver.

The scale s: ``scale=`` in ``solver_options``, or SCALE_SAFETY × an estimate of λ_max(A) by
POWER_ITERATIONS power iterations (seeded). The estimate ‖A v‖ (v the normalised iterate) never
exceeds λ_max for a positive semi-definite A, so it needs the safety factor to make s ≥ λ_max; and the
recursion still converges (at the rate above) for any s > λ_max/2, i.e. for an estimate down to
λ_max/(2·SCALE_SAFETY). For s ≤ λ_max/2 (or an indefinite A: an undamped Hessian) the residual grows;
since it cannot grow while the recursion converges (I − A/s has spectral radius < 1 and is symmetric),
a column whose residual exceeds ‖b‖ is stopped and reported as diverged.
"""

from __future__ import annotations

import torch

from ..validation import check_number, check_positive_int
from .curvature import CurvatureOperator
from .iteration import Events, column_steps, describe, stop_columns

POWER_ITERATIONS = 20  # products spent on λ_max; small next to the (s/λ_min)·ln(1/tol) steps LiSSA takes
# ×1.2 covers an estimate down to λ_max/1.2 in the Neumann regime (s ≥ λ_max), and the recursion still
# converges for an estimate down to λ_max/2.4; it costs 20% more steps than s = λ_max exactly.
SCALE_SAFETY = 1.2
# ‖r_j‖ > DIVERGED·‖b‖ proves divergence (‖r_j‖ never increases while the recursion converges); the 1e-3
# leaves room for rounding when b lies along eigenvalues λ ≪ s, where ‖r_j‖ stays at ‖b‖ for a long time.
DIVERGED = 1.001


def estimate_lambda_max(op: CurvatureOperator, *, iterations: int = POWER_ITERATIONS, seed: int = 0) -> float:
    """A lower bound on λ_max(A) (A positive semi-definite): ‖A v‖ after ``iterations`` power steps.

    v starts as a standard normal [1, P] drawn on the CPU from a generator seeded with ``seed`` (the
    same start on every device). ‖A v_k‖ (v_k = A^k v_0 / ‖A^k v_0‖) is at least the Rayleigh quotient
    v_kᵀA v_k, non-decreasing in k and at most the spectral radius. Returns 0.0 for A = 0.
    """
    iterations = check_positive_int(iterations, "power_iterations")
    gen = torch.Generator().manual_seed(check_positive_int(seed, "seed", minimum=0))
    v = torch.randn(1, op.num_params, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iterations):
        w = op.matvec(v)
        estimate = float(w.norm())
        if estimate == 0.0:
            return 0.0
        v = w / estimate
    return estimate


def lissa_scale(op: CurvatureOperator, scale: float | None = None, *, power_iterations: int = POWER_ITERATIONS,
                seed: int = 0) -> float:
    """The scale s of the recursion: ``scale`` itself when given, else SCALE_SAFETY × the λ_max estimate."""
    power_iterations = check_positive_int(power_iterations, "power_iterations")
    seed = check_positive_int(seed, "seed", minimum=0)
    if scale is not None:
        return check_number(scale, "scale", low=0.0, low_open=True)
    estimate = estimate_lambda_max(op, iterations=power_iterations, seed=seed)
    if estimate == 0.0:
        raise ValueError("the curvature operator is zero (A v = 0 along the power iterations): there is no "
                         "system to solve; raise damping")
    return SCALE_SAFETY * estimate


def lissa(op: CurvatureOperator, b: torch.Tensor, *, tol: float, max_iter: int, progress: bool,
          scale: float | None = None, power_iterations: int = POWER_ITERATIONS, seed: int = 0
          ) -> tuple[torch.Tensor, int, list[str]]:
    """X [K, P] with A X_kᵀ ≈ B_kᵀ for b = B [K, P] by the recursion of the module doc.

    ``scale``, ``power_iterations``, ``seed``: see :func:`lissa_scale` (``solver_options`` of
    :func:`.solvers.solve`). Returns (X, steps of the recursion (one product each; the power
    iterations come on top when ``scale`` is None), problems met).
    """
    s = lissa_scale(op, scale, power_iterations=power_iterations, seed=seed)
    y, r = torch.zeros_like(b), b.clone()  # y_0 = 0 with r_0 = b: the first step gives y_1 = b/s (x_0 = b)
    bnorm = b.norm(dim=1)
    rnorm = bnorm.clone()
    active = bnorm > 0  # b_k = 0 has the exact answer x_k = 0
    diverged: Events = {}
    it = 0
    for it, idx in column_steps(active, max_iter, "lissa", progress, lambda: rnorm / bnorm.clamp_min(1e-300)):
        y[idx] += r[idx] / s
        r[idx] = b[idx] - op.matvec(y[idx])  # the true residual of the new estimate, from the step's one product
        rnorm[idx] = r[idx].norm(dim=1)
        relative = rnorm[idx] / bnorm[idx]
        stop_columns(active, idx, relative > DIVERGED, diverged, it, relative)
        active[idx[relative <= tol]] = False
    problems = []
    if diverged:
        problems.append(f"lissa diverged: {describe(diverged, '‖r‖/‖b‖')}; scale={s:.3g} is at most λ_max(A)/2 or A is not positive "
                        "definite (an undamped Hessian): pass a larger solver_options={'scale': ...}, raise damping, "
                        "or use curvature='ggn' or solver='cg'")
    if bool(active.any()):
        stuck = active.nonzero().squeeze(1)
        worst = float((rnorm[stuck] / bnorm[stuck]).max())
        problems.append(f"lissa did not converge within max_iter={max_iter} for rhs {stuck.tolist()} (relative "
                        f"residual {worst:.3g}): its residual shrinks like (1 − λ_min/scale)^j with scale={s:.3g} "
                        f"and λ_min ≥ λ+δ = {op.shift:g}, slowly for small damping; use solver='cg' "
                        "(or raise max_iter or damping)")
    return y, it, problems


lissa.options = ("scale", "power_iterations", "seed")  # type: ignore[attr-defined]  # keys of solver_options

__all__ = ["POWER_ITERATIONS", "SCALE_SAFETY", "estimate_lambda_max", "lissa", "lissa_scale"]
