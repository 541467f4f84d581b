"""What a curvature operator observes of a model between products: a stamp of its tensors' content
(to know when cached factors and graphs went stale), and the bytes its modules output (to size batches)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


@contextmanager
def counting_activations(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, the bytes of every tensor a module of ``model`` outputs are appended to the
    yielded list (forward hooks, removed on exit)."""
    sizes: list[int] = []

    def record(_module: nn.Module, _args: Any, out: Any) -> None:
        for leaf in tree_leaves(out):  # tensors, or the tensors in a tuple/dict output (LSTM, HF blocks)
            if torch.is_tensor(leaf):
                sizes.append(leaf.numel() * leaf.element_size())

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        yield sizes
    finally:
        for h in hooks:
            h.remove()


_SAME_WIDTH_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def content_stamp(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Per tensor, two wrapping integer sums of its raw bits (all elements; the first half), read back
    with one transfer per device. Modular integer sums are exact and order-free: a change to one
    element's bits always changes them, whatever the dtype or magnitude; the same content always gives
    the same stamp (NaNs and all); no float rounding can hide a small update. Accumulating in the
    element's own width (int32 for ≤ 4 bytes) keeps the pass as fast as a float32 sum."""
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors.values():
        x = t.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        if x.is_floating_point() or x.dtype == torch.bool:
            x = x.view(_SAME_WIDTH_INTEGER[x.element_size()])
        flat = x.reshape(-1)
        wrap = torch.int64 if flat.element_size() == 8 else torch.int32
        sums = torch.stack([flat.sum(dtype=wrap), flat[: flat.numel() // 2].sum(dtype=wrap)]).to(torch.int64)
        per_device.setdefault(x.device, []).append(sums)
    return tuple(v for parts in per_device.values() for v in torch.cat(parts).tolist())
