"""Parameter-space vectors: flat tensors [P] / [K, P] or dicts name → tensor (docs/architecture.md).

The flat order is that of ``model.named_parameters()``, keeping only parameters that require grad.
Every function that takes a vector accepts both forms; :func:`as_dict` and :func:`as_flat` convert.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

Vector = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def trainable(model: nn.Module, layers: list[str] | None = None) -> dict[str, nn.Parameter]:
    """name → parameter for the parameters that require grad, in ``named_parameters`` order.

    ``layers`` restricts them to the named modules (a parameter belongs to module ``m`` when its
    name is ``m.<param>``); an unknown module name raises, listing the valid ones.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if layers is None:
        return params
    modules = dict(model.named_modules())
    unknown = [m for m in layers if m not in modules]
    if unknown:
        valid = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
        raise ValueError(f"unknown layer(s) {unknown}; modules with parameters: {', '.join(valid)}")
    prefixes = tuple(f"{m}." for m in layers)
    chosen = {name: p for name, p in params.items() if name.startswith(prefixes)}
    if not chosen:
        raise ValueError(f"layers {layers} hold no parameters that require grad")
    return chosen


def num_params(params: Mapping[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def as_dict(vector: Vector, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vector as name → tensor [K, *shape] (K=1 for a single vector), in ``params`` order.

    Flat input: [P] or [K, P]. Dict input: each entry [*shape] or [K, *shape], with exactly the
    names of ``params``.
    """
    if isinstance(vector, Mapping):
        missing, extra = set(params) - set(vector), set(vector) - set(params)
        if missing or extra:
            raise ValueError(f"vector names differ from the parameters: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        out = {}
        for name, p in params.items():
            v = vector[name]
            if tuple(v.shape) == tuple(p.shape):
                v = v.unsqueeze(0)
            if tuple(v.shape[1:]) != tuple(p.shape):
                raise ValueError(f"vector[{name!r}] has shape {tuple(vector[name].shape)}; expected {tuple(p.shape)} or [K, *{tuple(p.shape)}]")
            out[name] = v
        ks = {v.shape[0] for v in out.values()}
        if len(ks) > 1:
            raise ValueError(f"vector entries disagree on K: {sorted(ks)}")
        return out
    if not torch.is_tensor(vector):
        raise ValueError(f"a parameter-space vector must be a tensor [P] / [K, P] or a dict name -> tensor, got {type(vector).__name__}")
    total = num_params(params)
    flat = vector.unsqueeze(0) if vector.dim() == 1 else vector
    if flat.dim() != 2 or flat.shape[1] != total:
        raise ValueError(f"flat vector has shape {tuple(vector.shape)}; expected [{total}] or [K, {total}]")
    out, start = {}, 0
    for name, p in params.items():
        out[name] = flat[:, start:start + p.numel()].reshape(flat.shape[0], *p.shape)
        start += p.numel()
    return out


def as_flat(vector: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """name → [K, *shape] (in ``params`` order) → flat [K, P]."""
    return torch.cat([vector[name].reshape(vector[name].shape[0], -1) for name in params], dim=1)


def flat_params(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The parameters' current values as one flat vector [P] (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


class VectorForm:
    """Remembers how a vector came in (flat or dict, with or without K, dtype, device) to give it back so."""

    def __init__(self, v: Vector, params: Mapping[str, torch.Tensor]) -> None:
        self.is_dict = isinstance(v, Mapping)
        entries = list(v.values()) if self.is_dict else [v]  # type: ignore[union-attr]
        if not all(torch.is_tensor(t) and t.is_floating_point() for t in entries):
            raise ValueError("a parameter-space vector must hold floating-point tensors")
        if self.is_dict:
            self.single = {n: tuple(v[n].shape) == tuple(p.shape)  # type: ignore[index]
                           for n, p in params.items() if n in v}
            self.meta = {n: (t.device, t.dtype) for n, t in v.items()}  # type: ignore[union-attr]
        else:
            self.single_flat, self.meta_flat = v.dim() == 1, (v.device, v.dtype)  # type: ignore[union-attr]

    def restore(self, d: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Vector:
        if self.is_dict:
            return {n: (t[0] if self.single[n] else t).to(*self.meta[n]) for n, t in d.items()}
        flat = as_flat(d, params)
        return (flat[0] if self.single_flat else flat).to(*self.meta_flat)
