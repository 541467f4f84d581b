"""Embeddings to index: a model's features at one layer, or the raw inputs flattened.

Texts are embedded by the bundled MiniLM in :mod:`.text`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..modes import eval_mode
from ..validation import check_choice, check_positive_int, resolve_device


def _as_tensor(inputs: Any, what: str = "inputs") -> torch.Tensor:
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"{what} must be a tensor or numpy array [N, ...], got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty batch [N, ...], got shape {tuple(inputs.shape)}")
    return inputs


def input_features(inputs: Any) -> torch.Tensor:
    """Raw inputs [N, ...] flattened to features [N, d] (d = product of the other dims; [N] gives [N, 1]).

    Floating inputs keep their dtype (a view where the layout allows); integer inputs (e.g. uint8
    images) become float32. No batching: a reshape costs nothing per sample.
    """
    x = _as_tensor(inputs)
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.float()


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    named = dict(model.named_modules())
    if layer is None:
        linears = [(name, m) for name, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"model has no nn.Linear to take the default features from; pass layer= one of {_names(named)}")
        return linears[-1]
    if isinstance(layer, nn.Module):
        for name, module in named.items():
            if module is layer:
                return name, module
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model; valid names: {_names(named)}")
    if not isinstance(layer, str) or layer not in named:
        raise ValueError(f"layer={layer!r} is not a module of the model; valid names: {_names(named)}")
    return layer, named[layer]


def _names(named: dict[str, nn.Module]) -> str:
    names = [repr(n) for n in named if n]
    return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` moved to ``device`` for the block, and back to where it was afterwards (even on error)."""
    home = _model_device(model)
    moved = home is not None and home != device
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to(home)


@torch.no_grad()
def model_features(model: nn.Module, inputs: Any, layer: str | nn.Module | None = None, *, at: str = "input",
                   batch_size: int = 256, device: str | torch.device = "auto", progress: bool = True) -> torch.Tensor:
    """Features [N, d] of ``inputs`` [N, ...] at one layer of ``model``, captured by a forward hook.

    Args:
        layer: a module name (as in ``model.named_modules()``) or the module itself; default: the
            last ``nn.Linear`` in module order, so the features are what the classifier head sees.
        at: ``"input"`` (the layer's first positional input, the default) or ``"output"``.
        batch_size: samples per forward.
        device: "auto" runs on CUDA when present. A model on another device is moved there for the
            call and moved back afterwards.

    Returns:
        The captured tensors flattened per sample to [N, d], on the CPU. float16/bfloat16 features
        become float32; other dtypes are kept. The model runs in eval mode (dropout off, BatchNorm
        on running statistics) and gets back each submodule's own mode afterwards.
    """
    x = _as_tensor(inputs)
    check_choice(at, ("input", "output"), "at")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = resolve_device(device)
    name, module = _resolve_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        value = (args[0] if args else None) if at == "input" else output
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"layer {name!r} has no tensor {at} to capture (got {type(value).__name__}); pick another layer or at=")
        captured.append(value)

    handle = module.register_forward_hook(hook)
    out: torch.Tensor | None = None
    try:
        with on_device(model, dev), eval_mode(model):
            for start in tqdm(range(0, x.shape[0], batch_size), desc="features", disable=not progress, leave=False):
                batch = x[start:start + batch_size].to(dev, non_blocking=True)
                captured.clear()
                model(batch)
                if len(captured) != 1:
                    raise ValueError(f"layer {name!r} ran {len(captured)} times in one forward; features need exactly one call")
                if captured[0].dim() == 0 or captured[0].shape[0] != batch.shape[0]:
                    raise ValueError(f"layer {name!r} {at} has shape {tuple(captured[0].shape)}, not [{batch.shape[0]}, ...] "
                                     "(one row per sample); pick another layer")
                feats = captured[0].reshape(batch.shape[0], -1)
                if feats.dtype in (torch.float16, torch.bfloat16):
                    feats = feats.float()
                if out is None:  # allocated once: no list of batches to concatenate (2× the memory)
                    out = torch.empty((x.shape[0], feats.shape[1]), dtype=feats.dtype)
                out[start:start + batch.shape[0]] = feats.cpu()
    finally:
        handle.remove()
    assert out is not None
    return out
