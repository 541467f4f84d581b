"""The torch.func peer shared by the per-sample benchmarks: vmap(grad) in chunks of samples."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

FUNC_CHUNK = 64


def func_per_sample_chunks(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                           chunk: int = FUNC_CHUNK) -> Iterator[dict[str, torch.Tensor]]:
    """Per-sample cross-entropy gradients, name → [chunk, *shape], one chunk of samples at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    x, y = batch
    for s in range(0, x.shape[0], chunk):
        yield per_sample(params, x[s:s + chunk], y[s:s + chunk])
