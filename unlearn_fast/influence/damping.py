"""The damping δ of ``influence_unlearn``: the first value tried, chosen from the problem, and how the
trust region moves it (:mod:`.trust_region`).

``damping="auto"`` (the default):
- weight decay λ > 0: δ₀ = 0. Then C + λI is positive definite for the GGN and the Fisher, and the step
  is the exact Newton step of the retain objective, which is what a convex problem trained to its
  optimum needs (L2-regularised logistic regression: relative error 0.014 at δ = 0 against 0.055 with
  the constant 1e-3 used before). The Hessian of a deep net is indefinite: there δ₀ = 0 too, and the
  trust region raises δ wherever the step does not decrease the objective.
- λ = 0: C alone is singular, so δ₀ = s, the curvature's own scale: its mean eigenvalue tr(C)/P,
  estimated from SCALE_PROBES Hutchinson probes (one batched product).
A number is taken as δ₀ as it is.

Moving it (:class:`DampingSearch`, one per linearisation point). A rejected trial raises δ to s (from
0) or to DAMPING_GROWTH·δ; after the first acceptance the search narrows the gap to the largest
rejected damping below, so that it settles within a factor √2 of the smallest damping whose step
decreases the objective; from 0, by halving s while halves are accepted. A step whose quadratic model
held (ρ ≥ the trust region's RHO_CONTINUE, no rejection) lowers the next point's start to
δ/DAMPING_GROWTH, and to 0 (λ > 0) once that falls below s/DAMPING_GROWTH². On the digits study
(3 seeds, C ∈ {0, 10}) a factor 2 gave steps as close to the oracle as a factor 4 or closer
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..validation import check_number
from .curvature import CurvatureOperator
from .kfac import KroneckerCurvature
from .preconditioners import hutchinson_diagonal

AUTO = "auto"
SCALE_PROBES = 16
DAMPING_GROWTH = 2.0
MAX_HALVINGS = 10  # the search below s stops at s / 2^10


@dataclass(frozen=True)
class DampingChoice:
    """The first damping tried (``value``) and, in words, why (``how``)."""

    value: float
    how: str


def check_damping(damping: float | str) -> float | str:
    """"auto" or a finite number ≥ 0; a ValueError naming both choices otherwise."""
    if isinstance(damping, str):
        if damping != AUTO:
            raise ValueError(f"damping={damping!r} is not valid; valid choices: 'auto' or a number >= 0")
        return damping
    return check_number(damping, "damping")


def curvature_scale(op: CurvatureOperator, *, kronecker: KroneckerCurvature | None = None, probes: int = SCALE_PROBES,
                    seed: int = 0) -> float:
    """s = |tr(C)| / P, the mean eigenvalue of the curvature C (without λ or δ): of the ``kronecker`` model
    where the steps solve one (its eigenvalues, no product), else of the operator's, from ``probes``
    Rademacher probes (:func:`.preconditioners.hutchinson_diagonal`, averaged over the P coordinates).
    Raises when C is zero: no damping can be scaled to it."""
    if kronecker is not None:
        trace = sum(float(b.eigenvalues.double().sum()) for b in kronecker.blocks)
        scale = abs(trace + sum(float(d.double().sum()) for d in kronecker.diagonal.values())) / op.num_params
    else:
        scale = abs(float(hutchinson_diagonal(op, probes=probes, seed=seed).double().mean()))
    if not scale > 0:
        raise ValueError(f"the {op.kind} curvature is zero on these samples (trace estimate {scale:g}): the loss does not "
                         "depend on the trainable parameters there; give damping= explicitly")
    return scale


def initial_damping(damping: float | str, op: CurvatureOperator) -> DampingChoice:
    """δ₀ for ``damping`` ("auto" or a number) on the operator's curvature and weight decay (module doc)."""
    damping = check_damping(damping)
    if damping != AUTO:
        return DampingChoice(float(damping), f"given: {float(damping):g}")
    if op.weight_decay > 0:
        why = ("positive definite" if op.kind != "hessian"
               else "positive definite wherever the Hessian is positive semi-definite")
        return DampingChoice(0.0, f"auto: 0, since weight decay λ={op.weight_decay:g} makes C + λI {why}; "
                                  "raised only where the trust region rejects a step")
    scale = curvature_scale(op)
    return DampingChoice(scale, f"auto: {scale:.3g}, the {op.kind} curvature's mean eigenvalue tr(C)/P "
                                f"({SCALE_PROBES} Hutchinson probes), since λ = 0 leaves C singular")


class DampingSearch:
    """The trials at one linearisation point: which damping to try next, and which accepted one to keep.

    It starts at ``start``. Until a trial is accepted, each rejection raises the damping (:func:`raised`).
    Once one is accepted after rejections, the search narrows the gap to the largest rejected damping
    below it: with a positive one, by one refining trial at their geometric mean (resolution
    √DAMPING_GROWTH); when that is 0 (the undamped trial), by halving from the accepted damping while
    halves are accepted, at most MAX_HALVINGS times, then refining as before. A trial accepted at
    ``start`` ends the search at once. ``scale`` gives s lazily (it costs products).
    """

    def __init__(self, start: float, scale: Callable[[], float]) -> None:
        self.start, self._scale = start, scale
        self.accepted: dict[float, Any] = {}  # damping → what the caller keeps of that trial
        self.rejected: list[float] = []

    def add(self, damping: float, accepted: bool, kept: Any = None) -> None:
        if accepted:
            self.accepted[damping] = kept
        else:
            self.rejected.append(damping)

    @property
    def intervened(self) -> bool:
        """Whether the damping was moved from ``start`` (a trial was rejected at this point)."""
        return bool(self.rejected)

    def best(self) -> tuple[float, Any]:
        """(the smallest accepted damping, what was kept of its trial)."""
        damping = min(self.accepted)
        return damping, self.accepted[damping]

    def next(self) -> float | None:
        """The damping of the next trial, or None when the point is settled."""
        if not self.accepted:
            return self.start if not self.rejected else raised(max(self.rejected), self._scale())
        if not self.rejected:
            return None
        best = min(self.accepted)
        below = [d for d in self.rejected if d < best]
        if not below:
            return None
        lower = max(below)
        if lower == 0:
            return best / 2 if best / 2 >= self._scale() / 2 ** MAX_HALVINGS else None
        return math.sqrt(lower * best) if best / lower > math.sqrt(DAMPING_GROWTH) * (1 + 1e-9) else None


def raised(damping: float, scale: float) -> float:
    """The damping after a rejected trial: the scale s from 0, else DAMPING_GROWTH times more."""
    return scale if damping == 0 else damping * DAMPING_GROWTH


def lowered(damping: float, scale: float | None, weight_decay: float) -> float:
    """The damping after a step whose quadratic model held: DAMPING_GROWTH times less, and 0 below
    s/DAMPING_GROWTH² when the weight decay keeps C + λI positive definite."""
    smaller = damping / DAMPING_GROWTH
    floor = (scale or 0.0) / DAMPING_GROWTH ** 2
    return 0.0 if weight_decay > 0 and smaller < floor else smaller


__all__ = ["AUTO", "DAMPING_GROWTH", "DampingChoice", "DampingSearch", "MAX_HALVINGS", "SCALE_PROBES", "check_damping",
           "curvature_scale", "initial_damping", "lowered", "raised"]
