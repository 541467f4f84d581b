"""Unlearning methods: one registry (``METHODS``) and one entry point (:func:`unlearn`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..context import resolve_context
from ..validation import check_ids, resolve_device
from . import finetune as _finetune  # noqa: F401  (registers finetune, gradient_ascent)
from . import retrain as _retrain  # noqa: F401  (registers retrain, oracle)
from .registry import METHODS, UnlearnTask

from ..influence import unlearn as _influence  # noqa: E402,F401  (registers influence; needs the registry above)


def unlearn(
    model: nn.Module,
    forget_ids: Any,
    method: str = "retrain",
    *,
    data: Any = None,
    loss: Any = None,
    weight_decay: float | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    **hyper: Any,
) -> nn.Module:
    """Unlearn ``forget_ids`` from ``model`` with a registered method; returns a new model.

    ``model`` itself is left unchanged. Its training context supplies data, loss and weight decay;
    ``data``/``loss``/``weight_decay`` override them (or supply them for a model with no context). ``hyper`` overrides the method's
    documented defaults (``METHODS.get(name).defaults``). The returned model's context records the
    removed ids, so a later request removes both.
    """
    entry = METHODS.get(method)
    ctx = resolve_context(model, data=data, loss=loss, weight_decay=weight_decay)
    ids = check_ids(forget_ids, len(ctx.data))  # type: ignore[arg-type]
    already = sorted(set(ids) & set(ctx.removed_ids))
    if already:
        raise ValueError(f"forget_ids {already[:10]} were already unlearned from this model")
    hyper = METHODS.resolve_hyper(method, hyper)
    task = UnlearnTask(context=ctx, forget_ids=ids, device=resolve_device(device), progress=progress)
    return entry.fn(model, task, **hyper)


__all__ = ["METHODS", "UnlearnTask", "unlearn"]
