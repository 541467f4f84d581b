"""``newton_unlearn``: trust-region Newton steps on the retain objective, in place. It is the engine of
:func:`unlearn_fast.influence_unlearn`, which validates the deletion request and expands it with
near-duplicates first.

Derivation. Let D be the model's current training set (|D| = N), F ⊂ D the forget set (|F| = m),
R = D ∖ F (|R| = n_R = N − m), and λ the weight decay, with the objectives

    L(θ)   = (1/N)   Σ_{i∈D} ℓ_i(θ) + (λ/2)‖θ‖²        (what θ₀ was trained to minimise)
    L_R(θ) = (1/n_R) Σ_{i∈R} ℓ_i(θ) + (λ/2)‖θ‖²        (what retraining without F minimises).

One Newton step on L_R from θ₀ is θ = θ₀ − H_R⁻¹ ∇L_R(θ₀), with H_R = (1/n_R) Σ_{i∈R} ∇²ℓ_i + λI.
At the optimum ∇L(θ₀) = 0, i.e. Σ_{i∈D} ∇ℓ_i(θ₀) = −Nλθ₀, so

    ∇L_R(θ₀) = −(1/n_R) Σ_{i∈F} (∇ℓ_i(θ₀) + λθ₀)

and the step needs gradients of the m forget samples only (``gradient="forget"``, the influence
form of Koh & Liang 2017 and Guo et al. 2020). ``gradient="retain"`` computes ∇L_R(θ₀) directly
over R instead. H_R is replaced by the chosen curvature (``ggn`` by default: positive semi-definite,
unlike the Hessian of a trained deep net) plus the damping δ·I.

The steps (:mod:`.trust_region`) minimise Φ (:mod:`.retain_objective`), the retain objective whose
gradient at θ₀ is that first step's, over the retain samples S (all, or ``curvature_samples`` of
them); δ starts as :mod:`.damping` chooses and moves with the measured ratio ρ of actual to predicted
decrease of Φ.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..context import TrainingContext, set_context
from ..validation import check_bool, check_choice, check_number, check_positive_int, resolve_device
from .curvature import CURVATURES, CurvatureOperator
from .damping import AUTO, check_damping, initial_damping
from .retain_objective import GRADIENTS, RetainObjective
from .solvers import PRECONDITIONERS, SolverWarning, check_solver_arguments
from .trust_region import GRAD_TOL, SolveSpec, StepPolicy, StepRecord, newton_steps
from .vectors import flat_params, trainable
from .woodbury import woodbury_preconditioner

ON_REJECT = ("raise", "warn")
# preconditioner="auto" (influence_unlearn's default): the Woodbury preconditioner for cg on the GGN or the
# Fisher, built once at the first damping and kept for the trust region's re-solves; none where it does
# not apply (another solver, the Hessian) or cannot be built (a layer without a per-layer rule, memory).
# On the digits study (three weight decays) it made the steps 2.7-3.5x faster, on the 51k-sample CNN of benchmarks/
# 4.3x (benchmarks/RESULTS.md), with the same steps to the solves' tolerance; on logistic regression,
# where plain cg needs few iterations, building it costs ~0.1 s more than it saves. (The name is
# damping's AUTO: one spelling of "auto" for every option of influence_unlearn.)


class UnlearnWarning(RuntimeWarning):
    """influence_unlearn left the model unchanged (``on_reject="warn"``) or its accepted solve fell short of tol."""


@dataclass
class UnlearnReport:
    """What ``influence_unlearn`` did.

    removed_ids: the ids unlearned (empty when no step was accepted and the model is unchanged).
    step_norm, relative_step: ‖θ − θ₀‖ over all accepted steps, and over ‖θ₀‖.
    damping: δ of the last accepted step; damping_choice: how the first δ was chosen.
    relative_residual, converged: of the last accepted step's solve; iterations: over every solve.
    accepted_steps; stopped: why the steps ended; trials: every trial (:class:`StepRecord`: ρ, δ,
    residual, step norm, accepted); objective: the samples ρ and later gradients were measured on;
    gradient_norm: ‖∇Φ‖ / ‖∇Φ(θ₀)‖ at the end where it was measured; passes: passes over those samples;
    seconds: per phase and in total; similar: the near-duplicate expansion (set by influence_unlearn);
    preconditioner: the one cg used, and why ("auto": what was chosen).
    """

    removed_ids: list[int]
    step_norm: float
    relative_step: float
    solver: str
    curvature: str
    damping: float
    relative_residual: float
    iterations: int
    converged: bool
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    similar: Any = None
    damping_choice: str = ""
    accepted_steps: int = 0
    stopped: str = ""
    objective: str = ""
    trials: list[StepRecord] = field(default_factory=list)
    gradient_norm: float | None = None
    passes: float = 0.0
    preconditioner: str = ""


def _check_steps(steps: Any) -> int | str:
    if isinstance(steps, str) and steps == AUTO:
        return steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; valid choices: 'auto' or a whole number >= 1")
    return steps


def check_influence_options(options: dict[str, Any]) -> None:
    """Check every option of ``influence_unlearn`` that is present in ``options`` before any work (also run
    through the method registry by a study or tune before any model is trained)."""
    solver, preconditioner = options.get("solver", "cg"), options.get("preconditioner")
    check_choice(preconditioner, (AUTO, None, *PRECONDITIONERS), "preconditioner")
    if preconditioner == AUTO:  # its options are the Woodbury preconditioner's, and only cg takes one
        if options.get("preconditioner_options") and solver != "cg":
            raise ValueError(f"preconditioner_options={options['preconditioner_options']!r} set cg's preconditioner; "
                             f"solver={solver!r} takes none: leave preconditioner_options=None")
        preconditioner = "woodbury" if solver == "cg" else None
    check_solver_arguments(solver, preconditioner, None, options.get("preconditioner_options"))
    if "tol" in options:
        check_number(options["tol"], "tol", low=0.0, low_open=True)
    if "max_iter" in options:
        check_positive_int(options["max_iter"], "max_iter")
    for name, valid in (("curvature", CURVATURES), ("gradient", GRADIENTS), ("on_reject", ON_REJECT)):
        if name in options:
            check_choice(options[name], valid, name)
    if "damping" in options:
        check_damping(options["damping"])
    if "steps" in options:
        _check_steps(options["steps"])
    if "trust_region" in options:
        check_bool(options["trust_region"], "trust_region")
    if "grad_tol" in options:
        check_number(options["grad_tol"], "grad_tol", low=0.0, low_open=True)
    for name in ("budget_seconds", "budget_passes"):
        if options.get(name) is not None:
            check_number(options[name], name, low=0.0, low_open=True)
    for name in ("curvature_samples", "batch_size"):
        if options.get(name) is not None:
            check_positive_int(options[name], name)
    if "seed" in options:
        check_positive_int(options["seed"], "seed", minimum=0)


def newton_unlearn(model: nn.Module, ctx: TrainingContext, ids: list[int], *, solver: str = "cg",
                   curvature: str = "ggn", damping: float | str = "auto", preconditioner: str | None = AUTO,
                   preconditioner_options: dict | None = None, gradient: str = "forget", steps: int | str = "auto",
                   trust_region: bool = True, grad_tol: float = GRAD_TOL, budget_seconds: float | None = None,
                   budget_passes: float | None = None, on_reject: str = "raise", layers: list[str] | None = None,
                   curvature_samples: int | None = None, seed: int = 0, batch_size: int | None = None,
                   tol: float = 1e-4, max_iter: int = 200, device: torch.device | str = "auto",
                   progress: bool = True) -> UnlearnReport:
    """Unlearn the validated train ids ``ids`` from ``model`` in place, with ``ctx`` its training context.

    See :func:`unlearn_fast.influence_unlearn` for the options. Raises (``on_reject="raise"``) or warns
    (``"warn"``) when no step is accepted; the model is then unchanged and its context too.
    """
    check_influence_options(dict(solver=solver, curvature=curvature, damping=damping, preconditioner=preconditioner,
                                 preconditioner_options=preconditioner_options, gradient=gradient, steps=steps,
                                 trust_region=trust_region, grad_tol=grad_tol, budget_seconds=budget_seconds,
                                 budget_passes=budget_passes, on_reject=on_reject, curvature_samples=curvature_samples,
                                 seed=seed, batch_size=batch_size, tol=tol, max_iter=max_iter))
    retain = ctx.retain_ids(ids)
    if not retain:
        raise ValueError("forget_ids cover the whole training set: nothing would be left to define the model")
    dev = resolve_device(device)
    started = time.perf_counter()
    model.to(dev)
    params = trainable(model, layers)
    inputs, labels = ctx.tensors()
    keep = torch.as_tensor(retain, dtype=torch.long)
    subset = curvature_samples is not None and curvature_samples < len(retain)
    if subset:
        draw = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed))[:curvature_samples]
        keep = keep[draw.sort().values]
    op = CurvatureOperator(model, ctx.loss, (inputs[keep], labels[keep]), kind=curvature, weight_decay=ctx.weight_decay,
                           batch_size=batch_size, layers=layers, device=dev)
    forget = op.on_device((inputs[ids], labels[ids]))
    everything = op.on_device((inputs[retain], labels[retain])) if gradient == "retain" and subset else None
    objective = RetainObjective(model, ctx.loss, params, ctx.weight_decay, forget, (op.inputs, op.labels),
                                gradient=gradient, retain=everything, n_retain=len(retain), batch_size=op.batch_size)
    theta0 = objective.theta0
    choice = initial_damping(damping, op)
    seconds = {"gradient": time.perf_counter() - started}
    tick = time.perf_counter()
    preconditioner, prepared, preconditioning = _preconditioner(preconditioner, preconditioner_options, solver, op,
                                                                choice.value, progress)
    seconds["preconditioner"] = time.perf_counter() - tick
    outcome = newton_steps(objective, op, SolveSpec(solver, preconditioner, preconditioner_options, tol, max_iter),
                           StepPolicy(steps, trust_region, grad_tol, budget_seconds, budget_passes), choice,
                           prepared=prepared, progress=progress)
    seconds.update(outcome.seconds)
    where = (f"a seeded subset of {op.n} of the {len(retain)} retain samples (seed {seed})" if subset
             else f"all {len(retain)} retain samples")
    delta = flat_params(params) - theta0
    last = outcome.last
    report = UnlearnReport(
        removed_ids=sorted(ids) if outcome.accepted else [], step_norm=float(delta.norm()),
        relative_step=float(delta.norm()) / max(float(theta0.norm()), 1e-30), solver=solver, curvature=curvature,
        damping=outcome.damping, relative_residual=float(last.relative_residual) if last else float("nan"),
        iterations=sum(t.iterations for t in outcome.records), converged=bool(last and last.converged),
        message=last.message if last else "", seconds=seconds, damping_choice=choice.how,
        accepted_steps=outcome.accepted, stopped=outcome.stopped, objective=where, trials=outcome.records,
        gradient_norm=outcome.gradient_norm, passes=objective.passes + outcome.passes, preconditioner=preconditioning)
    if not outcome.accepted:
        last_trial = outcome.records[-1] if outcome.records else None
        detail = (last_trial.note or f"ρ = {last_trial.rho:.3g} at damping {last_trial.damping:.3g}") if last_trial else "no trial"
        text = (f"influence_unlearn: no step was accepted ({outcome.stopped}; last trial: {detail}); "
                "the model was left unchanged")
        if on_reject == "raise":
            raise ValueError(text + ". Raise budget_seconds / budget_passes or damping, or pass on_reject='warn'")
        warnings.warn(text, UnlearnWarning, stacklevel=3)
        report.message = text
        report.seconds["total"] = time.perf_counter() - started
        return report
    tick = time.perf_counter()
    set_context(model, replace(ctx, removed_ids=tuple(sorted({*ctx.removed_ids, *ids}))))
    report.seconds["update"] = time.perf_counter() - tick
    report.seconds["total"] = time.perf_counter() - started
    if last is not None and not last.converged and not last.approximate:
        warnings.warn(f"influence_unlearn: the {solver} solve of the accepted step did not converge ({last.message})",
                      SolverWarning, stacklevel=3)
    return report


def _preconditioner(preconditioner: str | None, options: dict | None, solver: str, op: CurvatureOperator,
                    first_damping: float, progress: bool) -> tuple[str | None, dict, str]:
    """(the preconditioner cg uses, ``prepared`` holding it when built here, the choice in words)."""
    if preconditioner != AUTO:
        return preconditioner, {}, preconditioner or "none"
    if solver != "cg":
        return None, {}, f"none (auto: solver={solver!r} takes no preconditioner)"
    op.set_damping(first_damping)
    try:
        built = woodbury_preconditioner(op, progress=progress, **(options or {}))
    except ValueError as error:  # a layer without a per-layer rule, the Hessian, no shift, memory
        return None, {}, f"none (auto: the woodbury preconditioner does not apply: {error})"
    return "woodbury", {("preconditioner", "woodbury"): built}, (
        f"woodbury (auto: rank {built.rank}, {built.captured:.0%} of the curvature's trace)")


__all__ = ["ON_REJECT", "UnlearnReport", "UnlearnWarning", "check_influence_options", "newton_unlearn"]
