"""The Woodbury identity on per-sample gradient factors: the exact direct solve of the damped empirical
Fisher (``solver="woodbury"``), and the CG preconditioner built from the heaviest (pseudo-)samples of
the Fisher or the GGN (``preconditioner="woodbury"``).

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

The preconditioner (:func:`woodbury_preconditioner`). The GGN is itself such a sum of outer products:
(1/N) Σ_{i,r} g_{i,r} g_{i,r}ᵀ over the N·R pseudo-samples of :mod:`.ggn_factors` (R outputs per
sample; the Fisher is the case R = 1). Keeping the m = ``rank`` of largest ‖g_{i,r}‖ gives

    M = s I + (1/N) J_Sᵀ J_S ≼ A,    M⁻¹ r = (1/s)(r − J_Sᵀ (N s I + J_S J_Sᵀ)⁻¹ J_S r),

an [m, m] Cholesky factor and two passes over m rows of factors per application. As M ≼ A, the
preconditioned spectrum lies in [1, 1 + ‖M^-½ (A − M) M^-½‖]: what the unselected pseudo-samples carry
beyond s. Keeping the columns of largest norm is the length-squared column choice of Frieze, Kannan &
Vempala (2004, J. ACM 51(6)); subsampled-column preconditioners of this kind are FALKON's (Rudi,
Carratino & Rosasco 2017, NeurIPS). On the trained digits MLP of benchmarks/test_bench_cg.py (N·R =
14,370 pseudo-samples, s = 1e-3) the squared norms are concentrated: the top 500 / 1,000 / 2,000 hold
59 / 80 / 92 % of the GGN's trace, and CG needed 18 / 10 / 7 iterations instead of 175 (52 with the
rank-32 Nyström preconditioner); see benchmarks/RESULTS.md. Setting it up costs one pass over the data
(the factors: one forward and one R-fold backward per batch, kept when they fit the operator's cache),
the [m, m] Gram and one float64 Cholesky.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..validation import check_positive_int
from . import curvature
from .curvature import CurvatureOperator, check_psd_with_shift
from .per_sample import Captured, Factors, LayerCache, factors_dots, factors_gram, factors_sq_norms, factors_weighted_sum
from .vectors import as_dict, as_flat

# The Gram and its Cholesky factor are two float64 [N, N]: 6.4 GB at this N.
WOODBURY_MAX_SAMPLES = 20_000
# Rounds of iterative refinement (each one Fisher product) while a column's residual is above tol.
REFINEMENTS = 3
# Pseudo-samples the preconditioner keeps (its ``rank``). On the digits MLP (module doc) 1,000 cost 59 ms
# to set up past the factors and 7 ms per application, 2,000 cost 234 ms and 13 ms: 10 and 7 iterations.
WOODBURY_RANK = 1000


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


def _woodbury_apply(op: CurvatureOperator, factors: list[Factors], rows: list[slice], chol: torch.Tensor,
                    r: torch.Tensor) -> torch.Tensor:
    """(1/s)(r − Jᵀ (N s I + J Jᵀ)⁻¹ J r) for r [K, P], J the rows of ``factors``, ``chol`` the Cholesky
    factor of N s I + J Jᵀ: J r and Jᵀ y summed in float64 → [K, P] float64."""
    jr = torch.cat([factors_dots(f, as_dict(r, op.params)) for f in factors]).double()  # [rows, K]
    y = torch.cholesky_solve(jr, chol)
    jty = {n: torch.zeros(r.shape[0], *p.shape, dtype=torch.float64, device=r.device) for n, p in op.params.items()}
    for f, rows_f in zip(factors, rows):
        for name, part in factors_weighted_sum(f, y[rows_f], op.params).items():
            jty[name] += part
    return (r.double() - as_flat(jty, op.params)) / op.shift


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
        return _woodbury_apply(op, factors, rows, chol, r)

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


class _Heaviest:
    """The m pseudo-samples of largest squared norm seen so far, as per-layer rows: A [m, T, ·], G [m, T, ·]."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.norms: torch.Tensor | None = None
        self.layers: list[LayerCache] = []
        self.fallback: dict[str, torch.Tensor] = {}

    def add(self, norms: torch.Tensor, layers: list[LayerCache], fallback: dict[str, torch.Tensor]) -> None:
        """Merge one batch: ``norms`` [B, R], ``layers`` with G [B, R, T, ·], ``fallback`` name → [B, R, *shape]."""
        names = [layer.module_name for layer in layers]
        if self.norms is not None and names != [layer.module_name for layer in self.layers]:
            raise ValueError(f"preconditioner='woodbury' needs the same layers to run on every batch; got {names} "
                             f"after {[layer.module_name for layer in self.layers]}: use preconditioner='nystrom'")
        r = norms.shape[1]
        if self.norms is None:  # the kept rows repeat a sample's A for each of its kept outputs: check the total
            row = sum(l.a[0].numel() * l.a.element_size() + l.g[0, 0].numel() * l.g.element_size() for l in layers)
            row += sum(t[0, 0].numel() * t.element_size() for t in fallback.values())
            if 2 * self.rank * row > curvature.CACHE_BYTES:  # twice: old and new rows meet in each merge
                raise ValueError(f"preconditioner='woodbury' with rank={self.rank} would keep {self.rank * row / 2**30:.2f} GiB "
                                 f"of factor rows ({row} bytes per pseudo-sample), above half of CACHE_BYTES: lower rank")
        top = norms.flatten().topk(min(self.rank, norms.numel())).indices
        i, j = top // r, top % r
        rows = [LayerCache(l.module_name, l.module, l.rule, l.a[i], l.g[i, j], l.names) for l in layers]
        extra = {n: t[i, j] for n, t in fallback.items()}
        if self.norms is None:
            self.norms, self.layers, self.fallback = norms[i, j], rows, extra
            return
        merged = torch.cat([self.norms, norms[i, j]])
        keep = merged.topk(min(self.rank, merged.numel())).indices
        self.norms = merged[keep]
        self.layers = [LayerCache(old.module_name, old.module, old.rule, torch.cat([old.a, new.a])[keep],
                                  torch.cat([old.g, new.g])[keep], old.names) for old, new in zip(self.layers, rows)]
        self.fallback = {n: torch.cat([t, extra[n]])[keep] for n, t in self.fallback.items()}

    def factors(self) -> Factors:
        m = self.norms.shape[0]  # type: ignore[union-attr]
        like = self.norms  # the pseudo-samples have no losses; Captured.losses only carries dtype and device
        return Factors(Captured(torch.zeros(m, dtype=like.dtype, device=like.device), self.layers, list(self.fallback)),
                       self.fallback, m)


def _batch_rows(op: CurvatureOperator, start: int) -> tuple[torch.Tensor, list[LayerCache], dict[str, torch.Tensor]]:
    """The pseudo-samples of one batch: (squared norms [B, R], layers with G [B, R, T, ·], fallback
    gradients [B, R, *shape]); R = 1 for the Fisher, the outputs per sample for the GGN."""
    if op.kind == "fisher":
        factors = op.batch_factors(start)
        layers = [LayerCache(l.module_name, l.module, l.rule, l.a, l.g.unsqueeze(1), l.names) for l in factors.captured.layers]
        fallback = {n: t.unsqueeze(1) for n, t in factors.fallback.items()}
        return factors_sq_norms(factors).unsqueeze(1), layers, fallback
    ggn = op.ggn_batch_factors(start, keep=False)  # read once here; CG's K = 1 products do not use them
    norms = torch.zeros(ggn.batch_size, max(1, math.prod(ggn.output_shape)), dtype=op.dtype, device=op.device)
    for layer in ggn.layers:
        norms += torch.stack([layer.rule.sq_norms(layer.module, layer.a, layer.g[:, r]) for r in range(layer.g.shape[1])], 1)
    return norms, ggn.layers, {}


def woodbury_preconditioner(op: CurvatureOperator, *, rank: int = WOODBURY_RANK,
                            progress: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """r [K, P] ↦ M⁻¹ r with M = s I + (1/N) J_Sᵀ J_S, S the ``rank`` pseudo-samples of largest gradient
    norm (module doc), for preconditioned CG on a ``fisher`` or ``ggn`` operator; SPD for s > 0.

    The returned function carries ``.rank`` (m, at most N·R) and ``.captured`` (the share of the
    curvature's trace that S holds, in [0, 1]).
    """
    rank = check_positive_int(rank, "rank")
    check_psd_with_shift(op, "preconditioner='woodbury'", "M is singular beyond the kept pseudo-samples")
    heaviest, total = _Heaviest(rank), 0.0
    for start in tqdm(range(0, op.n, op.batch_size), desc="woodbury preconditioner", disable=not progress, leave=False):
        norms, layers, fallback = _batch_rows(op, start)
        total += float(norms.sum())
        heaviest.add(norms, layers, fallback)
    sub = heaviest.factors()
    m = sub.batch_size
    rows = [slice(0, m)]
    gram = _gram([sub], rows, m, progress)
    gram.diagonal().add_(op.n * op.shift)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise ValueError(f"the Woodbury preconditioner's N·s·I + J_S J_Sᵀ (N={op.n}, s={op.shift:g}, m={m}) is not "
                         "positive definite in float64 (rounding at a tiny shift): raise damping or use "
                         "preconditioner='nystrom'")

    def apply(r: torch.Tensor) -> torch.Tensor:
        return _woodbury_apply(op, [sub], rows, chol, r).to(r.dtype)

    apply.rank = m  # type: ignore[attr-defined]
    apply.captured = float(heaviest.norms.sum()) / total if total > 0 else 1.0  # type: ignore[attr-defined,union-attr]
    return apply


__all__ = ["WOODBURY_MAX_SAMPLES", "WOODBURY_RANK", "woodbury_preconditioner", "woodbury_solver"]
