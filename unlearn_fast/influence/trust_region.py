"""Trust-region Newton steps on the retain objective Φ (:mod:`.retain_objective`), the loop behind
``influence_unlearn``.

A trial at the current point θ_k solves (B + δI) Δ = −g, where g = ∇Φ(θ_k) and B = C + λI is the
curvature model of the solver (the exact operator for cg / exact / lissa / woodbury, the Kronecker
model for kfac / ekfac), and compares the decrease of Φ that the quadratic model q(Δ) = gᵀΔ + ½ΔᵀBΔ
predicts with the decrease measured on the samples S:

    ρ = (Φ(θ_k) − Φ(θ_k + Δ)) / (q(0) − q(Δ))         (Levenberg 1944, Marquardt 1963, Moré 1978)

- Acceptance: ρ > RHO_ACCEPT = 0, any decrease of Φ (η = 0 in Nocedal & Wright 2006, Alg. 4.1). A
  rejected trial leaves the parameters as they were; the damping search of :class:`.damping.DampingSearch`
  picks the next δ, and the solve is warm-started from the solution of the nearest damping tried at this
  point (from 0 where that is no nearer). The smallest accepted damping is kept, within a factor √2.
  On the default digits study every first trial at δ = 0 had ρ between −1.5 and −31, and the smallest
  accepted damping left the median residual influence closer to the oracle's than η = 0.25 did
  (benchmarks/RESULTS.md). ρ measures the retain objective: it guards the retained fit, and it does not locate the
  oracle on a deep net. On the 51k-sample CNN of benchmarks/ the undamped step was accepted (ρ = 0.034)
  and over-shot the targets (median RI −1.3), and the K-FAC steps that matched the oracle best there
  increase Φ and are rejected (benchmarks/RESULTS.md).
- Steps: ``steps="auto"`` re-linearises at the accepted point and goes on while the Newton step holds:
  accepted at the first damping δ₀ (not raised by the trust region) with ρ ≥ RHO_CONTINUE = 0.75, until
  ‖∇Φ‖ ≤ grad_tol·‖∇Φ(θ₀)‖ or AUTO_MAX_STEPS. Where it holds, more steps converge to the retain optimum
  (logistic regression: relative error 0.24 after one step, 7e-6 after four). Where it does not (the
  digits MLP: every first trial at δ₀ = 0 had ρ < 0), the retain optimum is not the retrained model:
  minimising Φ to convergence there moved the weights by 98–173 % of their norm (17–53 % held by
  δ = 1e-3) and left more of the targets' influence than the steps do (median RI 0.61–0.76 against
  0.09–0.39), and three forced steps cost 1.8 points of test accuracy; so the steps stop. A heavily damped step can have ρ ≈ 1 on a deep
  net too, hence the condition on δ. An int runs up to that many accepted steps whatever ρ says.
- Reuse: one curvature operator serves every trial (its factors and graphs are refreshed when the
  parameters change); the preconditioner, the dense matrix of ``exact`` and the Kronecker factors of
  kfac / ekfac are kept across the trials at one point. After an accepted step the preconditioner and
  the Kronecker factors are kept while the model held (ρ ≥ RHO_CONTINUE), exact's matrix never.
- Budget: ``budget_seconds`` and ``budget_passes`` (passes over S: one per curvature product, gradient
  or loss evaluation, the Kronecker fits' passes included) are checked before each trial; the best step
  accepted at the point so far is then kept.
- An exception (an interrupt, a failing solve) puts the parameters back at θ₀ before it propagates: the
  model is never left between two accepted states.
- A non-finite step or objective counts as a rejection; ``trust_region=False`` accepts every finite
  trial (ρ is still measured and reported).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .curvature import CurvatureOperator
from .damping import DampingChoice, DampingSearch, curvature_scale, lowered
from .retain_objective import RetainObjective
from .solvers import SolveResult, SolverWarning, solve_operator
from .vectors import flat_params

RHO_ACCEPT = 0.0
RHO_CONTINUE = 0.75
AUTO_MAX_STEPS = 10     # steps="auto" stops after this many accepted steps
MAX_REJECTIONS = 24     # rejections at one point before giving up (δ grows 2^23 past s)
ROUNDING = 10           # |predicted| and |actual| below ROUNDING·eps·|L_S|: ρ is rounding noise (Conn, Gould & Toint 2000, §17.4.2)
GRAD_TOL = 1e-3


@dataclass
class StepRecord:
    """One trial. ``step``: the accepted step it tried for (1, 2, ...); ``predicted`` / ``actual``: the
    decrease of Φ; ``gradient_norm``: ‖∇Φ‖ / ‖∇Φ(θ₀)‖ after an accepted step, where it was measured."""

    step: int
    damping: float
    rho: float
    predicted: float
    actual: float
    relative_residual: float
    iterations: int
    step_norm: float
    accepted: bool
    note: str = ""
    gradient_norm: float | None = None


@dataclass(frozen=True)
class SolveSpec:
    """How each trial solves: the ``solve_operator`` arguments other than the operator and rhs."""

    solver: str = "cg"
    preconditioner: str | None = None
    preconditioner_options: dict | None = None
    tol: float = 1e-4
    max_iter: int = 200


@dataclass(frozen=True)
class StepPolicy:
    steps: int | str = "auto"
    trust_region: bool = True
    grad_tol: float = GRAD_TOL
    budget_seconds: float | None = None
    budget_passes: float | None = None


@dataclass
class StepsOutcome:
    """What the loop did. The parameters are left at the last accepted point (θ₀ if none)."""

    records: list[StepRecord] = field(default_factory=list)
    accepted: int = 0
    damping: float = 0.0               # of the last accepted step (the first tried if none)
    last: SolveResult | None = None    # the last accepted step's solve
    stopped: str = ""
    gradient_norm: float | None = None
    passes: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def newton_steps(objective: RetainObjective, op: CurvatureOperator, spec: SolveSpec, policy: StepPolicy,
                 choice: DampingChoice, *, prepared: dict | None = None, progress: bool = False) -> StepsOutcome:
    """Run the trust-region steps of the module doc on ``objective``'s parameters (in place). On return the
    parameters are at the last accepted point (θ₀ if none); an exception puts them back at θ₀ first.
    ``prepared``: what the first solve may reuse (``solve_operator``), e.g. a preconditioner built already."""
    out = StepsOutcome(damping=choice.value)
    params = objective.params
    theta = flat_params(params).clone()
    g, gnorm0 = objective.g0, float(objective.g0.norm())
    value, size = objective.value0, objective.loss0
    prepared = {} if prepared is None else prepared
    scale: list[float] = []  # s, computed once, when a search first needs it

    def curvature_size() -> float:
        if not scale:
            kronecker = prepared.get(spec.solver) if spec.solver in ("kfac", "ekfac") else None
            scale.append(curvature_scale(op, kronecker=kronecker))
            out.passes += 0 if kronecker is not None else 1
        return scale[0]

    started = time.perf_counter()
    timing = {"solve": 0.0, "evaluate": 0.0}
    start_damping = choice.value
    bar = tqdm(desc="influence steps", unit="trial", disable=not progress, leave=False)
    try:
        while True:
            search, starts = DampingSearch(start_damping, curvature_size), {}
            while (delta := search.next()) is not None:
                out.stopped = _over_budget(policy, time.perf_counter() - started, objective.passes + out.passes)
                if out.stopped:
                    break
                tick = time.perf_counter()
                op.set_damping(delta)
                with warnings.catch_warnings():  # a trial's solver problems go into its record, not a warning each
                    warnings.simplefilter("ignore", SolverWarning)
                    result = solve_operator(op, (-g).unsqueeze(0), solver=spec.solver, tol=spec.tol, max_iter=spec.max_iter,
                                            preconditioner=spec.preconditioner, preconditioner_options=spec.preconditioner_options,
                                            x0=_nearest(starts, delta), prepared=prepared)
                timing["solve"] += time.perf_counter() - tick
                out.passes += result.iterations + (0 if result.approximate else 1)
                tick = time.perf_counter()
                record, trial_value = _trial(objective, op, spec, prepared, result, g, theta, value, size, delta,
                                             out.accepted + 1, policy.trust_region)
                _set(params, theta, trial=True)
                timing["evaluate"] += time.perf_counter() - tick
                out.records.append(record)
                bar.update()
                bar.set_postfix(damping=f"{delta:.2g}", rho=f"{record.rho:.3g}", accepted=out.accepted)
                if torch.isfinite(result.solution).all() and not result.indefinite:
                    starts[delta] = result.solution[0]
                search.add(delta, record.accepted, (record, trial_value, result))
                if not policy.trust_region and not record.accepted:
                    out.stopped = f"{record.note} at step {out.accepted + 1}, and trust_region=False retries nothing"
                    break
                if not policy.trust_region:
                    break
                if len(search.rejected) >= MAX_REJECTIONS:
                    out.stopped = f"rejected: {len(search.rejected)} trials in a row at step {out.accepted + 1}"
                    break
            if not search.accepted:
                break
            delta, (record, trial_value, result) = search.best()
            for other, (kept, _, _) in search.accepted.items():
                if other != delta:
                    kept.accepted = False
                    kept.note = "; ".join(filter(None, [kept.note, f"acceptable, superseded by the trial at damping {delta:.3g}"]))
            _set(params, theta + result.solution[0].to(theta.dtype))
            theta = flat_params(params).clone()
            value, size = trial_value
            out.accepted += 1
            out.damping, out.last = delta, result
            if out.stopped or _done(out, policy, record, search.intervened):
                break
            tick = time.perf_counter()
            g = objective.gradient()
            timing["evaluate"] += time.perf_counter() - tick
            out.gradient_norm = record.gradient_norm = float(g.norm()) / max(gnorm0, 1e-300)
            if out.gradient_norm <= policy.grad_tol:
                out.stopped = f"converged: ‖∇Φ‖ = {out.gradient_norm:.2g} × its start (grad_tol {policy.grad_tol:g})"
                break
            held = record.rho >= RHO_CONTINUE and not search.intervened
            start_damping = lowered(delta, scale[0] if scale else None, op.weight_decay) if held else delta
            _new_point(prepared, keep_models=held)
    except BaseException:
        _set(params, objective.theta0)
        raise
    finally:
        bar.close()
    _set(params, theta)
    out.seconds = dict(timing)
    return out


def _nearest(starts: dict[float, torch.Tensor], damping: float) -> torch.Tensor | None:
    """The solution of the trial at this point whose damping is nearest (in ratio) to ``damping``, for a warm start."""
    if not starts:
        return None
    return starts[min(starts, key=lambda d: abs(math.log((d + 1e-300) / (damping + 1e-300))))]


def _new_point(prepared: dict, keep_models: bool) -> None:
    """What a solve may reuse after an accepted step: never exact's dense C (its solve must be exact at
    the new point); the Kronecker models of kfac / ekfac and the preconditioner only while the quadratic
    model held (``keep_models``). A stale preconditioner stays valid but slows cg: on the 51k-sample CNN
    of benchmarks/, two steps (ρ < 0.75) took 124 s with the first point's Woodbury preconditioner
    kept and 40 s with it rebuilt."""
    for key in list(prepared):
        if key == "exact" or not keep_models:
            del prepared[key]


def _over_budget(policy: StepPolicy, seconds: float, passes: float) -> str:
    """Why the budget is spent, or "" (checked before each trial)."""
    if policy.budget_seconds is not None and seconds >= policy.budget_seconds:
        return f"budget: {seconds:.3g} s of {policy.budget_seconds:g} s spent"
    if policy.budget_passes is not None and passes >= policy.budget_passes:
        return f"budget: {passes:g} of {policy.budget_passes:g} passes made"
    return ""


def _trial(objective: RetainObjective, op: CurvatureOperator, spec: SolveSpec, prepared: dict, result: SolveResult,
           g: torch.Tensor, theta: torch.Tensor, value: float, size: float, delta: float, step_index: int,
           trust_region: bool) -> tuple[StepRecord, tuple[float, float]]:
    """Evaluate one solve's step Δ at θ + Δ (parameters left there): its record and (Φ, |L_S| there)."""
    step = result.solution[0]
    base = dict(step=step_index, damping=delta, relative_residual=float(result.relative_residual),
                iterations=int(result.iterations))
    if not torch.isfinite(step).all():
        return StepRecord(rho=-math.inf, predicted=math.nan, actual=math.nan, step_norm=math.nan, accepted=False,
                          note="non-finite step", **base), (math.nan, math.nan)
    curved = _model_product(op, spec, prepared, result, step, g, delta)
    predicted = -float(g.double() @ step.double()) - 0.5 * curved
    _set(objective.params, theta + step, trial=True)
    trial, trial_size = objective.value()
    actual = value - trial
    note = ""
    if result.indefinite:
        rho, note = -math.inf, f"negative curvature at damping {delta:.3g}: the curvature is indefinite there"
    elif not math.isfinite(trial):
        rho, note = -math.inf, "non-finite objective"
    elif not math.isfinite(predicted) or predicted <= 0:
        rho, note = -math.inf, f"the quadratic model predicts {'no' if predicted <= 0 else 'a non-finite'} decrease"
    else:
        rho = actual / predicted
        noise = ROUNDING * torch.finfo(theta.dtype).eps * max(size, trial_size)
        if predicted <= noise and abs(actual) <= noise:
            rho, note = 1.0, "decrease below rounding: taken as ρ = 1"
    if result.message and not result.converged and not result.approximate and not result.indefinite:
        note = "; ".join(filter(None, [note, result.message]))
    accepted = math.isfinite(trial) and math.isfinite(predicted) and (rho > RHO_ACCEPT or not trust_region)
    return StepRecord(rho=rho, predicted=predicted, actual=actual, step_norm=float(step.norm()), accepted=accepted,
                      note=note, **base), (trial, trial_size)


def _model_product(op: CurvatureOperator, spec: SolveSpec, prepared: dict, result: SolveResult, step: torch.Tensor,
                   g: torch.Tensor, delta: float) -> float:
    """ΔᵀBΔ for the curvature model B = M + λI that the step solved (without δ): the exact operator's, from
    the solve's own residual r = −g − (B + δI)Δ; for kfac / ekfac the Kronecker model's (a cheap product)."""
    if spec.solver in ("kfac", "ekfac"):
        model = replace(prepared[spec.solver], shift=op.weight_decay)
        return float(step.double() @ model.matvec(step.unsqueeze(0))[0].double())
    residual = result.residual[0] if result.residual is not None else -g - op.matvec(step.unsqueeze(0))[0]
    return float(step.double() @ (-g - residual).double()) - delta * float(step.double().pow(2).sum())


def _done(out: StepsOutcome, policy: StepPolicy, record: StepRecord, intervened: bool) -> bool:
    """Whether the steps end after an accepted one (module doc); sets ``out.stopped``."""
    if isinstance(policy.steps, int):
        if out.accepted >= policy.steps:
            out.stopped = f"steps: {policy.steps} accepted"
            return True
        return False
    if intervened or record.rho < RHO_CONTINUE:
        why = (f"the trust region rejected trials and settled at damping {record.damping:.3g}" if intervened
               else f"ρ = {record.rho:.3g} < {RHO_CONTINUE}")
        out.stopped = (f"the Newton step did not hold at step {out.accepted} ({why}); further steps would follow "
                       "the retain objective away from the trained model")
        return True
    if out.accepted >= AUTO_MAX_STEPS:
        out.stopped = f"steps: {AUTO_MAX_STEPS} accepted (the most steps='auto' takes)"
        return True
    return False


def _set(params: dict, flat: torch.Tensor, *, trial: bool = False) -> None:
    """Write the flat vector [P] into the parameters (in ``params`` order). ``trial``: a trial point or the
    return from one, written through ``.data`` so that the version counters stay: the curvature operator
    then finds the parameters bit-identical after the return and keeps its cached graphs and factors (it
    compares the contents too), where a versioned write would make it rebuild them for every trial."""
    with torch.no_grad():
        start = 0
        for p in params.values():
            (p.data if trial else p).copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


__all__ = ["AUTO_MAX_STEPS", "GRAD_TOL", "MAX_REJECTIONS", "RHO_ACCEPT", "RHO_CONTINUE", "SolveSpec", "StepPolicy",
           "StepRecord", "StepsOutcome", "newton_steps"]
