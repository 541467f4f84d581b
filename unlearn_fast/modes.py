"""Temporary module modes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, then each submodule's own flag back (modes may be mixed).

    Per-sample quantities need samples that do not interact, so BatchNorm must use its running
    statistics and dropout must be off.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
