"""Random output cotangents whose outer products average to the loss's output Hessian.

For a named loss with output Hessian H_i (cross_entropy: diag(p) − p pᵀ; mse summed over outputs:
2 I) and L_i L_iᵀ = H_i, u_i = L_i ε_i with Rademacher ε_i has E[u_i u_iᵀ] = H_i, so the gradient
J_iᵀ u_i of the pseudo-loss u_iᵀ z_i(θ) (u fixed) has E[g gᵀ] = J_iᵀ H_i J_i: one backward per draw
gives an unbiased GGN sample (curvature propagation, Martens, Sutskever & Swersky 2012). For
cross_entropy L = diag(√p) − p √pᵀ (L Lᵀ = H because Σ_c p_c = 1). Compared with labels drawn from
softmax(z), the fourth moment on a confident sample (p_max = 1 − η) is O(η²) instead of O(η).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def hessian_root_times(loss: str, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_i ε_i per sample, with L_i L_iᵀ = H_i the output Hessian of ``loss`` at outputs z (detached);
    ε has z's shape. ε = e_c gives column c of L, ε Rademacher an unbiased sample of H (module doc)."""
    z = z.detach()
    if loss == "cross_entropy":
        if z.dim() != 2:
            raise ValueError(f"cross_entropy needs model outputs [B, classes], got {tuple(z.shape)}")
        p = torch.softmax(z.double() if z.dtype == torch.float64 else z.float(), dim=-1)
        root, e = p.sqrt(), eps.to(p.dtype)
        return (root * e - p * (root * e).sum(dim=-1, keepdim=True)).to(z.dtype)  # (diag(√p) − p √pᵀ) ε
    return math.sqrt(2.0) * eps.to(z.dtype)  # mse: H = 2 I


def output_cotangents(loss: str, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """u = L_i ε_i per sample with Rademacher ε_i (see the module doc) → z's shape."""
    eps = torch.randint(0, 2, z.shape, generator=gen, device=z.device) * 2 - 1
    return hessian_root_times(loss, z, eps)


def cotangent_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample uᵀ z(θ) for batch = (inputs, u): its gradient is J_iᵀ u_i (u is fixed data)."""
    return dot_outputs(model(batch[0]), batch[1])


def dot_outputs(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample uᵀz for outputs z [B, ...] and cotangents u of the same shape → [B]."""
    return (z * u).reshape(z.shape[0], -1).sum(dim=1)


__all__ = ["cotangent_loss", "dot_outputs", "hessian_root_times", "output_cotangents"]
