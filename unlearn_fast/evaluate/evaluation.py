"""One model evaluated on the splits of a SimilarDataset, with per-sample outputs computed once.

The splits are ``targets`` (the forget ids), ``similar`` (their planted near-duplicates),
``retain`` (train minus both) and ``test``. Metrics read the cached per-sample losses, correctness
and confidences, so the model runs over each split once however many metrics are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data.similar_dataset import SimilarDataset, as_tensors
from ..context import CONTEXT_ATTRIBUTE
from ..losses import Loss, check_loss, output_loss, per_sample_loss, upcast_half
from ..modes import eval_mode
from ..validation import check_finite, check_finite_parameters, check_labels_fit, check_number

SPLITS = ("targets", "similar", "retain", "test")
# Residual-influence denominator threshold, in nats. On digits-blockmask the per-target losses of
# two models trained on nearly the same data differ by ~0.001-0.003 for easy targets, so a gap of
# 0.02 keeps the per-target ratio's noise near ±0.1 (see metrics.residual_influence).
DEFAULT_RI_MIN_GAP = 0.02


@dataclass(frozen=True)
class SplitOutputs:
    """Per-sample outputs on one split, each [n] on CPU."""

    loss: torch.Tensor
    correct: torch.Tensor
    confidence: torch.Tensor  # softmax probability of the true label
    probabilities: torch.Tensor  # [n, classes] softmax outputs ([n, 0] when the outputs are not class logits)


@dataclass(frozen=True)
class ShadowEvidence:
    """Shadow-model outputs for one evaluated model, by split (``targets``, ``similar``), for the
    per-example attacks of :mod:`.lira` (the shadows are trained by :mod:`unlearn_fast.shadows`).

    Attributes:
        member: split → bool [S, n]: sample j was in shadow s's training data.
        shadow_phi: split → [S, n] logit-scaled confidence of each trained shadow; also on ``test``
            (never a member), which calibrates LiRA (see :func:`.lira.lira_per_sample`).
        method_phi: split → [S, n] the same after the evaluated method unlearned each shadow's member
            targets; None when the method was not run on the shadows.
    """

    member: dict[str, torch.Tensor]
    shadow_phi: dict[str, torch.Tensor]
    method_phi: dict[str, torch.Tensor] | None = None

    @property
    def count(self) -> int:
        return int(next(iter(self.member.values())).shape[0])


class MissingReference(ValueError):
    """A metric needs a reference model's evaluation (or its target losses) that was not given."""


# Metrics of non-finite outputs would be NaN (a loss-threshold AUC came out as mia_auc=nan, unannounced).
BROKEN_OUTPUTS = ("the model's weights or buffers (e.g. BatchNorm statistics) are broken or overflow on these inputs; "
                  "no metric of it is meaningful")


def _accumulate(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, losses: list[torch.Tensor],
                correct: list[torch.Tensor], confidence: list[torch.Tensor], probabilities: list[torch.Tensor],
                where: str, start: int) -> None:
    logits = model(x)
    logits = upcast_half(logits)
    check_finite(logits, "model outputs", f"on {where}", error=FloatingPointError, first_sample=start, hint=BROKEN_OUTPUTS)
    if loss == "cross_entropy" and logits.dim() == 2:  # checked on these outputs: no extra forward pass
        check_labels_fit(logits.shape[1], y, where)
    # A named loss is applied to these logits; a callable loss needs the model itself.
    per_sample = output_loss(loss, logits, y) if isinstance(loss, str) else per_sample_loss(model, loss, (x, y))
    check_finite(per_sample, "per-sample losses", f"on {where}", error=FloatingPointError, first_sample=start,
                 hint=BROKEN_OUTPUTS)
    losses.append(per_sample.cpu())
    if y.dim() == 1 and not y.is_floating_point() and logits.dim() == 2:
        probs = torch.softmax(logits.float(), dim=1)
        correct.append((logits.argmax(dim=1) == y).float().cpu())
        confidence.append(probs.gather(1, y[:, None]).squeeze(1).cpu())
        probabilities.append(probs.cpu())
    else:
        correct.append(torch.full((x.shape[0],), float("nan")))
        confidence.append(torch.full((x.shape[0],), float("nan")))
        probabilities.append(torch.zeros(x.shape[0], 0))


@torch.no_grad()
def split_outputs(model: nn.Module, loss: Loss, inputs: torch.Tensor, labels: torch.Tensor,
                  device: torch.device, batch_size: int = 1024, where: str = "the inputs") -> SplitOutputs:
    """Per-sample loss, correctness, true-label confidence and softmax outputs on (inputs [n, ...], labels [n, ...]).

    Correctness, confidence and probabilities need class labels (int64 [n]) and logits [n, classes];
    for other targets (e.g. regression with ``mse``) the first two are NaN and probabilities [n, 0].
    Non-finite outputs or losses raise a FloatingPointError naming ``where`` and the sample.
    """
    losses: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    confidence: list[torch.Tensor] = []
    probabilities: list[torch.Tensor] = []
    with eval_mode(model):
        for start in range(0, inputs.shape[0], batch_size):
            _accumulate(model, loss, inputs[start:start + batch_size].to(device), labels[start:start + batch_size].to(device),
                        losses, correct, confidence, probabilities, where, start)
    if not losses:
        empty = torch.zeros(0)
        return SplitOutputs(empty, empty, empty, torch.zeros(0, 0))
    return SplitOutputs(torch.cat(losses), torch.cat(correct), torch.cat(confidence), torch.cat(probabilities))


@dataclass
class Evaluation:
    """A model, the dataset it is judged on, and the reference target losses for residual influence.

    Attributes:
        loss: defaults to the model's recorded training loss, else "cross_entropy".
        device: defaults to the device of the model's parameters.
        reference_target_loss: per-target losses [K] of ``"original"`` and ``"oracle"`` (same order as
            ``dataset.forget_ids``); residual influence needs both. A name missing here is taken from
            ``references``, so giving the reference evaluations is enough.
        ri_min_gap: targets whose |ℓ_oracle − ℓ_original| is below this are left out of the residual
            influence mean (see :func:`unlearn_fast.evaluate.metrics.residual_influence`).
        references: evaluations of the reference models on the same dataset, by name (``"original"``,
            ``"oracle"``); the distance-to-oracle metrics (:mod:`.distance`) compare with them.
        shadows: shadow-model evidence for the per-example attacks (:mod:`.lira`); None: not run.
    """

    model: nn.Module
    dataset: SimilarDataset
    loss: Loss | None = None
    device: torch.device | str | None = None
    reference_target_loss: dict[str, torch.Tensor] = field(default_factory=dict)
    ri_min_gap: float = DEFAULT_RI_MIN_GAP
    references: dict[str, "Evaluation"] = field(default_factory=dict)
    shadows: ShadowEvidence | None = None
    _cache: dict[str, SplitOutputs] = field(default_factory=dict, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    _train_tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.dataset, SimilarDataset):
            raise ValueError(f"dataset must be a SimilarDataset (see unlearn_fast.load_dataset), got {type(self.dataset).__name__}")
        if self.loss is None:
            recorded = getattr(self.model, CONTEXT_ATTRIBUTE, None)
            self.loss = recorded.loss if recorded is not None else "cross_entropy"
        self.loss = check_loss(self.loss)
        if self.device is None:
            first = next(self.model.parameters(), None)
            self.device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(self.device)
        self.ri_min_gap = check_number(self.ri_min_gap, "ri_min_gap")
        check_finite_parameters(self.model, "the model's parameter",
                                "metrics of it would be NaN or meaningless, so none are computed")
        if self.reference_target_loss:
            self.reference_losses()

    def reference_losses(self) -> dict[str, torch.Tensor]:
        """Per-target losses [K] of each reference: ``reference_target_loss``, completed from the
        ``references`` evaluations for names it lacks; checked: one finite loss per target each.

        Checked here, at use, as well as at construction, since the study sets them afterwards.
        """
        targets = len(self.dataset.forget_ids)
        if not isinstance(self.reference_target_loss, dict):
            raise ValueError(f"reference_target_loss must be a dict name -> per-target losses [{targets}], "
                             f"got {type(self.reference_target_loss).__name__}")
        losses = {**{name: ev.outputs("targets").loss for name, ev in self.references.items()
                     if name not in self.reference_target_loss}, **self.reference_target_loss}
        for name, values in losses.items():
            what = f"reference_target_loss[{name!r}]"
            if not torch.is_tensor(values) or values.dim() != 1 or not values.is_floating_point():
                raise ValueError(f"{what} must be a 1-D float tensor of per-target losses [{targets}], got "
                                 f"{tuple(values.shape) if torch.is_tensor(values) else type(values).__name__}")
            if values.shape[0] != targets:
                raise ValueError(f"{what} has {values.shape[0]} values, but the dataset has {targets} targets "
                                 f"(dataset.forget_ids): give one loss per target, in that order")
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"{what} has non-finite values at targets {bad[:10]}: the reference model is broken")
        return losses

    def reference(self, name: str, metric: str) -> "Evaluation":
        """The reference evaluation ``name``; a clear error when the caller did not give it."""
        if name not in self.references:
            raise MissingReference(f"{metric} needs the {name!r} reference; give Evaluation(references={{{name!r}: Evaluation(...)}}) "
                             f"(given: {sorted(self.references) or 'none'})")
        return self.references[name]

    def split_ids(self, split: str) -> list[int]:
        ds = self.dataset
        if split == "targets":
            return list(ds.forget_ids)
        if split == "similar":
            return ds.similar_ids()
        if split == "retain":
            gone = set(ds.forget_ids) | set(ds.similar_ids())
            return [i for i in range(len(ds.train)) if i not in gone]  # type: ignore[arg-type]
        raise ValueError(f"split {split!r} has no train ids; valid: targets, similar, retain")

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [n, ...], labels [n]) of ``split`` (one of targets, similar, retain, test), on CPU."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if split == "test":
            return as_tensors(self.dataset.test)
        if self._train_tensors is None:  # a generic Dataset is read once, not once per split
            self._train_tensors = as_tensors(self.dataset.train)
        all_x, all_y = self._train_tensors
        index = torch.as_tensor(self.split_ids(split), dtype=torch.long)
        return all_x[index], all_y[index]

    def outputs(self, split: str) -> SplitOutputs:
        """Cached per-sample outputs on ``split`` (one of targets, similar, retain, test)."""
        if split not in self._cache:
            inputs, labels = self.split_tensors(split)
            self._cache[split] = split_outputs(self.model, self.loss, inputs, labels, self.device, where=f"the {split!r} split")
        return self._cache[split]

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per evaluation under ``key``: metrics that share costly work (a model
        inversion, shadow-model statistics) compute it once however many of them are asked for."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
