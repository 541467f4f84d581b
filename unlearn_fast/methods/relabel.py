"""Relabelling baselines: fine-tune on the forget samples given wrong labels.

``random_label`` (random wrong labels, mixed with retain data), ``salun`` (the same, updating only
the weights most salient to the forget loss) and ``boundary_shrink`` (each forget sample relabelled
to its nearest wrong class). All three need class labels: int64 labels [N] and logits [N, classes].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..influence.per_sample import loss_gradient
from ..influence.vectors import as_dict, as_flat, trainable
from ..losses import Loss, per_sample_loss
from ..modes import eval_mode
from ..train import fit
from ..validation import check_bool, check_number
from .registry import METHODS, UnlearnTask, derived_model

# Samples per forward pass when a method scores the whole forget set (saliency, FGSM labels):
# bounds memory on large forget sets and large models without changing the result.
_CHUNK = 256


def _chunks(inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, inputs.shape[0], _CHUNK):
        yield inputs[start:start + _CHUNK].to(device), labels[start:start + _CHUNK].to(device)


def _num_classes(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> int:
    """The model's number of classes; a ValueError unless labels are class ids [N] and outputs logits [N, C]."""
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"relabelling needs integer class labels [N], got dtype {labels.dtype} shape {tuple(labels.shape)}")
    with torch.no_grad(), eval_mode(model):
        logits = model(inputs[:1].to(device))
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"relabelling needs logits [B, classes >= 2], the model gives {tuple(logits.shape)}")
    return int(logits.shape[1])


def random_wrong_labels(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A label drawn uniformly from the other ``num_classes - 1`` classes for each of labels [N] → [N].

    Shifting the true label by 1..C-1 (mod C) never returns it; the draw has its own generator,
    so it repeats for a given ``seed`` and leaves the global RNG alone.
    """
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels.cpu() + shift) % num_classes


def nearest_wrong_labels(model: nn.Module, loss: Loss, inputs: torch.Tensor, labels: torch.Tensor, epsilon: float,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Boundary Shrink's neighbour labels (Chen et al. 2023): the most likely wrong class after one
    FGSM step, x' = x + ε·sign(∇ₓ ℓ(f(x), y)), for (inputs [N, ...], labels [N]) → labels [N] (CPU).

    The step moves each sample toward its closest decision boundary, so the class that gains most
    there is its nearest wrong class. Where the step does not cross the boundary the argmax is
    still the true class, so the true class is excluded: the result never equals ``labels``.
    """
    device = torch.device(device)
    out = []
    with eval_mode(model):
        for x, y in _chunks(inputs, labels, device):
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(per_sample_loss(model, loss, (x, y)).sum(), x)
            with torch.no_grad():
                logits = model(x + epsilon * grad.sign()).float()
                logits[torch.arange(len(y), device=device), y] = float("-inf")
                out.append(logits.argmax(dim=1).cpu())
    return torch.cat(out)


def saliency_mask(model: nn.Module, loss: Loss, inputs: torch.Tensor, labels: torch.Tensor, fraction: float,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """SalUn's weight saliency (Fan et al. 2024): name → bool mask [*shape] that keeps the ``fraction``
    of trainable weights (over the whole model, exactly round(fraction·P) of the P weights, at least
    one) with the largest |∇θ Σᵢ ℓ(f(xᵢ), yᵢ)| over the forget set (inputs [N, ...], labels [N]).
    """
    device = torch.device(device)
    params = trainable(model)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in _chunks(inputs, labels, device):
        for name, g in loss_gradient(model, loss, batch, params).items():
            total[name] += g
    flat = as_flat(as_dict(total, params), params)[0].abs()  # [P], in params order
    keep = max(1, round(fraction * flat.numel()))
    # topk picks exactly ``keep`` weights even when magnitudes tie (e.g. many exact zeros).
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    return {name: mask[0] for name, mask in as_dict(chosen, params).items()}


def _with_retain(task: UnlearnTask, forget_x: torch.Tensor, new_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabelled forget samples followed by the retain set: (inputs [m + r, ...], labels [m + r])."""
    retain_x, retain_y = task.tensors(task.retain_ids())
    return torch.cat([forget_x, retain_x]), torch.cat([new_labels.to(retain_y.dtype), retain_y])


def _start(model: nn.Module, task: UnlearnTask, epochs: int, lr: float,
           batch_size: int | None) -> tuple[dict[str, Any], nn.Module, torch.Tensor, torch.Tensor, int]:
    """The validated recipe, the copy to train, the forget tensors and the number of classes."""
    recipe = task.recipe(epochs=epochs, lr=lr, batch_size=batch_size)  # None: the recorded value, as for every method
    out = derived_model(model, task, task.forget_ids).to(task.device)
    forget_x, forget_y = task.tensors(task.forget_ids)
    return recipe, out, forget_x, forget_y, _num_classes(out, forget_x, forget_y, task.device)


# All three default to 2 epochs with the recorded batch size, weight decay and (cosine) schedule;
# random_label and salun share the lr too, so that they differ by the mask alone.
@METHODS.register("random_label", epochs=2, lr=0.005, batch_size=None)
def random_label(model: nn.Module, task: UnlearnTask, *, epochs: int, lr: float, batch_size: int | None) -> nn.Module:
    """Fine-tune on the forget samples relabelled with random wrong classes, mixed with the retain set.

    Graves et al. 2021, "Amnesiac Machine Learning" (AAAI); the random-labels baseline of Golatkar
    et al. 2020, "Eternal Sunshine of the Spotless Net" (CVPR). One wrong label per forget sample
    is drawn once from the recipe seed (:func:`random_wrong_labels`); an epoch is one shuffled pass
    over forget ∪ retain.

    Defaults: 2 epochs at lr 0.005. Measured on the quick digits-blockmask task unlearning the 50
    targets and their 500 near-duplicates (seeds 0 / 1): the targets' loss climbs steeply with the
    step count; lr 0.005 brings it to the oracle's (0.174 / 0.220 against 0.171 / 0.278, from
    0.012 / 0.027) with test accuracy within 0.011 of the original's, while lr 0.0075 already
    over-shoots (0.35 / 0.40) and 1 epoch at lr 0.01 ends with test accuracy about 3 points down
    at seed 0. The near-duplicates' loss only gets part of the way (0.45 / 0.47 against the oracle's 1.25 / 1.54):
    relabelling moves a target and its copies together, so it cannot reach the oracle's copies
    without over-unlearning the targets.
    """
    recipe, out, forget_x, forget_y, classes = _start(model, task, epochs, lr, batch_size)
    inputs, labels = _with_retain(task, forget_x, random_wrong_labels(forget_y, classes, recipe["seed"]))
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc="random_label")


@METHODS.register("salun", epochs=2, lr=0.005, batch_size=None, salient_fraction=0.5)
def salun(model: nn.Module, task: UnlearnTask, *, epochs: int, lr: float, batch_size: int | None,
          salient_fraction: float) -> nn.Module:
    """Random-label fine-tuning that updates only the weights salient to the forget loss (SalUn).

    Fan et al. 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency"
    (ICLR). The mask keeps the ``salient_fraction`` of weights with the largest |gradient| of the
    forget loss at the original model (:func:`saliency_mask`); the others stay exactly as they
    were, since their gradient, weight decay and momentum are all masked. (Buffers such as
    BatchNorm's running statistics still update in training mode.) Then as :func:`random_label`.

    Defaults: the paper's 50% mask, and random_label's schedule (2 epochs at lr 0.005), so that the
    two differ by the mask alone. Measured on the quick task as for random_label (seeds 0 / 1):
    target loss 0.151 / 0.195 (oracle 0.171 / 0.278), near-duplicate loss 0.42 / 0.44, test
    accuracy 0.953 / 0.953 (original 0.958 / 0.962). A 10% or 25% mask at this lr moves the
    targets less (0.05-0.12); lr 0.0075 with the 50% mask over-shoots (0.31 / 0.36).
    """
    fraction = check_number(salient_fraction, "salient_fraction", low_open=True, high=1.0)
    recipe, out, forget_x, forget_y, classes = _start(model, task, epochs, lr, batch_size)
    masks = saliency_mask(out, task.loss, forget_x, forget_y, fraction, task.device)
    params = trainable(out)
    weight_decay = recipe["weight_decay"]
    # Weight decay is applied here, under the mask, rather than by the optimiser, which would
    # shrink the frozen weights too; momentum then only ever sees masked steps.
    recipe = {**recipe, "weight_decay": 0.0}

    def mask_gradients() -> None:
        for name, p in params.items():
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=weight_decay).mul_(masks[name])

    inputs, labels = _with_retain(task, forget_x, random_wrong_labels(forget_y, classes, recipe["seed"]))
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc="salun",
               after_backward=mask_gradients)


@METHODS.register("boundary_shrink", epochs=2, lr=0.01, batch_size=None, epsilon=0.1, retain=True)
def boundary_shrink(model: nn.Module, task: UnlearnTask, *, epochs: int, lr: float, batch_size: int | None,
                    epsilon: float, retain: bool) -> nn.Module:
    """Fine-tune on the forget samples relabelled to their nearest wrong class (Boundary Shrink).

    Chen et al. 2023, "Boundary Unlearning: Rapid Forgetting of Deep Networks via Shifting the
    Decision Space" (CVPR). The neighbour labels come from one FGSM step of size ``epsilon`` (in
    input units) against the original model (:func:`nearest_wrong_labels`). The paper fine-tunes on
    the relabelled forget samples alone (``retain=False``); ``retain=True`` mixes in the retain set
    as random_label and salun do.

    Defaults: epsilon 0.1 (inputs in [0, 1]) takes 76-83% of the quick task's forget samples across
    the boundary (0.03: 19%; 0.3 crosses all but lands past the nearest class more often). The
    retain set is mixed in because forget-only training lost 5-8 points of test accuracy on the way
    to the targets: at 2 epochs, lr 0.005 reached the oracle's target loss (0.164 / 0.271 at seeds
    0 / 1; oracle 0.171 / 0.278) with test accuracy 0.907 / 0.884 (original 0.958 / 0.962). With the
    retain set, lr 0.01 for 2 epochs gives target loss 0.157 / 0.162, near-duplicate loss
    0.47 / 0.45 (oracle 1.25 / 1.54) and test accuracy 0.947 / 0.953; the target loss grows
    smoothly with lr (0.09-0.11 at 0.005, 0.30 at 0.02).
    """
    eps = check_number(epsilon, "epsilon", low_open=True)
    keep_retain = check_bool(retain, "retain")
    recipe, out, forget_x, forget_y, _ = _start(model, task, epochs, lr, batch_size)
    new_labels = nearest_wrong_labels(out, task.loss, forget_x, forget_y, eps, task.device).to(forget_y.dtype)
    inputs, labels = _with_retain(task, forget_x, new_labels) if keep_retain else (forget_x, new_labels)
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc="boundary_shrink")
