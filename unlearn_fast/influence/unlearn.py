"""``influence_unlearn``: one Newton step on the retain objective, in place.

Derivation. Let D be the model's current training set (|D| = N), F ⊂ D the forget set (|F| = m),
R = D ∖ F (|R| = N − m), and λ the weight decay, with the objectives

    L(θ)   = (1/N)     Σ_{i∈D} ℓ_i(θ) + (λ/2)‖θ‖²        (what θ* was trained to minimise)
    L_R(θ) = (1/(N−m)) Σ_{i∈R} ℓ_i(θ) + (λ/2)‖θ‖²        (what retraining without F minimises).

One Newton step on L_R from θ* is θ = θ* − H_R⁻¹ ∇L_R(θ*), with H_R = (1/(N−m)) Σ_{i∈R} ∇²ℓ_i + λI.
At the optimum ∇L(θ*) = 0, i.e. Σ_{i∈D} ∇ℓ_i(θ*) = −Nλθ*, so

    ∇L_R(θ*) = −(1/(N−m)) Σ_{i∈F} (∇ℓ_i(θ*) + λθ*)

and the step needs gradients of the m forget samples only (``gradient="forget"``, the influence
form of Koh & Liang 2017 and Guo et al. 2020). ``gradient="retain"`` computes ∇L_R(θ*) directly
over R instead, which stays a true Newton step when θ* is not an exact optimum. H_R is replaced by
the chosen curvature (``ggn`` by default: positive semi-definite, unlike the Hessian of a trained
deep net) plus ``damping``·I.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..context import resolve_context, set_context
from ..methods.expansion import SimilarExpansion, forget_request
from ..methods.registry import METHODS, UnlearnTask
from ..validation import check_choice, check_number, check_positive_int, resolve_device
from .per_sample import loss_gradient
from .solvers import check_solver_arguments, solve
from .vectors import as_dict, as_flat, trainable

GRADIENTS = ("forget", "retain")
# "auto" damping per curvature: ggn/fisher are PSD and the weight decay regularises them; the
# Hessian of a trained net is indefinite (smallest eigenvalue of H + 1e-3·I about −3e-3 on the
# digits MLP), so it gets ten times more.
AUTO_DAMPING = {"ggn": 1e-3, "fisher": 1e-3, "hessian": 1e-2}


@dataclass
class UnlearnReport:
    """What one influence step did; ``seconds`` has the time of each phase."""

    removed_ids: list[int]
    step_norm: float
    relative_step: float            # ‖Δθ‖ / ‖θ‖
    solver: str
    curvature: str
    damping: float
    relative_residual: float        # ‖b − A x‖ / ‖b‖ of the solve, recomputed
    iterations: int
    converged: bool
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    similar: SimilarExpansion | None = None   # the near-duplicates found and added (similar=...)


def _batches(inputs: torch.Tensor, labels: torch.Tensor, size: int, device: torch.device):
    for start in range(0, inputs.shape[0], size):
        yield inputs[start:start + size].to(device), labels[start:start + size].to(device)


def _check_influence_options(options: dict[str, Any]) -> None:
    """The option values checked before any work: by influence_unlearn, and through the method registry
    by a study or tune before any model is trained."""
    check_solver_arguments(options["solver"], options["preconditioner"], None, options["preconditioner_options"])
    check_choice(options["curvature"], tuple(AUTO_DAMPING), "curvature")
    check_choice(options["gradient"], GRADIENTS, "gradient")


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
    preconditioner: str | None = None,
    preconditioner_options: dict | None = None,
    gradient: str = "forget",
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
    """Remove ``forget_ids``' influence from ``model`` in place with one Newton step (see module doc).

    Args:
        forget_ids: train ids (into the context's data) to remove.
        data, loss, weight_decay: override or supply the model's training context.
        solver: "cg" (iterative), "exact" (dense, small models), "lissa" (the LiSSA recursion,
            slow for small damping), or the direct block-diagonal approximations "kfac" / "ekfac";
            curvature: "ggn" (default), "fisher" or "hessian".
        preconditioner: None, "kfac", "ekfac", "diagonal" (Jacobi), "nystrom" (a randomized
            low-rank sketch) or "woodbury" (the exact inverse of the curvature's 1,000 heaviest
            pseudo-samples; ggn and fisher), for cg. The first three help ill-scaled single layers
            (on the digits MLPs they raised the iterations); "nystrom" cut the default digits step
            1.35× (72 → 24 iterations, plus 32 products for the sketch; about 5·P·32 floats of
            memory), "woodbury" 2.2× (to 100 ms, 4× faster than retraining).
        preconditioner_options: its keyword options (nystrom: rank, seed; woodbury: rank;
            kfac/ekfac: samples, seed; diagonal: probes, seed).
        damping: added to the curvature's diagonal; "auto" is 1e-3 (ggn, fisher) or 1e-2 (hessian).
        gradient: "forget" (influence form, m samples) or "retain" (direct ∇L_R over the retain set).
        layers: restrict the step to the parameters of these named modules.
        curvature_samples: estimate the curvature H_R from a random subset of this many retain
            samples (drawn with ``seed``) instead of all of them; the right-hand side always uses
            the exact sums. The curvature is a mean over R, so a subset is an unbiased estimate of
            it; on large data it makes the solve cost independent of N (kronfluence bounds its
            factor fits the same way, with ``covariance_max_examples``). None: all retain samples.
        batch_size: samples per batch; None sizes the curvature's batches by memory (about 64 MiB of
            activations each, see :mod:`.curvature`) and the gradient's at 512.
        similar, similar_method, similar_action: expand the forget set with the targets'
            near-duplicates, or only list them, as in :func:`unlearn_fast.unlearn`.
    Returns:
        An :class:`UnlearnReport` (``similar`` lists the near-duplicates found). The model's context
        then records the removed ids. A non-finite step raises ValueError and leaves the model unchanged.
    """
    ctx = resolve_context(model, data=data, loss=loss, weight_decay=weight_decay)
    # The cheap checks come before the near-duplicate search, so bad options fail fast.
    _check_influence_options({"solver": solver, "preconditioner": preconditioner, "curvature": curvature,
                              "preconditioner_options": preconditioner_options, "gradient": gradient})
    if curvature_samples is not None:
        check_positive_int(curvature_samples, "curvature_samples")
    check_positive_int(seed, "seed", minimum=0)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size", hint="or None to size the curvature's batches by memory")
    delta = AUTO_DAMPING[curvature] if damping == "auto" else check_number(damping, "damping")
    dev = resolve_device(device)
    ids, expansion = forget_request(model, ctx, forget_ids, similar, similar_method=similar_method,
                                    similar_action=similar_action, device=dev, progress=progress)
    retain = ctx.retain_ids(ids)
    if not retain:
        raise ValueError("forget_ids cover the whole training set: nothing would be left to define the model")
    # gradient batches; the curvature's batches are sized by memory unless batch_size is given
    size = batch_size or 512
    params = trainable(model, layers)
    lam = ctx.weight_decay
    inputs, labels = ctx.tensors()
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    model.to(dev)
    theta = {n: p.detach() for n, p in params.items()}
    chosen = torch.as_tensor(ids if gradient == "forget" else retain, dtype=torch.long)
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    for batch in _batches(inputs[chosen], labels[chosen], size, dev):
        for n, g in loss_gradient(model, ctx.loss, batch, params).items():
            total[n] += g
    n_r = len(retain)
    if gradient == "forget":
        rhs = {n: (total[n] + len(ids) * lam * theta[n]) / n_r for n in theta}       # = −∇L_R(θ*)
    else:
        rhs = {n: -(total[n] / n_r + lam * theta[n]) for n in theta}
    seconds["gradient"] = time.perf_counter() - started

    started = time.perf_counter()
    keep = torch.as_tensor(retain, dtype=torch.long)
    if curvature_samples is not None and curvature_samples < len(retain):
        draw = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed))[:curvature_samples]
        keep = keep[draw.sort().values]
    result = solve(model, ctx.loss, (inputs[keep], labels[keep]), {n: v.unsqueeze(0) for n, v in rhs.items()},
                   solver=solver, curvature=curvature, weight_decay=lam, damping=delta, tol=tol, max_iter=max_iter,
                   preconditioner=preconditioner, preconditioner_options=preconditioner_options,
                   batch_size=batch_size, layers=layers, device=dev, progress=progress)
    seconds["solve"] = time.perf_counter() - started

    started = time.perf_counter()
    step = as_dict(result.solution, params)
    flat_step = as_flat(step, params)[0]
    if not torch.isfinite(flat_step).all():
        bad = [n for n, v in step.items() if not torch.isfinite(v).all()]
        raise ValueError(f"the Newton step is non-finite in {bad[:5]}; the model was left unchanged (raise damping?)")
    with torch.no_grad():
        for n, p in params.items():
            p.add_(step[n][0].to(p.dtype))
    theta_norm = float(torch.cat([t.reshape(-1) for t in theta.values()]).norm())
    set_context(model, replace(ctx, removed_ids=tuple(sorted({*ctx.removed_ids, *ids}))))
    seconds["update"] = time.perf_counter() - started

    if not result.converged:
        warnings.warn(f"influence_unlearn: the {solver} solve did not converge ({result.message})", stacklevel=2)
    step_norm = float(flat_step.norm())
    return UnlearnReport(
        removed_ids=sorted(ids), step_norm=step_norm, relative_step=step_norm / max(theta_norm, 1e-30),
        solver=solver, curvature=curvature, damping=delta, relative_residual=float(result.relative_residual),
        iterations=int(result.iterations), converged=bool(result.converged), message=result.message, seconds=seconds,
        similar=expansion,
    )


@METHODS.register("influence", check=_check_influence_options, solver="cg", curvature="ggn", damping="auto",
                  preconditioner=None,
                  preconditioner_options=None, gradient="forget",
                  tol=1e-4, max_iter=200, layers=None, curvature_samples=None, seed=0)
def influence(model: nn.Module, task: UnlearnTask, **hyper: Any) -> nn.Module:
    """One Newton/influence step on the retain objective (Koh & Liang 2017; Guo et al. 2020).

    Defaults: conjugate gradient to relative residual 1e-4 (at most 200 iterations) on the
    generalised Gauss-Newton curvature of the retain set, plus weight decay and damping 1e-3.
    """
    out = copy.deepcopy(model)
    set_context(out, task.context)
    # unlearn() already expanded task.forget_ids; the report carries that expansion's listing.
    report = influence_unlearn(out, task.forget_ids, device=task.device, progress=task.progress, **hyper)
    out.unlearn_fast_report = replace(report, similar=task.similar)
    return out
