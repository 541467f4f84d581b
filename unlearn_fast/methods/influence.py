"""``influence_unlearn``, the public influence step, and the registered method ``influence``.

The deletion request is validated and, with ``similar=``, expanded with the targets' near-duplicates
(:mod:`.expansion`); the steps themselves are :func:`unlearn_fast.influence.unlearn.newton_unlearn`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..context import resolve_context, set_context
from ..influence.trust_region import GRAD_TOL
from ..influence.unlearn import UnlearnReport, check_influence_options, newton_unlearn
from ..validation import resolve_device
from .expansion import forget_request
from .registry import METHODS, UnlearnTask, check_method_input, check_method_output


def influence_unlearn(
    model: nn.Module,
    forget_ids: Any,
    *,
    data: Any = None,
    loss: Any = None,
    weight_decay: float | None = None,
    solver: str = "cg",
    curvature: str = "ggn",
    damping: float | str = "auto",
    preconditioner: str | None = "auto",
    preconditioner_options: dict | None = None,
    gradient: str = "forget",
    steps: int | str = "auto",
    trust_region: bool = True,
    grad_tol: float = GRAD_TOL,
    budget_seconds: float | None = None,
    budget_passes: float | None = None,
    on_reject: str = "raise",
    layers: list[str] | None = None,
    curvature_samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    device: str | torch.device = "auto",
    progress: bool = True,
    similar: float | str | None = None,
    similar_method: str = "auto",
    similar_action: str = "remove",
) -> UnlearnReport:
    """Remove ``forget_ids``' influence from ``model`` in place by trust-region Newton steps on the retain objective.

    Args:
        forget_ids: train ids (into the context's data) to remove.
        data, loss, weight_decay: override or supply the model's training context.
        solver: "cg" (iterative), "exact" (dense, small models), "lissa" (the LiSSA recursion, slow for
            small damping), "woodbury" (fisher), or the direct block-diagonal approximations "kfac" /
            "ekfac"; curvature: "ggn" (default), "fisher" or "hessian".
        damping: δ added to the curvature's diagonal at the first trial. "auto": 0 when the weight decay
            makes the curvature positive definite, else the curvature's mean eigenvalue
            (:mod:`unlearn_fast.influence.damping`); the trust region raises it where a step is rejected.
        preconditioner, preconditioner_options: for cg: "auto" (the Woodbury preconditioner where it applies
            to the curvature and model, else none; its option is rank), None, "kfac", "ekfac", "diagonal",
            "nystrom" or "woodbury", with their options (nystrom: rank, seed; woodbury: rank; kfac/ekfac:
            samples, seed; diagonal: probes, seed).
        gradient: "forget" (the influence form, m samples) or "retain" (∇L_R over the retain set).
        steps: "auto" (re-linearise while the quadratic model holds, ρ ≥ 0.75, until ‖∇Φ‖ ≤ grad_tol ×
            its start, at most 10 steps) or the number of accepted steps to take.
        trust_region: measure ρ = actual / predicted decrease of the retain objective for each trial and
            reject a step with ρ ≤ 0 (raising the damping and solving again). False accepts every finite step.
        grad_tol: relative gradient norm at which ``steps`` stop.
        budget_seconds, budget_passes: stop before a trial once this much time, or this many passes over
            the measured samples (curvature products, gradients, loss evaluations), was spent; the best step
            accepted so far is kept. Counted from the first trial (the first gradient pass counts in the
            passes; building the preconditioner comes before either).
        on_reject: when no step is accepted the model is left unchanged and this says whether to "raise"
            a ValueError (default) or "warn" (UnlearnWarning) and return the report, whose ``stopped`` says why.
        layers: restrict the steps to the parameters of these named modules.
        curvature_samples: build the curvature, measure ρ and re-linearise on a subset of this many
            retain samples drawn with ``seed``; the first step's gradient always uses the exact sums.
            None: all retain samples.
        batch_size: samples per batch; None sizes them by activation memory (:mod:`.curvature`).
        tol, max_iter: of each solve.
        similar, similar_method, similar_action: expand the forget set with the targets' near-duplicates,
            or only list them, as in :func:`unlearn_fast.unlearn`.
    Returns:
        An :class:`UnlearnReport`: every trial's ρ, damping, residual and step norm, why the steps
        stopped, the samples they were measured on, and ``similar``'s findings. The model's context
        then records the removed ids. A rejected or non-finite step never changes the model.
    """
    ctx = resolve_context(model, data=data, loss=loss, weight_decay=weight_decay)
    options = dict(solver=solver, curvature=curvature, damping=damping, preconditioner=preconditioner,
                   preconditioner_options=preconditioner_options, gradient=gradient, steps=steps,
                   trust_region=trust_region, grad_tol=grad_tol, budget_seconds=budget_seconds,
                   budget_passes=budget_passes, on_reject=on_reject, layers=layers,
                   curvature_samples=curvature_samples, seed=seed, batch_size=batch_size, tol=tol, max_iter=max_iter)
    check_influence_options(options)  # the cheap checks come before the near-duplicate search
    check_method_input(model, ctx, "influence_unlearn")
    dev = resolve_device(device)
    ids, expansion = forget_request(model, ctx, forget_ids, similar, similar_method=similar_method,
                                    similar_action=similar_action, device=dev, progress=progress)
    report = newton_unlearn(model, ctx, ids, device=dev, progress=progress, **options)
    # The trust region accepts only finite steps, so this holds by construction; it is checked so
    # that a non-finite model can never leave unannounced. Restoring would need θ₀, which only
    # newton_unlearn holds: the model, changed in place, must then be reloaded.
    check_method_output(model, "influence_unlearn", "the model was changed in place and must be reloaded; this is "
                                                    "a bug (the trust region rejects non-finite steps), please report it")
    return replace(report, similar=expansion)


@METHODS.register("influence", check=check_influence_options, solver="cg", curvature="ggn", damping="auto",
                  preconditioner="auto", preconditioner_options=None, gradient="forget", steps="auto",
                  trust_region=True, grad_tol=GRAD_TOL, budget_seconds=None, budget_passes=None, on_reject="raise",
                  tol=1e-4, max_iter=200, layers=None, curvature_samples=None, seed=0)
def influence(model: nn.Module, task: UnlearnTask, **hyper: Any) -> nn.Module:
    """Trust-region Newton steps on the retain objective (Koh & Liang 2017; Guo et al. 2020; Moré 1978).

    Defaults: conjugate gradient to relative residual 1e-4 (at most 200 iterations) on the generalised
    Gauss-Newton curvature of the retain set plus weight decay; damping from 0, raised by the trust
    region until a step decreases the retain objective; more steps while its quadratic model holds.
    """
    out = copy.deepcopy(model)
    set_context(out, task.context)
    # unlearn() already expanded task.forget_ids; the report carries that expansion's listing.
    report = newton_unlearn(out, task.context, task.forget_ids, device=task.device, progress=task.progress, **hyper)
    out.unlearn_fast_report = replace(report, similar=task.similar)
    return out


__all__ = ["influence_unlearn"]
