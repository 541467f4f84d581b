"""Shadow models for the per-example attacks (LiRA, U-LiRA; see :mod:`unlearn_fast.evaluate.lira`).

Every shadow is trained like ``original`` (same model, recipe and retain data) from its own seed,
on the retain data plus a random half of the forget targets *with their near-duplicates*. The other
half of the targets, and their near-duplicates, it never sees: for those targets it is an
oracle-like model. Each target is in exactly ⌊S/2⌋ or ⌈S/2⌉ of the S shadows.

Only target membership varies between shadows; the retain data is fixed. That isolates the targets'
own influence (the attacks only have to explain the targets' outputs) and makes a few shadows go a
long way, which is what a CPU budget allows. Carlini et al. (2022) draw every shadow's data at
random instead; their attack's statistics are the same.

The shadow records that it never saw its "out" targets as already-removed ids in its training
context, so any unlearning method applied to it (:func:`method_phi`) retains exactly its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .context import attach
from .data.similar_dataset import SimilarDataset, as_tensors
from .evaluate.evaluation import Evaluation
from .evaluate.lira import LIRA_MIN_SHADOWS, ShadowEvidence, logit_confidence
from .models import build_model
from .train import fit, make_recipe
from .validation import check_positive_int

# Shadow s of study seed k draws its init, data order and membership from this offset + 100·k + s,
# so no shadow repeats the original's (seed k) or another study seed's draws.
SHADOW_SEED_OFFSET = 10_000
MAX_SHADOWS = 100  # beyond it shadow seeds of one study seed would run into the next one's
SPLITS_WITH_SHADOWS = ("targets", "similar")
# Held-out samples, members of no model: LiRA calibrates each model's overall confidence on them.
CALIBRATION_SPLIT = "test"


@dataclass
class ShadowSet:
    """S trained shadows of one dataset and their target membership.

    Attributes:
        models: the shadows, each carrying its training context (out targets as removed ids).
        member_targets: bool [S, K]: target k (in ``data.forget_ids`` order) was in shadow s's data.
        data: the dataset they were trained on.
    """

    models: list[nn.Module]
    member_targets: torch.Tensor
    data: SimilarDataset

    def membership(self) -> dict[str, torch.Tensor]:
        """Split → bool [S, n]: sample j of the split was in shadow s's data (a near-duplicate goes with its target)."""
        targets = list(self.data.forget_ids)
        position = {t: k for k, t in enumerate(targets)}
        owner = {j: position[t] for t in targets for j in self.data.similar.get(t, [])}
        similar_ids = self.data.similar_ids()
        similar = self.member_targets[:, [owner[j] for j in similar_ids]] if similar_ids else self.member_targets[:, :0]
        return {"targets": self.member_targets, "similar": similar}

    def forget_ids(self, s: int) -> list[int]:
        """The targets shadow s trained on: what an unlearning method is asked to remove from it."""
        return [t for t, inside in zip(self.data.forget_ids, self.member_targets[s].tolist()) if inside]


def balanced_membership(count: int, n_targets: int, seed: int) -> torch.Tensor:
    """bool [count, n_targets]: each column has ⌊count/2⌋ or ⌈count/2⌉ True rows, drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    member = torch.zeros(count, n_targets, dtype=torch.bool)
    for k in range(n_targets):
        order = torch.randperm(count, generator=generator)
        inside = count // 2 + (count % 2) * int(torch.randint(0, 2, (), generator=generator))
        member[order[:inside], k] = True
    return member


def train_shadows(data: SimilarDataset, model_name: str, recipe: dict[str, Any], count: int, seed: int,
                  device: torch.device, progress: bool = False) -> ShadowSet:
    """Train ``count`` shadows of (``model_name``, ``recipe``) on ``data`` for study seed ``seed``.

    ``recipe`` holds the training options of :func:`unlearn_fast.train` (epochs, lr, batch_size,
    weight_decay, ...); its ``seed`` is replaced by each shadow's own.
    """
    count = check_positive_int(count, "shadows", minimum=LIRA_MIN_SHADOWS,
                               hint=f"the per-example attacks need at least {LIRA_MIN_SHADOWS} shadow models")
    if count > MAX_SHADOWS:
        raise ValueError(f"shadows={count}: at most {MAX_SHADOWS} (shadow seeds are {SHADOW_SEED_OFFSET} + 100·seed + s)")
    base_seed = SHADOW_SEED_OFFSET + 100 * seed
    member = balanced_membership(count, len(data.forget_ids), base_seed)
    inputs, labels = as_tensors(data.train)
    models = []
    for s in tqdm(range(count), desc="shadows", disable=not progress, leave=False, unit="model"):
        never = [t for t, inside in zip(data.forget_ids, member[s].tolist()) if not inside]
        removed = sorted({*never, *(j for t in never for j in data.similar.get(t, []))})
        kept = torch.as_tensor(sorted(set(range(len(labels))) - set(removed)), dtype=torch.long)
        shadow_recipe = make_recipe(**{**recipe, "seed": base_seed + s})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seed + s)
            model = build_model(model_name, data.input_shape, data.num_classes)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fit(model, inputs[kept], labels[kept], shadow_recipe, "cross_entropy", device=device, progress=False, desc="shadow")
        models.append(attach(model, data, "cross_entropy", weight_decay=shadow_recipe["weight_decay"], removed_ids=removed,
                             recipe=shadow_recipe,
                             initial_state=initial))
    return ShadowSet(models, member, data)


def model_phi(model: nn.Module, data: SimilarDataset, device: torch.device,
              splits: tuple[str, ...] = SPLITS_WITH_SHADOWS) -> dict[str, torch.Tensor]:
    """Split → [n]: logit-scaled confidence of ``model`` on ``splits`` (default: targets and near-duplicates)."""
    ev = Evaluation(model, data, loss="cross_entropy", device=device)
    return {split: logit_confidence(ev.outputs(split).loss) for split in splits}


def shadow_phi(shadows: ShadowSet, device: torch.device) -> dict[str, torch.Tensor]:
    """Split → [S, n]: each trained shadow's logit-scaled confidence, on the test split too (for calibration)."""
    splits = (*SPLITS_WITH_SHADOWS, CALIBRATION_SPLIT)
    rows = [model_phi(m, shadows.data, device, splits) for m in shadows.models]
    return {split: torch.stack([r[split] for r in rows]) for split in splits}


def method_phi(shadows: ShadowSet, method: str, options: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Split → [S, n]: φ after ``method`` unlearned each shadow's member targets.

    ``method`` is a registered method name with ``options`` for :func:`unlearn_fast.unlearn`, or
    ``"original"`` (no unlearning: U-LiRA then measures the attack's power).
    """
    from .methods import unlearn

    rows = []
    for s, model in enumerate(shadows.models):
        forget = shadows.forget_ids(s)
        changed = model if method == "original" or not forget else unlearn(model, forget, method, device=device,
                                                                          progress=False, **options)
        rows.append(model_phi(changed, shadows.data, device))
    return {split: torch.stack([r[split] for r in rows]) for split in SPLITS_WITH_SHADOWS}


def evidence(shadows: ShadowSet, base_phi: dict[str, torch.Tensor],
             after_method: dict[str, torch.Tensor] | None) -> ShadowEvidence:
    """The :class:`ShadowEvidence` an Evaluation carries for the attacks."""
    return ShadowEvidence(member=shadows.membership(), shadow_phi=base_phi, method_phi=after_method)
