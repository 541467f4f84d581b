"""Inverse curvature solves: x = (C + (λ+δ) I)⁻¹ b for one or several right-hand sides.

A = C + (λ+δ) I is the [P, P] curvature operator of :mod:`.curvature` (never formed, except by
``exact``). The right-hand sides b_1..b_K come as one vector in either form (flat [P] / [K, P] or dict
name → [*shape] / [K, *shape]); internally they are B [K, P] and the solution X [K, P] satisfies
A X_kᵀ = B_kᵀ for each k; it is returned in the form of ``rhs``.

Solvers (registry ``SOLVERS``: name → fn(op, B [K, P], *, tol, max_iter, progress, **options) → (X [K, P],
operator products used, problems found); a new solver is one entry, and the keyword options it takes
beyond these (``fn.options``, a tuple of names) come through ``solver_options``):

- ``cg``: conjugate gradient, batched over the K columns, each with its own α_k = r_kᵀr_k / p_kᵀAp_k and
  β_k. A column stops when ‖r_k‖ ≤ tol·‖b_k‖ holds for the recursive residual AND for the true one,
  b_k − A x_k (one more product); if only the recursion met it, the column restarts from the true
  residual (at most MAX_REPLACEMENTS times). The others keep going, and only the active columns are
  multiplied by A. CG needs A positive definite: p_kᵀAp_k ≤ 0 proves A indefinite (an undamped Hessian)
  and stops that column.
- ``lissa`` (:mod:`.lissa`): the LiSSA recursion x_{j+1} = b + (I − A/s) x_j, x = x_j/s, full-batch,
  i.e. Richardson iteration / a truncated Neumann series; s from power iterations on A unless given.
  Each column stops when its true residual (free from the step's product) is ≤ tol. Converges like
  (1 − λ_min/s)^j: slowly for small damping, where cg is much faster. ``solver_options``: ``scale``,
  ``power_iterations``, ``seed``.
- ``exact``: A formed densely, column chunks at a time (A e_j for EXACT_CHUNK unit vectors per product),
  symmetrised, and solved in float64 (Cholesky; LU when A is not positive definite).
- ``woodbury`` (:mod:`.woodbury`, ``curvature="fisher"`` only): exact direct solve through the [N, N]
  Gram of the per-sample gradients, (1/s)(b − Jᵀ(N s I + J Jᵀ)⁻¹ J b); for N up to about 20k samples
  it beats cg when N ≪ P (one data pass, one float64 Cholesky, then iterative refinement to tol).
- ``kfac`` / ``ekfac`` (:mod:`.kfac`): direct APPROXIMATE solves with a block-diagonal Kronecker-factored
  curvature (eigenvalue-corrected for ekfac), built in one pass over the data (two for ekfac); tol and
  max_iter do not apply. Such a solver carries ``approximate = True``: its true residual measures the
  approximation error, not convergence, so it is reported (``SolveResult.approximate``) but neither
  warned about nor held against ``converged``.

``preconditioner="kfac"`` / ``"ekfac"`` (``solver="cg"`` only) runs preconditioned CG with
(M + (λ+δ) I)⁻¹ from :func:`.kfac.kronecker_preconditioner` (for the Hessian, M estimates the GGN);
``preconditioner="diagonal"`` with the Jacobi r ↦ r / (diag(C) + λ + δ) of
:func:`.preconditioners.diagonal_preconditioner` (diag(C) exact for the Fisher and for the GGN of a
model with few outputs, Hutchinson's estimate otherwise); ``preconditioner="nystrom"`` with the
randomized Nyström preconditioner of :mod:`.nystrom` (a rank-32 sketch of C from 32 products; it
keeps the eigenvalue cluster at λ + δ that the other three spread, and halved the GGN solve of the
CG benchmark); ``preconditioner="woodbury"`` with the Woodbury inverse of the curvature's ``rank``
heaviest pseudo-samples (:func:`.woodbury.woodbury_preconditioner`, ``fisher`` and ``ggn`` only: the GGN
needs a per-layer rule for every parameter): on the CG benchmark's GGN 10 iterations instead of 175,
6× faster than dattri. Building a preconditioner costs products or data passes not counted in ``iterations``.

Whatever the solver, the reported residuals ‖b_k − A x_k‖ / ‖b_k‖ come from one fresh product at the
end: the true residual, not CG's recursive estimate (which drifts from it under rounding).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import Loss
from ..validation import check_choice, check_number, check_positive_int
from .curvature import CURVATURES, CurvatureOperator, Data
from .iteration import Events, column_steps, describe, stop_columns
from .kfac import ekfac_solver, kfac_solver, kronecker_preconditioner
from .lissa import lissa
from .nystrom import nystrom_preconditioner
from .preconditioners import diagonal_preconditioner
from .vectors import Vector, VectorForm, as_dict, as_flat
from .woodbury import woodbury_preconditioner, woodbury_solver

EXACT_MAX_PARAMS = 10_000  # a dense float64 [P, P] is 0.8 GB at 10k, and the solve copies it about twice
NEGATIVE_CURVATURE = "negative curvature met"  # how cg reports pᵀAp ≤ 0 (SolveResult.indefinite)
MAX_REPLACEMENTS = 3  # cg restarts from the true residual at most this often per column (a rounding floor)
EXACT_CHUNK = 64  # unit vectors per product while forming A: bounds the vmapped K × batch activations


class SolverWarning(RuntimeWarning):
    """A solve that did not reach its tolerance (max_iter hit, negative curvature, rounding floor)."""


@dataclass
class SolveResult:
    """The outcome of :func:`solve`.

    solution: x in the form of ``rhs``. relative_residual: max_k ‖b_k − A x_k‖/‖b_k‖ from a fresh
    product. residuals: the same per right-hand side (absolute ‖A x_k‖ for b_k = 0). iterations: CG
    iterations, for ``lissa`` the steps of the recursion (one product each, plus the power iterations
    that set its scale), for ``exact`` the operator products used to form A, for ``kfac``/``ekfac`` the passes
    over the data. converged: every residual ≤ tol and no problem met; for an ``approximate`` solver
    (kfac, ekfac) no problem met: its residual is the approximation error against the exact curvature
    and tol does not apply. message: what happened, in words. residual: the vectors b_k − A x_k themselves.
    """

    solution: Vector
    relative_residual: float
    residuals: list[float]
    iterations: int
    converged: bool
    solver: str
    seconds: float
    message: str
    approximate: bool = False
    residual: torch.Tensor | None = None  # rhs − A x from that product, flat [K, P] in the operator's dtype
    indefinite: bool = False  # cg met pᵀAp ≤ 0: A is not positive definite (its x is a truncated solve)


Outcome = tuple[torch.Tensor, int, list[str]]  # X [K, P], operator products or iterations, problems met
Solver = Callable[..., Outcome]


def _cg(op: CurvatureOperator, b: torch.Tensor, *, tol: float, max_iter: int, progress: bool,
        precondition: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Outcome:
    """(Preconditioned) CG; ``precondition``: r [k, P] ↦ M⁻¹ r for an SPD M (None: M = I)."""
    def pre(t: torch.Tensor) -> torch.Tensor:
        return t if precondition is None or t.shape[0] == 0 else precondition(t)

    x, r = torch.zeros_like(b), b.clone()
    z = pre(r)
    p, rs = z.clone(), (r * z).sum(dim=1)  # rs = rᵀ M⁻¹ r (= rᵀr without a preconditioner)
    bnorm = b.norm(dim=1)
    active = bnorm > 0  # b_k = 0 has the exact answer x_k = 0
    negative: Events = {}
    replaced = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    last_true = torch.full((b.shape[0],), float("inf"), dtype=b.dtype, device=b.device)  # ‖b − Ax‖ at the last check
    it = 0
    for it, idx in column_steps(active, max_iter, "cg", progress, lambda: r.norm(dim=1) / bnorm.clamp_min(1e-300)):
        ap = op.matvec(p[idx])
        pap = (p[idx] * ap).sum(dim=1)
        ok = pap > 0
        stop_columns(active, idx, ~ok, negative, it, pap)  # A is not positive definite along p_j
        idx, ap, pap = idx[ok], ap[ok], pap[ok]
        alpha = (rs[idx] / pap).unsqueeze(1)
        x[idx] += alpha * p[idx]
        r[idx] -= alpha * ap
        z = pre(r[idx])
        rs_new = (r[idx] * z).sum(dim=1)
        p[idx] = z + (rs_new / rs[idx]).unsqueeze(1) * p[idx]
        rs[idx] = rs_new
        done = idx[r[idx].norm(dim=1) <= tol * bnorm[idx]]
        if done.numel():
            _confirm_or_replace(op, b, x, r, p, rs, active, done, replaced, last_true, tol * bnorm, pre)
    problems = []
    if negative:
        problems.append(f"{NEGATIVE_CURVATURE}: {describe(negative, 'pᵀAp')}; the curvature is indefinite there: "
                        "raise damping or use curvature='ggn'")
    if bool(active.any()):
        problems.append(f"cg did not converge within max_iter={max_iter} for rhs {active.nonzero().squeeze(1).tolist()}: "
                        "raise max_iter or damping, or loosen tol")
    return x, it, problems


def _confirm_or_replace(op: CurvatureOperator, b: torch.Tensor, x: torch.Tensor, r: torch.Tensor, p: torch.Tensor,
                        rs: torch.Tensor, active: torch.Tensor, done: torch.Tensor, replaced: torch.Tensor,
                        last_true: torch.Tensor, bound: torch.Tensor, pre: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Columns ``done`` met tol by CG's recursive residual: stop those whose TRUE residual b − Ax (one
    product, not counted in the iterations) meets it too. The others restart from their true residual
    (residual replacement, as in van der Vorst & Ye 2000): the recursion drifts from b − Ax under
    rounding, and on the default study stopped three solves at a true residual of 1.00–1.05e-4 against
    tol 1e-4. A column is given up (left to the caller's true-residual check, which reports the floor)
    after MAX_REPLACEMENTS restarts, or as soon as a restart did not at least halve its true residual:
    a rounding floor, where more restarts only discard CG's history (review measured 2–3× the
    iterations for the same final residual without this rule)."""
    true_r = b[done] - op.matvec(x[done])
    true_norm = true_r.norm(dim=1)
    met = true_norm <= bound[done]
    give_up = (replaced[done] >= MAX_REPLACEMENTS) | (true_norm > 0.5 * last_true[done])
    last_true[done] = true_norm
    active[done[met | give_up]] = False
    again = ~(met | give_up)
    if bool(again.any()):
        cols = done[again]
        replaced[cols] += 1
        r[cols] = true_r[again]
        z = pre(r[cols])
        p[cols] = z
        rs[cols] = (r[cols] * z).sum(dim=1)


def _exact(op: CurvatureOperator, b: torch.Tensor, *, tol: float, max_iter: int, progress: bool,
           prepared: dict | None = None) -> Outcome:
    size = op.num_params
    if size > EXACT_MAX_PARAMS:
        raise ValueError(f"solver='exact' forms a dense {size}×{size} matrix; P={size} is above EXACT_MAX_PARAMS="
                         f"{EXACT_MAX_PARAMS}: use solver='cg' (or restrict layers=)")
    starts = range(0, size, EXACT_CHUNK)
    curvature = None if prepared is None else prepared.get("exact")
    products = 0
    if curvature is None:  # C without its shift, kept in ``prepared`` for solves at other dampings
        curvature = torch.empty(size, size, dtype=torch.float64, device=op.device)
        for s in tqdm(starts, desc="forming A", disable=not progress, leave=False):
            k = min(EXACT_CHUNK, size - s)
            units = torch.zeros(k, size, dtype=op.dtype, device=op.device)
            units[torch.arange(k), torch.arange(s, s + k)] = 1
            curvature[s:s + k] = op.matvec(units).double()  # rows A e_j = columns of A (A symmetric)
        curvature = (curvature + curvature.T) / 2  # removes the rounding asymmetry so that Cholesky sees a symmetric matrix
        curvature.diagonal().sub_(op.shift)
        products = len(starts)
        if prepared is not None:
            prepared["exact"] = curvature
    a = curvature + op.shift * torch.eye(size, dtype=torch.float64, device=op.device)
    rhs = b.double().T
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, chol)
    else:  # not positive definite (an undamped Hessian): LU still solves a non-singular A
        x, info = torch.linalg.solve_ex(a, rhs)
        if int(info) != 0 or not torch.isfinite(x).all():
            raise ValueError("the curvature matrix is singular: raise damping (or weight_decay)")
    return x.T.to(b.dtype), products, []


_exact.reuses = True  # type: ignore[attr-defined]  # takes ``prepared`` (see solve_operator)


SOLVERS: dict[str, Solver] = {"cg": _cg, "exact": _exact, "kfac": kfac_solver, "ekfac": ekfac_solver, "lissa": lissa,
                              "woodbury": woodbury_solver}
# What a solver's count means in messages (default: operator products).
_COUNT_UNITS = {"cg": "iterations", "lissa": "iterations", "woodbury": "data passes"}
# Iterative solvers that start from x0 (solve_operator's warm start); the others are direct.
WARM_STARTS = ("cg", "lissa")
# preconditioner name → (builder(op, progress, **options) → r [K, P] ↦ M⁻¹ r, the options it takes), for cg
_PRECONDITIONER_BUILDERS: dict[str, tuple[Callable[..., Callable[[torch.Tensor], torch.Tensor]], tuple[str, ...]]] = {
    "kfac": (lambda op, progress, **o: kronecker_preconditioner(op, eigen_correct=False, progress=progress, **o),
             ("samples", "seed")),
    "ekfac": (lambda op, progress, **o: kronecker_preconditioner(op, eigen_correct=True, progress=progress, **o),
              ("samples", "seed")),
    "diagonal": (lambda op, progress, **o: diagonal_preconditioner(op, progress=progress, **o), ("probes", "seed")),
    "nystrom": (lambda op, progress, **o: nystrom_preconditioner(op, progress=progress, **o), ("rank", "seed")),
    "woodbury": (lambda op, progress, **o: woodbury_preconditioner(op, progress=progress, **o), ("rank",)),
}
PRECONDITIONERS = tuple(_PRECONDITIONER_BUILDERS)


def _check_options(options: dict | None, valid: tuple[str, ...], what: str, owner: str, name: str) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{what} must be a dict of keyword options or None, got {type(options).__name__}")
    bad = [k for k in options if k not in valid]
    if bad:
        raise ValueError(f"{what} key(s) {bad} not accepted by {owner}; valid keys: "
                         f"{', '.join(map(repr, valid)) if valid else f'none ({name} takes no options)'}")
    return dict(options)


def check_solver_arguments(solver: str, preconditioner: str | None, solver_options: dict | None,
                           preconditioner_options: dict | None = None) -> tuple[dict, dict]:
    """Validate the solver, its preconditioner and their options; returns (solver options,
    preconditioner options), new dicts."""
    check_choice(solver, SOLVERS, "solver")
    if preconditioner is not None:
        check_choice(preconditioner, PRECONDITIONERS, "preconditioner")
        if solver != "cg":
            raise ValueError(f"preconditioner={preconditioner!r} works with solver='cg' only, not solver={solver!r}; "
                             "use preconditioner=None")
    elif preconditioner_options:
        raise ValueError(f"preconditioner_options={preconditioner_options!r} given without a preconditioner; "
                         f"valid preconditioners: {', '.join(map(repr, PRECONDITIONERS))}")
    options = _check_options(solver_options, tuple(getattr(SOLVERS[solver], "options", ())), "solver_options",
                             f"solver={solver!r}", solver)
    pre_options = {} if preconditioner is None else _check_options(
        preconditioner_options, _PRECONDITIONER_BUILDERS[preconditioner][1], "preconditioner_options",
        f"preconditioner={preconditioner!r}", preconditioner)
    for key, value in pre_options.items():  # every preconditioner option is a count (≥ 1) or a seed (≥ 0)
        check_positive_int(value, f"preconditioner_options[{key!r}]", minimum=0 if key == "seed" else 1)
    return options, pre_options


def solve_operator(op: CurvatureOperator, rhs: Vector, *, solver: str = "cg", tol: float = 1e-4, max_iter: int = 500,
                   progress: bool = False, preconditioner: str | None = None,
                   solver_options: dict | None = None, preconditioner_options: dict | None = None,
                   x0: Vector | None = None, prepared: dict | None = None) -> SolveResult:
    """Solve op(x) = rhs with an already built :class:`CurvatureOperator` (reuse it across solves).

    ``solver_options``: extra keyword options of the solver (``lissa``: ``scale``, ``power_iterations``,
    ``seed``); ``preconditioner_options`` those of the preconditioner (``nystrom``: ``rank``, ``seed``;
    ``woodbury``: ``rank``; ``kfac``/``ekfac``: ``samples``, ``seed``; ``diagonal``: ``probes``, ``seed``).
    A key that is not taken raises, naming the valid ones.

    Solving one linearisation at several dampings (``op.set_damping``), as the trust region of
    ``influence_unlearn`` does: ``x0`` (the rhs' form) starts the iterative solvers (WARM_STARTS) there,
    solving for the correction A y = rhs − A x0 to tol·‖rhs‖; ``prepared``, a dict the caller keeps,
    holds what a solve built that does not depend on the damping (the preconditioner, the dense C of
    ``exact``, the Kronecker factors of ``kfac``/``ekfac``) for the next solve to reuse. It is valid for
    one state of the parameters: the caller empties it when they change, or keeps it on purpose (a
    preconditioner or Kronecker model from nearby parameters is still a valid one, only a less exact one).
    """
    options, pre_options = check_solver_arguments(solver, preconditioner, solver_options, preconditioner_options)
    tol = check_number(tol, "tol", low=0.0, low_open=True)
    max_iter = check_positive_int(max_iter, "max_iter")
    start = time.perf_counter()
    form = VectorForm(rhs, op.params)
    b = _flat_on(op, rhs)
    if not torch.isfinite(b).all():
        raise ValueError("rhs has non-finite entries")
    if preconditioner is not None:
        key = ("preconditioner", preconditioner)
        if prepared is None or key not in prepared:
            built = _PRECONDITIONER_BUILDERS[preconditioner][0](op, progress, **pre_options)
            if prepared is None:
                options["precondition"] = built
            else:
                prepared[key] = built
        if prepared is not None:
            options["precondition"] = prepared[key]
    if prepared is not None and getattr(SOLVERS[solver], "reuses", False):
        options["prepared"] = prepared
    start_x = _flat_on(op, x0) if x0 is not None and solver in WARM_STARTS else None
    if start_x is None:
        x, iterations, problems = SOLVERS[solver](op, b, tol=tol, max_iter=max_iter, progress=progress, **options)
    else:
        x, iterations, problems = _from_start(op, b, start_x, solver, tol, max_iter, progress, options)
    approximate = bool(getattr(SOLVERS[solver], "approximate", False))
    r = b - op.matvec(x)  # our own true residual, from a fresh product
    bnorm, rnorm = b.norm(dim=1), r.norm(dim=1)
    residuals = torch.where(bnorm > 0, rnorm / bnorm.clamp_min(torch.finfo(b.dtype).tiny), rnorm).tolist()
    worst = max(residuals)
    if worst > tol and not problems and not approximate:  # the solver thought it was done: rounding put a floor above tol
        problems.append(f"the true residual {worst:.3g} is above tol={tol:g} although {solver} met it by its own "
                        f"estimate: rounding ({op.dtype}) limits the accuracy; loosen tol or use float64")
    if approximate:  # a direct approximate solve: the residual is the approximation error, tol does not apply
        converged = not problems
        message = (f"{solver}: approximate direct solve ({iterations} data passes); relative residual {worst:.3g} "
                   f"against the exact {op.kind} curvature is the approximation error, not a convergence failure")
    else:
        converged = not problems and worst <= tol
        unit = _COUNT_UNITS.get(solver, "products")
        message = (f"{solver}{' + ' + preconditioner + ' preconditioner' if preconditioner else ''}: "
                   f"{'converged' if converged else 'NOT converged'}, relative residual {worst:.3g} "
                   f"(tol {tol:g}) after {iterations} {unit}")
    if problems:
        message += "; " + "; ".join(problems)
        warnings.warn(message, SolverWarning, stacklevel=2)
    solution = form.restore(as_dict(x, op.params), op.params)
    return SolveResult(solution=solution, relative_residual=worst, residuals=residuals, iterations=iterations,
                       converged=converged, solver=solver, seconds=time.perf_counter() - start, message=message,
                       approximate=approximate, residual=r,
                       indefinite=any(p.startswith(NEGATIVE_CURVATURE) for p in problems))


def _flat_on(op: CurvatureOperator, v: Vector) -> torch.Tensor:
    """A vector in either form as flat [K, P] on the operator's device and dtype."""
    return as_flat({n: t.to(device=op.device, dtype=op.dtype) for n, t in as_dict(v, op.params).items()}, op.params)


def _from_start(op: CurvatureOperator, b: torch.Tensor, x0: torch.Tensor, solver: str, tol: float, max_iter: int,
                progress: bool, options: dict) -> Outcome:
    """An iterative solve started at x0: the correction y of A y = b − A x0 (one product) to tol·‖b‖; from 0
    instead where x0 is no nearer to the solution than 0 is (‖b − A x0‖ ≥ ‖b‖)."""
    if x0.shape != b.shape or not torch.isfinite(x0).all():
        raise ValueError(f"x0 must be a finite vector shaped like rhs {tuple(b.shape)}, got {tuple(x0.shape)}")
    r0 = b - op.matvec(x0)
    bnorm, rnorm = b.norm(dim=1), r0.norm(dim=1)
    if bool((rnorm >= bnorm).any()):  # no nearer than 0 (a start from another damping can be farther): go cold
        x, iterations, problems = SOLVERS[solver](op, b, tol=tol, max_iter=max_iter, progress=progress, **options)
        return x, iterations + 1, problems
    moving = rnorm > 0
    if not bool(moving.any()):
        return x0, 1, []
    # the strictest column sets the tolerance of the correction (the reported residuals stay against b)
    inner = max(float((tol * bnorm[moving] / rnorm[moving]).min()), float(torch.finfo(b.dtype).eps))
    y, iterations, problems = SOLVERS[solver](op, r0, tol=inner, max_iter=max_iter, progress=progress, **options)
    return x0 + y, iterations + 1, problems


def solve(model: nn.Module, loss: Loss, data: Data, rhs: Vector, *, solver: str = "cg", curvature: str = "ggn",
          weight_decay: float = 0.0, damping: float = 0.0, tol: float = 1e-4, max_iter: int = 500,
          batch_size: int | None = None,
          layers: list[str] | None = None, device: str | torch.device | None = None, progress: bool = False,
          preconditioner: str | None = None, solver_options: dict | None = None,
          preconditioner_options: dict | None = None) -> SolveResult:
    """x = (C + (weight_decay + damping) I)⁻¹ rhs, with C the ``curvature`` of the mean loss over ``data``.

    ``rhs``: flat [P] / [K, P] or dict name → [*shape] / [K, *shape] over ``trainable(model, layers)``;
    ``solution`` has the same form. A solve that does not reach ``tol`` returns ``converged=False``
    with the reason in ``message`` and warns once (:class:`SolverWarning`). ``solver="kfac"`` /
    ``"ekfac"`` solve with the Kronecker approximation instead (``approximate=True`` in the result);
    ``preconditioner="kfac"`` / ``"ekfac"`` preconditions ``solver="cg"`` with it, ``"diagonal"`` with
    the curvature's diagonal (Jacobi). ``solver="lissa"`` runs the LiSSA recursion (slow for small
    damping; for reference). ``preconditioner="nystrom"`` preconditions cg with a randomized low-rank
    sketch of the curvature (:mod:`.nystrom`), ``"woodbury"`` with the exact inverse of the curvature's
    heaviest pseudo-samples (:mod:`.woodbury`; fisher and ggn). ``batch_size=None`` sizes the batches of the curvature
    products by the model's activation memory (:mod:`.curvature`). ``solver_options``: the solver's extra keyword options (``lissa``:
    ``scale``, ``power_iterations``, ``seed``); ``preconditioner_options`` the preconditioner's (see
    :func:`solve_operator`).
    """
    check_solver_arguments(solver, preconditioner, solver_options, preconditioner_options)
    check_choice(curvature, CURVATURES, "curvature")
    check_number(tol, "tol", low=0.0, low_open=True)
    check_positive_int(max_iter, "max_iter")
    op = CurvatureOperator(model, loss, data, kind=curvature, weight_decay=weight_decay, damping=damping,
                           batch_size=batch_size, layers=layers, device=device)
    return solve_operator(op, rhs, solver=solver, tol=tol, max_iter=max_iter, progress=progress,
                          preconditioner=preconditioner, solver_options=solver_options,
                          preconditioner_options=preconditioner_options)


__all__ = ["EXACT_MAX_PARAMS", "PRECONDITIONERS", "WARM_STARTS", "check_solver_arguments", "SOLVERS", "SolveResult", "SolverWarning", "solve",
           "solve_operator"]
