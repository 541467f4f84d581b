"""Small assertions shared by several test files."""

from __future__ import annotations

import torch


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when the two models' state dicts hold bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
