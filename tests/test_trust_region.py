"""The trust region of influence_unlearn: the objective it measures, how the damping moves, budgets,
rejection, and what every trial reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import unlearn_fast as uf
from helpers import LOGISTIC_LAMBDA, flat
from unlearn_fast.context import get_context
from unlearn_fast.influence import UnlearnWarning, damping, trust_region
from unlearn_fast.influence.curvature import CurvatureOperator
from unlearn_fast.influence.retain_objective import RetainObjective
from unlearn_fast.influence.vectors import trainable


def _big_forget(data: uf.SimilarDataset) -> list[int]:
    return sorted({*data.forget_ids, *data.similar_ids()})


def _objective(model, data, forget, gradient="forget"):
    ctx = get_context(model)
    x, y = ctx.tensors()
    retain = ctx.retain_ids(forget)
    params = trainable(model)
    objective = RetainObjective(model, ctx.loss, params, ctx.weight_decay, (x[forget], y[forget]), (x[retain], y[retain]),
                                gradient=gradient, n_retain=len(retain), batch_size=64)
    return objective, ctx, params, x, y, retain


@pytest.mark.parametrize("gradient", ["forget", "retain"])
def test_retain_objective_gradient_and_value(trained_mlp, small_digits, gradient):
    """∇Φ(θ₀) is the first step's gradient (influence or retain form), and Φ differs from the retain
    objective by a linear term only, so its value and gradient elsewhere follow from autograd."""
    model = copy.deepcopy(trained_mlp)
    forget = _big_forget(small_digits)
    objective, ctx, params, x, y, retain = _objective(model, small_digits, forget, gradient)
    lam, theta0 = ctx.weight_decay, objective.theta0

    def retain_objective():
        out = torch.nn.functional.cross_entropy(model(x[retain]), y[retain])
        return out + lam / 2 * sum(p.pow(2).sum() for p in params.values())

    grad_r = torch.cat([g.reshape(-1) for g in torch.autograd.grad(retain_objective(), list(params.values()))])
    if gradient == "retain":
        torch.testing.assert_close(objective.g0, grad_r, rtol=1e-5, atol=1e-7)
        assert float(objective.tilt.norm()) <= 1e-6 * float(grad_r.norm()) + 1e-9  # S = R: no tilt at all
    else:
        losses = torch.nn.functional.cross_entropy(model(x[forget]), y[forget], reduction="sum")
        grad_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses, list(params.values()))])
        torch.testing.assert_close(objective.g0, -(grad_f + len(forget) * lam * theta0) / len(retain), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(objective.gradient(), objective.g0, rtol=1e-4, atol=1e-7)
    value, size = objective.value()
    assert value == pytest.approx(objective.value0, rel=1e-6) and size > 0
    with torch.no_grad():  # elsewhere: Φ(θ) − Φ(θ₀) = L_R(θ) − L_R(θ₀) − tᵀ(θ − θ₀)
        base = float(retain_objective())
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
        moved = torch.cat([p.reshape(-1) for p in params.values()])
        expected = float(retain_objective()) - base - float(objective.tilt.double() @ (moved - theta0).double())
    assert objective.value()[0] - objective.value0 == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_every_trial_is_reported_and_rejections_change_nothing(trained_mlp, small_digits, monkeypatch):
    """With an acceptance threshold no step meets, every trial is rejected: the damping grows by
    DAMPING_GROWTH each time, the parameters stay bit-identical, and the report says why."""
    model = copy.deepcopy(trained_mlp)
    before = flat(model)
    monkeypatch.setattr(trust_region, "RHO_ACCEPT", math.inf)
    monkeypatch.setattr(trust_region, "MAX_REJECTIONS", 4)
    with pytest.raises(ValueError, match=r"no step was accepted \(rejected: 4 trials in a row at step 1.*left unchanged"):
        uf.influence_unlearn(model, small_digits.forget_ids, device="cpu", progress=False)
    assert torch.equal(flat(model), before) and get_context(model).removed_ids == ()
    with pytest.warns(UnlearnWarning):
        report = uf.influence_unlearn(model, small_digits.forget_ids, on_reject="warn", device="cpu", progress=False)
    assert torch.equal(flat(model), before) and report.accepted_steps == 0 and report.removed_ids == []
    dampings = [t.damping for t in report.trials]
    assert dampings[0] == 0 and dampings[1] > 0
    assert dampings[2:] == pytest.approx([dampings[1] * damping.DAMPING_GROWTH ** k for k in range(1, 3)])
    for t in report.trials:
        assert not t.accepted and math.isfinite(t.rho) and t.predicted > 0 and t.step_norm > 0 and t.iterations > 0
        assert t.rho == pytest.approx(t.actual / t.predicted) or t.note.startswith("decrease below rounding")


def _first_step(report):
    return [t for t in report.trials if t.step == 1]


def test_from_an_undamped_rejection_the_search_halves_down_to_the_smallest_accepted(trained_mlp, small_digits):
    """δ = 0 rejected, s accepted: halve while accepted, then one refining trial between the last
    accepted and the first rejected half. The smallest accepted damping is kept; the others are marked."""
    model = copy.deepcopy(trained_mlp)
    before = flat(model)
    report = uf.influence_unlearn(model, small_digits.forget_ids, device="cpu", progress=False)
    first = _first_step(report)
    acceptable = [t for t in first if t.accepted or "superseded" in t.note]
    assert first[0].damping == 0 and not first[0].accepted and acceptable[0] is first[1]
    scale = first[1].damping
    halves = [t.damping for t in first[1:] if t.damping <= scale]
    rejected_half = next(t for t in first[2:] if not t.accepted and "superseded" not in t.note)
    index = first.index(rejected_half)
    assert [t.damping for t in first[1:index + 1]] == pytest.approx([scale / 2 ** k for k in range(index)])
    assert len(halves) == len(first) - 1 and len(first) == index + 2  # then exactly one refining trial
    assert first[-1].damping == pytest.approx(math.sqrt(rejected_half.damping * first[index - 1].damping))
    kept = min(acceptable, key=lambda t: t.damping)
    assert [t for t in first if t.accepted] == [kept] and report.damping == kept.damping
    assert all("superseded" in t.note for t in acceptable if t is not kept)
    assert float((flat(model) - before).norm()) == pytest.approx(kept.step_norm, rel=1e-5)


def test_a_rejection_is_followed_by_one_refining_trial(trained_mlp, small_digits):
    model = copy.deepcopy(trained_mlp)
    report = uf.influence_unlearn(model, _big_forget(small_digits), damping=1e-5, device="cpu", progress=False)
    first = _first_step(report)
    tried = next(i for i, t in enumerate(first) if t.accepted or "superseded" in t.note)
    assert tried >= 1 and not any(t.accepted for t in first[:tried])  # the given damping was rejected first
    assert [t.damping for t in first[:tried + 1]] == pytest.approx([1e-5 * damping.DAMPING_GROWTH ** k for k in range(tried + 1)])
    refining = first[tried + 1]
    assert refining.damping == pytest.approx(math.sqrt(first[tried - 1].damping * first[tried].damping))
    kept = refining if refining.accepted else first[tried]
    assert [t for t in first if t.accepted] == [kept] and len(first) == tried + 2
    if refining.accepted:
        assert "superseded" in first[tried].note
    assert report.damping == kept.damping


def test_a_rejected_refinement_keeps_the_accepted_step(trained_mlp, small_digits, monkeypatch):
    """Force the refining trial (off the ×2 ladder) to be rejected: the ladder's accepted step is applied
    (the step of that damping solved alone, to the solve's tolerance: it was warm-started)."""
    forget = _big_forget(small_digits)
    real = trust_region._trial

    def refinement_rejected(*args, **kwargs):
        record, value = real(*args, **kwargs)
        ladder = math.log2(record.damping / 1e-5)
        if abs(ladder - round(ladder)) > 1e-6:
            record.accepted, record.note = False, "forced"
        return record, value

    monkeypatch.setattr(trust_region, "_trial", refinement_rejected)
    model = copy.deepcopy(trained_mlp)
    report = uf.influence_unlearn(model, forget, damping=1e-5, steps=1, device="cpu", progress=False)
    monkeypatch.setattr(trust_region, "_trial", real)
    assert report.trials[-1].note == "forced" and report.trials[-2].accepted
    before = flat(trained_mlp)
    assert float((flat(model) - before).norm()) == pytest.approx(report.trials[-2].step_norm, rel=1e-5)
    alone = copy.deepcopy(trained_mlp)
    uf.influence_unlearn(alone, forget, damping=report.damping, trust_region=False, steps=1, device="cpu", progress=False)
    assert float((flat(model) - flat(alone)).norm()) <= 1e-2 * float((flat(alone) - before).norm())


def test_an_error_mid_run_puts_the_model_back(breast_cancer_logistic, monkeypatch):
    """An exception after an accepted step (here while re-linearising) leaves the model as it was before
    the call, not half unlearned, and its context unchanged."""
    model, data, forget, _ = breast_cancer_logistic
    m = uf.attach(copy.deepcopy(model), data, "cross_entropy", weight_decay=LOGISTIC_LAMBDA)
    before = flat(m)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(RetainObjective, "gradient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        uf.influence_unlearn(m, forget, steps=2, device="cpu", progress=False)
    assert torch.equal(flat(m), before) and get_context(m).removed_ids == ()


def test_a_non_finite_objective_rejects_the_trial(trained_mlp, small_digits, monkeypatch):
    real, calls = RetainObjective.value, []

    def overflowing(self):
        calls.append(1)
        return (math.inf, math.inf) if len(calls) == 1 else real(self)

    monkeypatch.setattr(RetainObjective, "value", overflowing)
    report = uf.influence_unlearn(copy.deepcopy(trained_mlp), small_digits.forget_ids, damping=1e-2, device="cpu",
                                  progress=False)
    assert report.trials[0].note.startswith("non-finite objective") and not report.trials[0].accepted
    assert report.accepted_steps == 1 and report.damping > 1e-2


def test_a_budget_spent_during_the_search_keeps_the_best_accepted_step(trained_mlp, small_digits):
    full = uf.influence_unlearn(copy.deepcopy(trained_mlp), small_digits.forget_ids, device="cpu", progress=False)
    assert len(full.trials) > 3 and full.trials[1].damping > 0  # rejected at 0, accepted at s, then the search
    first_two = full.passes - sum(t.iterations + 2 for t in full.trials[2:])  # passes through the second trial
    model = copy.deepcopy(trained_mlp)
    report = uf.influence_unlearn(model, small_digits.forget_ids, budget_passes=first_two, device="cpu", progress=False)
    assert report.stopped.startswith("budget") and report.accepted_steps == 1 and len(report.trials) == 2
    assert report.damping == full.trials[1].damping and report.removed_ids == sorted(small_digits.forget_ids)


def test_auto_stops_where_the_trust_region_had_to_damp(trained_mlp, small_digits):
    """On the MLP the undamped first trial is rejected: steps='auto' takes one step; steps=2 takes two."""
    forget = _big_forget(small_digits)
    one = uf.influence_unlearn(copy.deepcopy(trained_mlp), forget, device="cpu", progress=False)
    assert not one.trials[0].accepted and one.trials[0].damping == 0
    assert one.accepted_steps == 1 and one.stopped.startswith("the Newton step did not hold")
    two = uf.influence_unlearn(copy.deepcopy(trained_mlp), forget, steps=2, device="cpu", progress=False)
    assert two.accepted_steps == 2 and two.stopped == "steps: 2 accepted"
    assert [t.gradient_norm is not None for t in two.trials if t.accepted] == [True, False]


def test_without_trust_region_the_first_finite_step_is_taken(trained_mlp, small_digits):
    model = copy.deepcopy(trained_mlp)
    before = flat(model)
    report = uf.influence_unlearn(model, _big_forget(small_digits), trust_region=False, steps=1, device="cpu",
                                  progress=False)
    assert len(report.trials) == 1 and report.trials[0].accepted and report.trials[0].rho < 0  # measured, not acted on
    assert float((flat(model) - before).norm()) == pytest.approx(report.trials[0].step_norm, rel=1e-5)


@pytest.mark.parametrize("budget", [{"budget_passes": 1}, {"budget_seconds": 1e-9}])
def test_a_spent_budget_leaves_the_model_unchanged(trained_mlp, small_digits, budget):
    model = copy.deepcopy(trained_mlp)
    before = flat(model)
    with pytest.raises(ValueError, match="no step was accepted \\(budget: .*left unchanged"):
        uf.influence_unlearn(model, small_digits.forget_ids, device="cpu", progress=False, **budget)
    assert torch.equal(flat(model), before)


def test_budget_in_passes_stops_between_trials(trained_mlp, small_digits, monkeypatch):
    monkeypatch.setattr(trust_region, "RHO_ACCEPT", math.inf)  # every trial rejected: only the budget ends them
    report = uf.influence_unlearn(copy.deepcopy(trained_mlp), small_digits.forget_ids, budget_passes=150,
                                  on_reject="warn", device="cpu", progress=False)
    assert report.stopped.startswith("budget:") and report.passes >= 150
    last = report.trials[-1]
    assert report.passes - (last.iterations + 2) < 150  # the last trial started within the budget


def test_zero_weight_decay_starts_at_the_curvature_scale(small_digits):
    """λ = 0: damping 'auto' starts at tr(C)/P, estimated within 15 % of the exact trace."""
    torch.manual_seed(0)
    model = uf.build_model("mlp", small_digits.input_shape, small_digits.num_classes, hidden=(8,))
    model = uf.train(model, small_digits, epochs=2, lr=0.1, batch_size=64, weight_decay=0.0, seed=0, device="cpu", progress=False)
    report = uf.influence_unlearn(copy.deepcopy(model), small_digits.forget_ids, device="cpu", progress=False)
    assert "mean eigenvalue" in report.damping_choice and report.trials[0].damping > 0
    ctx = get_context(model)
    x, y = ctx.tensors()
    retain = ctx.retain_ids(small_digits.forget_ids)
    op = CurvatureOperator(model, "cross_entropy", (x[retain], y[retain]), kind="ggn")
    exact = float(op.matvec(torch.eye(op.num_params)).diagonal().mean())
    assert report.trials[0].damping == pytest.approx(exact, rel=0.15)
    assert damping.curvature_scale(op) == report.trials[0].damping


def test_a_subset_of_samples_is_stated(trained_mlp, small_digits):
    report = uf.influence_unlearn(copy.deepcopy(trained_mlp), small_digits.forget_ids, curvature_samples=200, seed=3,
                                  device="cpu", progress=False)
    retained = len(small_digits.train) - len(small_digits.forget_ids)
    assert report.objective == f"a seeded subset of 200 of the {retained} retain samples (seed 3)"


def test_kronecker_factors_are_fitted_once_per_point(trained_mlp, small_digits):
    report = uf.influence_unlearn(copy.deepcopy(trained_mlp), _big_forget(small_digits), solver="ekfac", device="cpu",
                                  progress=False)
    assert report.trials[0].iterations == 2 and all(t.iterations == 0 for t in report.trials[1:] if t.step == 1)


def test_hessian_negative_curvature_raises_the_damping(breast_cancer_logistic, trained_mlp, small_digits):
    """The Hessian of the trained MLP is indefinite: the undamped trial is rejected and a damped one
    accepted; on logistic regression (Hessian = GGN, positive definite) the undamped one is accepted."""
    report = uf.influence_unlearn(copy.deepcopy(trained_mlp), _big_forget(small_digits), curvature="hessian",
                                  device="cpu", progress=False)
    assert not report.trials[0].accepted and report.damping > 0
    model, data, forget, _ = breast_cancer_logistic
    m = uf.attach(copy.deepcopy(model), data, "cross_entropy", weight_decay=LOGISTIC_LAMBDA)
    convex = uf.influence_unlearn(m, forget, curvature="hessian", device="cpu", progress=False)
    assert convex.trials[0].accepted and convex.damping == 0 and convex.stopped.startswith("converged")


def test_trials_keep_the_curvature_operators_caches(trained_mlp, small_digits):
    """A trial point and the return from it are written without version bumps: back at the same bits,
    the operator keeps its cached graphs; an accepted step's versioned write makes it rebuild them."""
    model = copy.deepcopy(trained_mlp)
    ctx = get_context(model)
    x, y = ctx.tensors()
    params = trainable(model)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", weight_decay=ctx.weight_decay)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0))
    first = op.matvec(v)
    cache = op._ggn_cache
    assert cache
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()]).clone()
    trust_region._set(params, theta + 0.1, trial=True)
    trust_region._set(params, theta, trial=True)
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    assert op._ggn_cache is cache
    trust_region._set(params, theta + 0.1)
    op.matvec(v)
    assert op._ggn_cache is not cache
