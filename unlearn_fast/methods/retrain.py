"""Retraining references: ``retrain`` (without the targets) and ``oracle`` (without their near-duplicates too)."""

from __future__ import annotations

import torch
from torch import nn

from ..train import fit
from .registry import METHODS, UnlearnTask, derived_model


def _reinitialise(model: nn.Module, task: UnlearnTask, seed: int) -> None:
    """Put ``model`` back at its pre-training weights.

    Uses the recorded initial weights; failing those, re-draws a zoo model from its spec with
    ``seed`` (without touching the global RNG). ``reset_parameters`` is not enough in general
    (plain Parameters and some modules would keep trained values), so other models must supply
    their initial weights through ``attach(..., initial_state=...)``.
    """
    if task.context.initial_state is not None:
        model.load_state_dict(task.context.initial_state)
        return
    spec = getattr(model, "unlearn_fast_spec", None)
    if spec is None:
        raise ValueError(
            "retraining needs the model's initial weights: train it with unlearn_fast.train, build it with "
            "unlearn_fast.build_model, or pass attach(..., initial_state=<state_dict before training>)"
        )
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec["options"])
    model.load_state_dict(fresh.state_dict())


def _retrain_without(model: nn.Module, task: UnlearnTask, removed: list[int], desc: str, **overrides: object) -> nn.Module:
    keep = task.context.retain_ids(removed)
    if not keep:
        ctx = task.context
        earlier = f", {len(ctx.removed_ids)} by earlier ones" if ctx.removed_ids else ""
        raise ValueError(f"{desc}: forgetting all {len(ctx.data)} training samples leaves nothing to retrain on "  # type: ignore[arg-type]
                         f"({len(removed)} removed by this request{earlier}); keep at least one sample")
    recipe = task.recipe(**overrides)
    out = derived_model(model, task, removed)
    _reinitialise(out, task, recipe["seed"])
    inputs, labels = task.tensors(keep)
    return fit(out, inputs, labels, recipe, task.loss, device=task.device, progress=task.progress, desc=desc)


@METHODS.register("retrain", epochs=None, lr=None, batch_size=None)
def retrain(model: nn.Module, task: UnlearnTask, *, epochs: int | None, lr: float | None, batch_size: int | None) -> nn.Module:
    """Retrain from the same initialisation with the same recipe and seed, without the forget ids.

    Options left at None take the recorded recipe's value.
    """
    return _retrain_without(model, task, task.forget_ids, "retrain", epochs=epochs, lr=lr, batch_size=batch_size)


@METHODS.register("oracle", epochs=None, lr=None, batch_size=None)
def oracle(model: nn.Module, task: UnlearnTask, *, epochs: int | None, lr: float | None, batch_size: int | None) -> nn.Module:
    """Retrain without the forget ids and every known near-duplicate of them (needs ground truth)."""
    similar = task.context.similar
    if similar is None:
        raise ValueError("oracle needs near-duplicate ground truth: train on a SimilarDataset or attach(..., similar={target: [ids]})")
    # Near-duplicates of earlier requests' targets go too: the oracle never saw any of them.
    targets = [*task.forget_ids, *task.context.removed_ids]
    removed = sorted({*task.forget_ids, *(j for t in targets for j in similar.get(t, []))} - set(task.context.removed_ids))
    return _retrain_without(model, task, removed, "oracle", epochs=epochs, lr=lr, batch_size=batch_size)
