"""LiRA and U-LiRA: the statistics on simulated shadows with known answers, the shadow trainer, and the study wiring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unlearn_fast as uf
from unlearn_fast.evaluate import Evaluation, ShadowEvidence, compute_metrics
from unlearn_fast.evaluate.lira import lira_scores, logit_confidence, ulira_accuracy
from unlearn_fast.shadows import (
    balanced_membership,
    method_phi,
    shadow_phi,
    train_shadows,
)

NORMAL = torch.distributions.Normal(0.0, 1.0)


def simulated(count: int, n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(φ [S, n], membership [S, n], per-sample centre [n]): members' φ ~ N(centre + shift, 1), others N(centre, 1)."""
    g = torch.Generator().manual_seed(seed)
    member = balanced_membership(count, n, seed)
    centre = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    phi = centre + torch.randn(count, n, generator=g, dtype=torch.float64) + shift * member
    return phi, member, centre


def test_logit_confidence_is_log_odds_and_stays_finite():
    p = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(logit_confidence(-torch.log(p)), torch.log(p / (1 - p)), rtol=1e-10, atol=1e-12)
    tiny = logit_confidence(torch.tensor([1e-12, 0.0]))
    assert torch.isfinite(tiny).all() and tiny[0] == pytest.approx(-math.log(1e-12), rel=1e-6)


@settings(max_examples=10, deadline=None)
@given(count=st.sampled_from([4, 5, 6, 7, 8]), seed=st.integers(0, 1000))
def test_ulira_without_signal_is_a_coin_flip(count, seed):
    # Unlearned and never-seen shadows from one distribution: no attack beats 0.5 on average, for
    # odd S too (where the kinds differ in size). 30000 samples: the mean's standard error is at
    # most sqrt(0.25 / 30000) = 0.0029, so ±0.012 is 4 sigma; an unequal-size fit was 0.515 at S=5.
    phi, member, _ = simulated(count, 30000, shift=0.0, seed=seed)
    assert float(ulira_accuracy(phi, member).mean()) == pytest.approx(0.5, abs=0.012)


def test_ulira_separated_shadows_are_always_told_apart():
    phi, member, _ = simulated(6, 500, shift=20.0, seed=1)
    assert torch.equal(ulira_accuracy(phi, member), torch.ones(500, dtype=torch.float64))


def test_ulira_accuracy_grows_with_the_shift_and_stays_below_the_bayes_rate():
    # With known Gaussians of unit variance the best accuracy is Φ(d/2); means fitted on S−2 shadows
    # can only lose some of it.
    values = [float(ulira_accuracy(*simulated(8, 4000, shift=d, seed=2)[:2]).mean()) for d in (0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values)
    for d, value in zip((0.5, 1.0, 2.0, 4.0), values):
        assert 0.5 < value <= float(NORMAL.cdf(torch.tensor(d / 2))) + 0.01


def test_lira_member_rate_matches_the_gaussian_answer():
    # 32 shadows: the fitted means and pooled variance are close to the truth, so the member rate of a
    # model drawn from the "in" distribution is P(N(d,1) > d/2) = Φ(d/2), from "out" 1 − Φ(d/2).
    d = 2.0
    phi, member, centre = simulated(32, 6000, shift=d, seed=3)
    g = torch.Generator().manual_seed(4)
    inside = centre + d + torch.randn(6000, generator=g, dtype=torch.float64)
    outside = centre + torch.randn(6000, generator=g, dtype=torch.float64)
    expected = float(NORMAL.cdf(torch.tensor(d / 2)))
    assert float((lira_scores(inside, phi, member) > 0).double().mean()) == pytest.approx(expected, abs=0.02)
    assert float((lira_scores(outside, phi, member) > 0).double().mean()) == pytest.approx(1 - expected, abs=0.02)


def test_too_few_shadows_and_bad_shapes_are_refused():
    phi, member, centre = simulated(4, 10, shift=1.0, seed=5)
    with pytest.raises(ValueError, match="at least 2 shadow models, got S=1"):
        lira_scores(centre, phi[:1], member[:1])
    with pytest.raises(ValueError, match="at least 4 shadow models, got S=3"):
        ulira_accuracy(phi[:3], member[:3])
    with pytest.raises(ValueError, match="bool membership"):
        ulira_accuracy(phi, member.double())
    with pytest.raises(ValueError, match="same shape"):
        lira_scores(centre, phi, member[:, :5])


@pytest.mark.parametrize("count", [2, 5, 8])
def test_balanced_membership_splits_every_target_in_half(count):
    member = balanced_membership(count, 40, seed=9)
    assert set(member.sum(0).tolist()) <= {count // 2, (count + 1) // 2}
    assert torch.equal(member, balanced_membership(count, 40, seed=9))
    assert not torch.equal(member, balanced_membership(count, 40, seed=10))


def test_metrics_read_the_evidence_and_say_when_it_is_missing(trained_mlp, small_digits):
    ev = Evaluation(trained_mlp, small_digits, device="cpu")
    with pytest.raises(ValueError, match="shadows >= 2"):
        compute_metrics(ev, ["lira_member_rate_targets"])
    phi = {s: logit_confidence(ev.outputs(s).loss) for s in ("targets", "similar")}
    member = {s: balanced_membership(4, v.numel(), seed=0) for s, v in phi.items()}
    # Shadows that trained on a sample look exactly like this model, those that did not sit 10 nats lower:
    # every sample is called a member.
    shadows = {s: torch.where(member[s], phi[s] + 0.01 * torch.randn(4, phi[s].numel(), dtype=torch.float64),
                              phi[s] - 10) for s in phi}
    test_phi = logit_confidence(ev.outputs("test").loss)
    shadows["test"] = test_phi.expand(4, -1).clone()
    ev.shadows = ShadowEvidence(member=member, shadow_phi=shadows)
    values = compute_metrics(ev, ["lira_member_rate_targets", "lira_member_rate_similar"])
    assert values == {"lira_member_rate_targets": 1.0, "lira_member_rate_similar": 1.0}
    # Shadows 10 nats more confident on everything, test samples included: the calibration on test
    # removes the overall shift, and the verdicts stay.
    shifted = Evaluation(trained_mlp, small_digits, device="cpu")
    shifted.shadows = ShadowEvidence(member=member, shadow_phi={s: v + 10 for s, v in shadows.items()})
    assert compute_metrics(shifted, ["lira_member_rate_targets"])["lira_member_rate_targets"] == 1.0
    uncalibrated = lira_scores(phi["targets"], shadows["targets"] + 10, member["targets"])
    assert float((uncalibrated > 0).double().mean()) == 0.0  # without it, every target would read as unseen
    with pytest.raises(ValueError, match="method_phi is None"):
        compute_metrics(ev, ["ulira_accuracy_targets"])
    ev.shadows = ShadowEvidence(member=member, shadow_phi=shadows, method_phi=shadows)
    assert compute_metrics(ev, ["ulira_accuracy_targets"])["ulira_accuracy_targets"] == 1.0


def test_shadows_train_on_their_half_and_record_the_rest_as_removed(small_digits):
    from unlearn_fast.data import default_recipe

    recipe = default_recipe("digits-blockmask")
    name = recipe.pop("model")
    recipe["epochs"] = 2
    shadows = train_shadows(small_digits, name, recipe, 4, seed=0, device=torch.device("cpu"))
    member = shadows.membership()
    assert member["targets"].shape == (4, len(small_digits.forget_ids))
    assert member["similar"].shape == (4, len(small_digits.similar_ids()))
    for s, model in enumerate(shadows.models):
        never = [t for t, inside in zip(small_digits.forget_ids, member["targets"][s].tolist()) if not inside]
        expected = sorted({*never, *(j for t in never for j in small_digits.similar[t])})
        assert list(model.unlearn_fast_context.removed_ids) == expected
        assert set(shadows.forget_ids(s)).isdisjoint(expected)
    # Near-duplicates share their target's membership.
    position = {t: k for k, t in enumerate(small_digits.forget_ids)}
    owners = [position[t] for j in small_digits.similar_ids() for t in small_digits.forget_ids if j in small_digits.similar[t]]
    assert torch.equal(member["similar"], member["targets"][:, owners])
    base = shadow_phi(shadows, torch.device("cpu"))
    untouched = method_phi(shadows, "original", {}, torch.device("cpu"))
    assert set(base) == {"targets", "similar", "test"} and set(untouched) == {"targets", "similar"}
    assert all(torch.equal(base[s], untouched[s]) for s in untouched)
    retrained = method_phi(shadows, "retrain", {}, torch.device("cpu"))
    assert not torch.equal(retrained["targets"], base["targets"])
    with pytest.raises(ValueError, match="shadows"):
        train_shadows(small_digits, name, recipe, 1, seed=0, device=torch.device("cpu"))


def test_study_validates_shadow_counts():
    from unlearn_fast.study import run_study

    with pytest.raises(ValueError, match="shadows=1"):
        run_study(methods=["finetune"], seeds=1, shadows=1, progress=False)
    with pytest.raises(ValueError, match="shadows=101: .*at most 100"):
        run_study(methods=["finetune"], seeds=1, shadows=101, progress=False)
    with pytest.raises(ValueError, match="need shadow models"):
        run_study(methods=["finetune"], seeds=1, shadows=0, metrics=["ulira_accuracy_targets"], progress=False)
    with pytest.raises(ValueError, match="shadows >= 4"):
        run_study(methods=["finetune"], seeds=1, shadows=2, metrics=["ulira_accuracy_targets"], progress=False)


def test_study_runs_the_attacks_on_shadows(tmp_path):
    import json

    from unlearn_fast.study import run_study

    records = run_study(methods=["finetune"], seeds=1, similar=[3], quick=True, shadows=4, progress=False, out=tmp_path,
                        dataset_options={"targets": 6},
                        metrics=["target_acc", "lira_member_rate_targets", "ulira_accuracy_targets"])
    assert {r["method"] for r in records} == {"original", "retrain", "oracle", "finetune"}
    for r in records:
        assert r["shadows"] == 4
        assert 0.0 <= r["ulira_accuracy_targets"] <= 1.0 and 0.0 <= r["lira_member_rate_targets"] <= 1.0
    details = json.loads((tmp_path / "details.json").read_text())
    (condition,) = details["conditions"]
    assert set(condition["ulira_accuracy"]) == {"original", "retrain", "oracle", "finetune"}
    assert all(len(v) == 6 for v in condition["ulira_accuracy"].values())
    assert uf.load_dataset("digits-blockmask", targets=6, copies=3, seed=0).forget_ids == condition["target_ids"]


def test_two_shadows_give_lira_without_ulira():
    from unlearn_fast.study import run_study

    records = run_study(methods=["finetune"], seeds=1, similar=[3], quick=True, shadows=2, progress=False,
                        dataset_options={"targets": 6})
    assert all("lira_member_rate_targets" in r and "ulira_accuracy_targets" not in r for r in records)
    assert {r["shadows"] for r in records} == {2}
