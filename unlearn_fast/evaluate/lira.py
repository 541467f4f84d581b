"""Per-example membership inference with shadow models: LiRA and U-LiRA.

LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"): for each sample,
shadow models trained with it ("in") and without it ("out") give two distributions of its
logit-scaled confidence φ = log(p_y / (1 − p_y)). Each is modelled as a Gaussian; the attack scores
a model by the log-likelihood ratio Λ = log N(φ; μ_in, σ²_in) − log N(φ; μ_out, σ²_out) and calls
the sample a member when Λ > 0. With few shadows the per-sample variances are unreliable, so the
variances are pooled over samples (Carlini et al.'s "fixed variance" variant); the means stay per sample.

U-LiRA (Hayes et al. 2024, "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense
of Privacy"): shadows that contain a target are *unlearned* with the method under test, and the
attack must tell them from shadows that never saw the target. Per-target attack accuracy of 0.5
means the method's output is indistinguishable from never having trained on it. Here every shadow
goes through the same unlearning request (its own half of the targets), and "never saw" means
without the target *and* its near-duplicates. Both kinds of model have then had the same amount of
data removed by the same method, so the attack can only use the target's own trace, and a method
that leaves the near-duplicates' influence in place is detectable. Hayes et al. score held-out
models; we score each shadow in turn against Gaussians fitted on the others (leave-one-shadow-out),
which needs no extra models.

The shadows themselves are trained by :mod:`unlearn_fast.shadows`; this module holds the statistics
and the metrics, which read ``Evaluation.shadows`` (a :class:`ShadowEvidence`).
"""

from __future__ import annotations

import math

import torch

from .evaluation import Evaluation, ShadowEvidence
from .registry import CLOSEST_TO_ORACLE, METRICS, shadow_metrics
from .stats import mean_or_nan

LIRA_MIN_SHADOWS = 2   # one "in" and one "out" model per sample
ULIRA_MIN_SHADOWS = 4  # leave-one-out still keeps one model of each kind per sample
_VAR_FLOOR = 1e-6      # identical shadows (zero spread) would make the Gaussians degenerate


def logit_confidence(loss: torch.Tensor) -> torch.Tensor:
    """φ = log(p / (1 − p)) of the true-label probability p = exp(−loss), from cross-entropy losses [n] → [n].

    Computed as −ℓ − log(−expm1(−ℓ)), which stays accurate when p is within float error of 1.
    """
    loss = loss.double()
    one_minus_p = -torch.expm1(-loss)
    return -loss - torch.log(one_minus_p.clamp_min(1e-300))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``values`` [S, n] where ``mask`` [S, n]; NaN for columns with no entry."""
    count = mask.sum(0)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _pooled_variance(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Variance pooled over columns: Σ (x − μ_col)² / (entries − columns with an entry), floored."""
    residual = torch.where(mask, values - mean, torch.zeros_like(values))
    dof = mask.sum() - (mask.sum(0) > 0).sum()
    if dof <= 0:
        return torch.tensor(_VAR_FLOOR, dtype=values.dtype)
    return (residual.pow(2).sum() / dof).clamp_min(_VAR_FLOOR)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean).pow(2) / var)


def gaussian_fit(phi: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample means [n], pooled variance []) of φ [S, n] over the rows where ``mask`` [S, n]."""
    mean = _masked_mean(phi, mask)
    return mean, _pooled_variance(phi, mask, mean)


def lira_scores(phi: torch.Tensor, shadow_phi: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """LiRA log-likelihood ratios Λ [n] of a model's φ [n] against shadows' φ [S, n] with membership [S, n].

    Λ > 0: the sample looks like a member. NaN where a sample has no "in" or no "out" shadow.
    """
    _check_shadow_shapes(shadow_phi, member, LIRA_MIN_SHADOWS, "LiRA")
    phi, shadow_phi = phi.double(), shadow_phi.double()
    mu_in, var_in = gaussian_fit(shadow_phi, member)
    mu_out, var_out = gaussian_fit(shadow_phi, ~member)
    return _log_normal(phi, mu_in, var_in) - _log_normal(phi, mu_out, var_out)


def ulira_accuracy(phi: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per-sample U-LiRA attack accuracy [n], leave-one-shadow-out.

    ``phi`` [S, n]: logit-scaled confidence of each shadow after the unlearning method ran on it;
    ``member`` [S, n]: the sample was in that shadow's training data (and so was unlearned) rather
    than never seen. For each shadow s, Gaussians of both kinds are fitted on other shadows, with as
    many models of each kind (the larger kind's surplus is set aside with s); shadow s's own φ is then
    classified by the larger likelihood (ties count ½), and the accuracy averages over shadows.
    0.5: unlearned and never-seen models are indistinguishable.
    """
    _check_shadow_shapes(phi, member, ULIRA_MIN_SHADOWS, "U-LiRA")
    observed = phi.double()
    correct = torch.full_like(observed, math.nan)
    rows = torch.arange(member.shape[0])[:, None]
    for s in range(member.shape[0]):
        # Leaving shadow s out would leave its own kind one model short for each sample (and with odd
        # S the kinds differ by one already), and a mean fitted on fewer models sits farther from a
        # fresh draw: under no signal the attack would score away from 0.5. So each sample keeps the
        # first k models of each kind, k the smaller count.
        others = rows != s
        inside, outside = member & others, ~member & others
        k = torch.minimum(inside.sum(0), outside.sum(0))
        keep = (inside & (inside.cumsum(0) <= k)) | (outside & (outside.cumsum(0) <= k))
        mu_u, var_u = gaussian_fit(observed, member & keep)
        mu_n, var_n = gaussian_fit(observed, ~member & keep)
        llr = _log_normal(observed[s], mu_u, var_u) - _log_normal(observed[s], mu_n, var_n)
        says_unlearned = torch.where(llr == 0, torch.full_like(llr, 0.5), (llr > 0).double())
        right = torch.where(member[s], says_unlearned, 1 - says_unlearned)
        correct[s] = torch.where(torch.isnan(llr), torch.full_like(llr, math.nan), right)
    return torch.nanmean(correct, dim=0)


def _check_shadow_shapes(shadow_phi: torch.Tensor, member: torch.Tensor, minimum: int, attack: str) -> None:
    if shadow_phi.dim() != 2 or member.shape != shadow_phi.shape or member.dtype != torch.bool:
        raise ValueError(f"{attack} needs shadow φ [S, n] and a bool membership [S, n] of the same shape; got "
                         f"{tuple(shadow_phi.shape)} and {tuple(member.shape)} ({member.dtype})")
    if shadow_phi.shape[0] < minimum:
        raise ValueError(f"{attack} needs at least {minimum} shadow models, got S={shadow_phi.shape[0]}; "
                         f"run the study with shadows >= {minimum}")


# ------------------------------------------------------------------------------------------------
# Metrics


def _evidence(ev: Evaluation, metric: str) -> ShadowEvidence:
    evidence = ev.shadows
    if evidence is None:
        raise ValueError(f"{metric} needs shadow models: run the study with shadows >= {LIRA_MIN_SHADOWS} "
                         "(or give Evaluation(shadows=ShadowEvidence(...)))")
    return evidence


def lira_per_sample(ev: Evaluation, split: str) -> torch.Tensor:
    """LiRA Λ [n] of ``ev.model`` on ``split`` (targets or similar), memoised on ``ev``.

    The evaluated model need not have been trained on as much data as the shadows (``original``
    saw every target, the oracle none, a shadow half), and more data means more confidence
    everywhere. Before scoring, its φ is shifted by the median over test samples (members of no
    model) of φ_shadows − φ_model, so only a target-specific difference can read as membership.
    """
    def compute() -> torch.Tensor:
        evidence = _evidence(ev, f"lira_member_rate_{split}")
        test_shift = (evidence.shadow_phi["test"].mean(0) - logit_confidence(ev.outputs("test").loss)).median()
        phi = logit_confidence(ev.outputs(split).loss) + test_shift
        return lira_scores(phi, evidence.shadow_phi[split], evidence.member[split])

    return ev.memo(f"lira/{split}", compute)


def ulira_per_target(ev: Evaluation) -> torch.Tensor:
    """U-LiRA accuracy per forget target [K] for the method that made ``ev.model``, memoised on ``ev``."""
    def compute() -> torch.Tensor:
        evidence = _evidence(ev, "ulira_accuracy_targets")
        if evidence.method_phi is None:
            raise ValueError("ulira_accuracy_targets needs the evaluated method run on the shadow models "
                             "(ShadowEvidence.method_phi is None)")
        return ulira_accuracy(evidence.method_phi["targets"], evidence.member["targets"])

    return ev.memo("ulira/targets", compute)


def _register_lira(split: str) -> None:
    def member_rate(ev: Evaluation) -> float:
        scores = lira_per_sample(ev, split)
        return mean_or_nan((scores[~torch.isnan(scores)] > 0).double())

    member_rate.__doc__ = (f"Per-example LiRA on the {split} split: the fraction whose likelihood ratio says 'member' "
                           "(shadows trained with vs without each target and its near-duplicates). Compare with the "
                           "oracle's row, the attack's false-positive rate on models that never saw them.")
    METRICS.register(f"lira_member_rate_{split}", meta={"shadows": LIRA_MIN_SHADOWS, "best": CLOSEST_TO_ORACLE},
                     description=f"LiRA: fraction of {split} called members (oracle row = false positives)")(member_rate)


for _split in ("targets", "similar"):
    _register_lira(_split)


@METRICS.register("ulira_accuracy_targets", meta={"shadows": ULIRA_MIN_SHADOWS, "best": CLOSEST_TO_ORACLE},
                  description="U-LiRA: per-target accuracy telling unlearned from never-trained shadows (0.5 ideal)")
def ulira_accuracy_targets(ev: Evaluation) -> float:
    """Mean over targets of the U-LiRA attack accuracy: shadows that trained on the target, then
    unlearned it with this row's method, against shadows that never saw it or its near-duplicates
    (and unlearned other targets the same way). 0.5 is ideal; ``original``'s row (no unlearning) is
    the attack's power."""
    values = ulira_per_target(ev)
    return mean_or_nan(values[~torch.isnan(values)])


# Read from the entries above (no family registers shadow metrics but this one); the study asks the
# registry itself (unlearn_fast.evaluate.registry.shadow_metrics).
SHADOW_METRICS = shadow_metrics()
