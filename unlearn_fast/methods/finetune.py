"""Fine-tuning baselines: keep training on the retain set, or ascend the loss on the forget set."""

from __future__ import annotations

from torch import nn

from ..train import fit
from .registry import METHODS, UnlearnTask, derived_model


@METHODS.register("finetune", epochs=5, lr=0.02, batch_size=None)
def finetune(model: nn.Module, task: UnlearnTask, *, epochs: int, lr: float, batch_size: int | None) -> nn.Module:
    """Continue training on the retain set, so that the forget set fades by catastrophic forgetting.

    Defaults: 5 epochs at lr 0.02 (a fifth of the usual training lr) with a cosine schedule,
    the recorded batch size and weight decay (Warnecke et al. 2023 and Golatkar et al. 2020 use the
    same baseline).
    """
    recipe = task.recipe(epochs=epochs, lr=lr, batch_size=batch_size)
    out = derived_model(model, task, task.forget_ids)
    inputs, labels = task.tensors(task.retain_ids())
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc="finetune")


@METHODS.register("gradient_ascent", epochs=5, lr=0.05, batch_size=None)
def gradient_ascent(model: nn.Module, task: UnlearnTask, *, epochs: int, lr: float, batch_size: int | None) -> nn.Module:
    """Ascend the mean loss on the forget set (Thudi et al. 2022, "NegGrad").

    Defaults: 5 epochs at lr 0.05, constant schedule, the recorded batch size. Gradient ascent is
    unbounded: on digits-blockmask (seed 0, no near-duplicates) lr 0.01 left the targets untouched,
    0.05 moved them part of the way with test accuracy unchanged, and 0.1 over-shot the oracle,
    so 0.05 is the default. Searching it against the oracle is ``unlearn-fast tune``'s job.
    """
    recipe = {**task.recipe(epochs=epochs, lr=lr, batch_size=batch_size), "schedule": "constant"}
    out = derived_model(model, task, task.forget_ids)
    inputs, labels = task.tensors(task.forget_ids)
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc="gradient_ascent", sign=-1.0)
