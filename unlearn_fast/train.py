"""The training loop. ``train`` fits a model and records its training context on it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .context import TrainingContext, split_data, set_context
from .data.similar_dataset import as_tensors
from .losses import Loss, check_loss, per_sample_loss
from .validation import check_choice, check_number, check_positive_int, resolve_device

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
) -> nn.Module:
    """Run ``recipe`` on (inputs [N, ...], labels [N]) and return ``model`` (trained in place).

    Deterministic on CPU for a given ``recipe["seed"]``: the shuffling uses its own generator.
    ``sign=-1`` ascends the loss instead (gradient ascent); weight decay still pulls toward 0.
    """
    dev = resolve_device(device)
    model.to(dev).train()
    x, y = inputs.to(dev), labels.to(dev)
    n, bs, epochs = x.shape[0], recipe["batch_size"], recipe["epochs"]
    if n == 0:
        raise ValueError("cannot train on an empty set of samples")
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = (n + bs - 1) // bs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) if recipe["schedule"] == "cosine" else None
    gen = torch.Generator().manual_seed(recipe["seed"])
    use_amp = recipe.get("amp", True) and dev.type == "cuda"
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
            with autocast:
                batch_loss = per_sample_loss(model, loss, (x[idx], y[idx])).mean()
            opt.zero_grad(set_to_none=True)
            (sign * batch_loss).backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += batch_loss.detach().float() * idx.numel()  # stays on the device: no sync per step
        if progress:
            bar.set_postfix(loss=f"{float(total) / n:.4f}")
    return model.eval()


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
    fit(model, inputs, labels, recipe, loss, device=device, progress=progress)
    ctx = TrainingContext(data=data, loss=loss, weight_decay=recipe["weight_decay"], recipe=recipe,
                          similar=similar, initial_state=initial_state)
    return set_context(model, ctx)
