"""The training loop. ``train`` fits a model and records its training context on it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .context import TrainingContext, split_data, set_context
from .data.similar_dataset import as_tensors
from .losses import Loss, check_loss, per_sample_loss
from .validation import check_choice, check_class_scores, check_number, check_positive_int, resolve_device

SCHEDULES = ("constant", "cosine")


def make_recipe(
    *, epochs: int, lr: float, batch_size: int, weight_decay: float, momentum: float = 0.9,
    schedule: str = "cosine", seed: int = 0, amp: bool = True,
) -> dict[str, Any]:
    """A validated SGD recipe. weight_decay=λ is SGD's: the objective is mean loss + (λ/2)‖θ‖²."""
    return {
        "optimizer": "sgd",
        "epochs": check_positive_int(epochs, "epochs"),
        "lr": check_number(lr, "lr", low_open=True),
        "batch_size": check_positive_int(batch_size, "batch_size"),
        "weight_decay": check_number(weight_decay, "weight_decay"),
        "momentum": check_number(momentum, "momentum", high=1.0, high_open=True),
        "schedule": check_choice(schedule, SCHEDULES, "schedule"),
        "seed": check_positive_int(seed, "seed", minimum=0),
        "amp": bool(amp),
    }


class IndexStream:
    """Shuffled mini-batches of range(n) [≤ batch_size] on ``device``, a fresh permutation each epoch,
    drawn from its own seeded generator (CPU runs repeat exactly)."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if n == 0:
            raise ValueError("cannot train on an empty set of samples")
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_per_epoch = (n + batch_size - 1) // batch_size
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def next(self) -> torch.Tensor:
        if self._cursor >= self._order.numel():
            self._order = torch.randperm(self.n, generator=self.generator).to(self.device)
            self._cursor = 0
        batch = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return batch


def sgd_loop(
    model: nn.Module,
    recipe: dict[str, Any],
    objective: Callable[[], torch.Tensor],
    steps_per_epoch: int,
    *,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    after_backward: Callable[[], None] | None = None,
) -> nn.Module:
    """Minimise ``objective()`` (a scalar; it draws its own batches) for recipe["epochs"] × steps_per_epoch
    SGD steps with the recipe's lr, momentum, weight decay and schedule; returns ``model`` in eval mode.

    ``after_backward`` runs between backward and the step (e.g. to mask gradients). Under CUDA with
    recipe["amp"], the objective runs in bfloat16 autocast. Every training loop of the project, the
    unlearning methods' included, is this one.
    """
    model.to(device).train()
    epochs = recipe["epochs"]
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) if recipe["schedule"] == "cosine" else None
    use_amp = recipe.get("amp", True) and device.type == "cuda"
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for _ in bar:
        total = torch.zeros((), device=device)
        for _ in range(steps_per_epoch):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
            with autocast:
                value = objective()
            opt.zero_grad(set_to_none=True)
            value.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += value.detach().float()  # stays on the device: no sync per step
        if progress:
            bar.set_postfix(objective=f"{float(total) / steps_per_epoch:.4f}")
    return model.eval()


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    recipe: dict[str, Any],
    loss: Loss,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    desc: str = "train",
    sign: float = 1.0,
    after_backward: Callable[[], None] | None = None,
) -> nn.Module:
    """Run ``recipe`` on (inputs [N, ...], labels [N]) and return ``model`` (trained in place).

    Deterministic on CPU for a given ``recipe["seed"]``: the shuffling uses its own generator.
    ``sign=-1`` ascends the loss instead (gradient ascent); weight decay still pulls toward 0.
    ``after_backward`` runs between each backward and step (see :func:`sgd_loop`).
    """
    dev = resolve_device(device)
    x, y = inputs.to(dev), labels.to(dev)
    stream = IndexStream(x.shape[0], recipe["batch_size"], recipe["seed"], dev)

    def objective() -> torch.Tensor:
        idx = stream.next()
        return sign * per_sample_loss(model, loss, (x[idx], y[idx])).mean()

    return sgd_loop(model, recipe, objective, stream.batches_per_epoch, device=dev, progress=progress, desc=desc,
                    after_backward=after_backward)


def train(
    model: nn.Module,
    data: Any,
    *,
    loss: Loss = "cross_entropy",
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    schedule: str = "cosine",
    seed: int = 0,
    device: str | torch.device = "auto",
    amp: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` with SGD on ``data`` and record the training context on it.

    Args:
        model: maps inputs [B, ...] to outputs [B, ...] for ``loss``.
        data: a torch Dataset of (input, label) or a SimilarDataset (its ``train`` split is used
            and its near-duplicate ground truth recorded).
        loss: "cross_entropy", "mse" or a callable (model, batch) -> per-sample losses [B].
        weight_decay: λ; the objective is mean loss + (λ/2)‖θ‖² (torch SGD's convention).
        seed: seeds the shuffling order; CPU runs with the same seed and initial model repeat exactly.
        device: "auto" (CUDA with bf16 autocast when present, else CPU), "cpu" or "cuda[:N]".

    Returns:
        ``model``, trained in place, in eval mode, carrying ``unlearn_fast_context``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data, similar = split_data(data)
    recipe = make_recipe(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         momentum=momentum, schedule=schedule, seed=seed, amp=amp)
    loss = check_loss(loss)
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    inputs, labels = as_tensors(data)
    if loss == "cross_entropy":
        check_class_scores(model, inputs, labels, "the training data")
    fit(model, inputs, labels, recipe, loss, device=device, progress=progress)
    ctx = TrainingContext(data=data, loss=loss, weight_decay=recipe["weight_decay"], recipe=recipe,
                          similar=similar, initial_state=initial_state)
    return set_context(model, ctx)
