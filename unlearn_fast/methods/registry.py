"""The one registry of unlearning methods, and the task every method receives.

A method is ``fn(model, task, **hyper) -> model``: it returns the unlearned model and leaves
``model`` untouched. It is registered with its defaults and a one-line description.

``unlearn`` (the one dispatch to a method) runs every method behind the same checks
(:func:`check_method_input`, :func:`check_method_output`), so that no method, present or future,
starts from a model with NaN or inf weights or with fewer class scores than the data has classes,
and none returns a non-finite model: a diverging method raises, naming itself and the first
non-finite parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..context import TrainingContext, set_context
from ..losses import Loss
from ..registry import Registry
from ..validation import check_class_scores, check_finite_parameters
from .expansion import SimilarExpansion

Method = Callable[..., nn.Module]
# A method's second random stream (a second data stream, an incompetent teacher's init) is seeded
# with the recipe seed + this, so it never repeats the first stream or the original's own draw.
SECOND_STREAM_SEED_OFFSET = 1


def check_method_input(model: nn.Module, context: TrainingContext, method: str) -> None:
    """Refuse a model no method can unlearn from: NaN/inf parameters (they spread through every
    update, and the curvature-based methods would misreport them as an overflow), or fewer class
    scores than the training labels need (torch's own error is "Target 3 is out of bounds")."""
    check_finite_parameters(model, f"{method}: the input model's parameter",
                            "refusing to unlearn from a non-finite model; load or train a finite one")
    if context.loss == "cross_entropy":
        inputs, labels = context.tensors()
        check_class_scores(model, inputs, labels, "the training data")


def check_method_output(model: nn.Module, producer: str, hint: str) -> None:
    """A FloatingPointError (an ArithmeticError, which ``tune`` scores as a failed trial) naming the
    ``producer`` of ``model`` and its first non-finite parameter; ``hint`` ends the message."""
    check_finite_parameters(model, f"{producer} produced non-finite parameters:", hint, error=FloatingPointError)


METHODS: Registry[Method] = Registry("method")


@dataclass
class UnlearnTask:
    """What a method needs besides the model.

    Attributes:
        context: the model's training context (data, loss, weight decay, recipe, removed ids).
        forget_ids: validated train ids to unlearn in this request.
        device: resolved torch device.
        progress: whether to show progress bars.
        similar: the near-duplicate expansion that made ``forget_ids`` (None: no expansion asked).
    """

    context: TrainingContext
    forget_ids: list[int]
    device: torch.device
    progress: bool = True
    similar: SimilarExpansion | None = None

    @property
    def data(self) -> Dataset:
        return self.context.data

    @property
    def loss(self) -> Loss:
        return self.context.loss

    def tensors(self, ids: list[int], on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [len(ids), ...], labels [len(ids)]) of train samples ``ids``; on ``self.device`` if asked."""
        inputs, labels = self.context.tensors()
        index = torch.as_tensor(ids, dtype=torch.long)
        if on_device:
            return inputs[index].to(self.device), labels[index].to(self.device)
        return inputs[index], labels[index]

    def retain_ids(self, extra_removed: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Train ids kept after this request (and any earlier ones), minus ``extra_removed``."""
        return self.context.retain_ids([*self.forget_ids, *extra_removed])

    def recipe(self, **overrides: Any) -> dict[str, Any]:
        """The training recipe with non-None ``overrides``; needs a recorded recipe for missing keys."""
        recipe = {**self.context.recipe, **{k: v for k, v in overrides.items() if v is not None}}
        from ..train import make_recipe

        missing = [k for k in ("epochs", "lr", "batch_size") if k not in recipe]
        if missing:
            raise ValueError(
                f"no training recipe recorded for {missing}: the model was attached, not trained with "
                f"unlearn_fast.train; pass them as method options (e.g. epochs=..., lr=..., batch_size=...)"
            )
        recipe.setdefault("weight_decay", self.context.weight_decay)
        return make_recipe(**{k: recipe[k] for k in ("epochs", "lr", "batch_size", "weight_decay")},
                           **{k: recipe[k] for k in ("momentum", "schedule", "seed", "amp") if k in recipe})


def derived_model(model: nn.Module, task: UnlearnTask, removed: list[int]) -> nn.Module:
    """A copy of ``model`` whose context records ``removed`` as unlearned too."""
    out = copy.deepcopy(model)
    ctx = copy.deepcopy(task.context)
    ctx.removed_ids = tuple(sorted({*ctx.removed_ids, *removed}))
    return set_context(out, ctx)
