"""The one loss convention (docs/architecture.md).

A loss is a name applied as ``loss(model(inputs), targets)`` per sample (``cross_entropy``: the
usual per-sample cross-entropy; ``mse``: the squared error summed over output dimensions), or a callable
``(model, batch) -> per-sample losses [B]``. Everything per-sample goes through
:func:`per_sample_loss`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Loss = Union[str, LossFn]


def upcast_half(out: torch.Tensor) -> torch.Tensor:
    # Losses of half-precision (AMP) outputs are computed in float32; float64 stays float64.
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def output_loss(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The named per-sample loss of model outputs [B, ...] against targets → [B].

    ``cross_entropy``: outputs [B, classes], targets int64 [B]. ``mse``: the squared error summed
    over output dimensions (not averaged, unlike F.mse_loss), targets shaped like the outputs.
    """
    outputs = upcast_half(outputs)
    if name == "cross_entropy":
        if outputs.dim() != 2:
            raise ValueError(f"cross_entropy needs model outputs [B, classes], got {tuple(outputs.shape)}; use a callable loss")
        return F.cross_entropy(outputs, targets, reduction="none")
    if name == "mse":
        if targets.numel() != outputs.numel():
            raise ValueError(
                f"mse needs targets shaped like the model's outputs {tuple(outputs.shape)}, got {tuple(targets.shape)}; "
                "for class labels use loss='cross_entropy'"
            )
        err = (outputs - targets.to(outputs.dtype).reshape(outputs.shape)) ** 2
        return err.reshape(err.shape[0], -1).sum(dim=1)
    raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(NAMED_LOSSES)}")


def _named(name: str) -> LossFn:
    def apply(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return output_loss(name, model(inputs), targets)

    return apply


NAMED_LOSSES: dict[str, LossFn] = {name: _named(name) for name in ("cross_entropy", "mse")}


def check_loss(loss: Loss) -> Loss:
    """Return ``loss`` unchanged if valid; a ValueError naming the valid choices otherwise."""
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(NAMED_LOSSES)} or a callable (model, batch) -> [B]")
        return loss
    if callable(loss):
        return loss
    raise ValueError(f"loss must be a name ({', '.join(NAMED_LOSSES)}) or a callable (model, batch) -> [B], got {loss!r}")


def per_sample_loss(model: nn.Module, loss: Loss, batch: Batch) -> torch.Tensor:
    """Per-sample losses [B] of ``model`` on ``batch`` = (inputs [B, ...], targets [B, ...])."""
    fn = NAMED_LOSSES[loss] if isinstance(loss, str) else loss
    out = fn(model, batch)
    if out.dim() != 1 or out.shape[0] != batch[0].shape[0]:
        raise ValueError(f"loss must return per-sample losses of shape [{batch[0].shape[0]}], got {tuple(out.shape)}")
    return out


class _LossOf(nn.Module):
    """``loss(model, batch)`` as a module that holds ``model`` as its submodule ``model``, so that
    ``functional_call`` on it swaps the model's own tensors for the call and the loss still gets the model."""

    def __init__(self, model: nn.Module, loss: Loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return per_sample_loss(self.model, self.loss, batch)


def per_sample_loss_at(model: nn.Module, loss: Loss, batch: Batch, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """:func:`per_sample_loss` with ``model``'s parameters and buffers named in ``state`` (name → tensor,
    any of ``named_parameters`` / ``named_buffers``) replaced by those tensors for this one call
    (torch.func.functional_call: differentiable in ``state``, under ``grad``, ``vjp`` and ``vmap`` too).

    A callable loss is handed ``model`` itself, not a wrapper: it may call it by keyword
    (``model(input_ids=..., attention_mask=...)``), read ``model.config`` or any other attribute, test
    ``isinstance`` and ``model.training``, and a parameter it reads directly (``model.lm_head.weight``)
    is the one in ``state``. Tied parameters follow the name given in ``state``. The model's own
    tensors are back in place when the call returns.
    """
    return functional_call(_LossOf(model, loss), {f"model.{n}": t for n, t in state.items()}, (batch,))
