"""Per-layer rules for per-sample gradients, kept in one table (``RULES``).

Every rule sees a layer through two cached tensors with a position axis:
A [B, T, ·] (what the layer's parameters multiply) and G [B, T, ·] (the gradient of the summed
per-sample losses w.r.t. the layer output, which is each sample's own output gradient because
samples do not interact in eval mode). T is 1 for plain Linear inputs, the sequence length for
sequences, and the number of output pixels for convolutions (after unfold).

A rule provides the per-sample gradient g_i in factored form, and the products built from it:
- ``dots``:          ⟨g_i, v_k⟩                  → [B, K]
- ``sq_norms``:      ‖g_i‖²                      → [B]
- ``weighted_sum``:  Σ_i c_{i,k} g_i             → [K, *shape]
- ``cross_dots``:    ⟨g_i, g_j⟩ between two cached sets of samples → [B1, B2]
- ``per_sample``:    g_i materialised             → [B, *shape] (reference and small layers only)
- ``multi_dots`` / ``multi_weighted_sum``: the same for R output gradients per sample, G [B, R, T, ·]
  sharing one A (the factored GGN, :mod:`.ggn_factors`); by default the B·R pairs are treated as
  samples with A repeated, Linear-type layers share one GEMM across the R gradients instead

For Linear-type layers g_i = G_iᵀA_i is never built for the whole batch: the weight's dots, norms,
weighted sums and ghost-form cross dots go through the kernel dispatch (:mod:`unlearn_fast.kernels`:
Triton on CUDA, the factored torch path on CPU), which holds the contraction orders. Sample-to-sample dots
⟨g_i, g_j⟩ = ⟨A_iA_jᵀ, G_iG_jᵀ⟩ use the ghost form or build g for chunks of samples, whichever
costs fewer multiply-adds (:func:`_ghost_cheaper`). A layer type not in the table falls back to
chunked torch.func materialisation (see per_sample.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (linear_cross_dots, linear_dots, linear_multi_dots, linear_multi_weighted_sum, linear_sq_norms,
                      linear_weighted_sum)
from ..kernels import torch_path


def _ghost_cheaper(b1: int, b2: int, t1: int, t2: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost form of ⟨g_i, g_j⟩ for a Linear weight costs fewer multiply-adds than building g.

    ghost:    Σ_{t,s} (a_{i,t}·a_{j,s})(g_{i,t}·g_{j,s})  →  B1·B2·T1·T2·(d_in + d_out)
    building: g = GᵀA for every sample, then one GEMM    →  (B1·T1 + B2·T2 + B1·B2)·d_in·d_out
    For B1 = B2 = B ≫ T this is T²·(d_in + d_out) < d_in·d_out, the flop form of the
    norms' 2T² < d_in·d_out (which compares the stored sizes).
    """
    return b1 * b2 * t1 * t2 * (d_in + d_out) <= (b1 * t1 + b2 * t2 + b1 * b2) * d_in * d_out


def _position_sums(g: torch.Tensor) -> torch.Tensor:
    """G [B, R, T, d] summed over positions → [B, R, d] (a view when T = 1)."""
    return g[:, :, 0] if g.shape[2] == 1 else g.sum(2)


def _same_id(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return x1 == x2.T


class Rule:
    """Base rule: the products from a materialised per-sample gradient (fine for small layers)."""

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def supports(self, module: nn.Module) -> bool:
        return True

    def prepare(self, module: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare_grad(self, module: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """G alone, for another output gradient of an input whose A is known already."""
        return self.prepare(module, inp, grad_out)[1]

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def multi_dots(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        """⟨g_{i,r}, v_k⟩ for R output gradients per sample, G [B, R, T, ·] sharing A [B, T, ·] → [B, R, K]."""
        b, r = g.shape[:2]
        return self.dots(module, a.repeat_interleave(r, dim=0), g.flatten(0, 1), v).reshape(b, r, -1)

    def multi_weighted_sum(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_{i,r} c_{i,r,k} g_{i,r} for C [B, R, K] → name → [K, *shape]."""
        return self.weighted_sum(module, a.repeat_interleave(g.shape[1], dim=0), g.flatten(0, 1), c.flatten(0, 1))

    def dots(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        grads = self.per_sample(module, a, g)
        return sum(grads[n].flatten(1) @ v[n].flatten(1).T for n in grads)

    def sq_norms(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        grads = self.per_sample(module, a, g)
        return sum(grads[n].flatten(1).pow(2).sum(1) for n in grads)

    def weighted_sum(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = self.per_sample(module, a, g)
        return {n: (c.T @ grads[n].flatten(1)).reshape(c.shape[1], *grads[n].shape[1:]) for n in grads}

    def cross_dots(self, module: nn.Module, a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor,
                   g2: torch.Tensor) -> torch.Tensor:
        """⟨g_i, g_j⟩ for sample i of the first cached set and j of the second → [B1, B2].

        Materialises [n, size] per-sample gradients for chunks of samples (n·size within
        torch_path.MAX_INTERMEDIATE on each side), one GEMM per pair of chunks.
        """
        size = sum(p.numel() for p in self.params(module).values())
        step = max(1, torch_path.MAX_INTERMEDIATE // max(size, 1))
        b1, b2 = g1.shape[0], g2.shape[0]
        out = torch.empty(b1, b2, dtype=g1.dtype, device=g1.device)
        for s2 in range(0, b2, step):
            right = self._flat_per_sample(module, a2[s2:s2 + step], g2[s2:s2 + step])
            for s1 in range(0, b1, step):
                out[s1:s1 + step, s2:s2 + step] = self._flat_per_sample(module, a1[s1:s1 + step], g1[s1:s1 + step]) @ right.T
        return out

    def _flat_per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Every parameter's per-sample gradient side by side → [B, size]."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in self.per_sample(module, a, g).values()], 1)


class LinearRule(Rule):
    """y = a Wᵀ + b with W [d_out, d_in]; also the base of Conv1D (W stored transposed) and Conv2d."""

    def prepare(self, module, inp, grad_out):
        return inp.reshape(inp.shape[0], -1, inp.shape[-1]), grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    # Weights are handled as [d_out, d_in] matrices; subclasses convert to and from their layout.
    def to_matrix(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return w

    def from_matrix(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return w

    def per_sample(self, module, a, g):
        out = {}
        names = self.params(module)
        if "weight" in names:
            out["weight"] = self.from_matrix(module, torch.einsum("bto,bti->boi", g, a))
        if "bias" in names:
            out["bias"] = g.sum(1)
        return out

    def dots(self, module, a, g, v):
        names = self.params(module)
        b, t, d_out = g.shape
        total = torch.zeros(b, next(iter(v.values())).shape[0], dtype=g.dtype, device=g.device)
        if "weight" in names:
            w = self.to_matrix(module, v["weight"])  # [K, d_out, d_in]
            total += linear_dots(a, g, w)
        if "bias" in names:
            total += g.sum(1) @ v["bias"].T
        return total

    def sq_norms(self, module, a, g):
        names = self.params(module)
        out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        if "weight" in names:
            out += linear_sq_norms(a, g)
        if "bias" in names:
            out += g.sum(1).pow(2).sum(1)
        return out

    def weighted_sum(self, module, a, g, c):
        names = self.params(module)
        out = {}
        if "weight" in names:
            out["weight"] = self.from_matrix(module, linear_weighted_sum(a, g, c))
        if "bias" in names:
            out["bias"] = torch.einsum("bk,bto->ko", c, g)
        return out

    def multi_dots(self, module, a, g, v):
        names = self.params(module)
        total = torch.zeros(g.shape[0], g.shape[1], next(iter(v.values())).shape[0], dtype=g.dtype, device=g.device)
        if "weight" in names:
            total += linear_multi_dots(a, g, self.to_matrix(module, v["weight"]))
        if "bias" in names:
            total += _position_sums(g) @ v["bias"].T
        return total

    def multi_weighted_sum(self, module, a, g, c):
        names = self.params(module)
        out = {}
        c = c.to(g.dtype)
        if "weight" in names:
            out["weight"] = self.from_matrix(module, linear_multi_weighted_sum(a, g, c))
        if "bias" in names:  # Σ_{i,r} c_{i,r,k} Σ_t G_{i,r,t}: one [K, B·R] × [B·R, d_out] GEMM
            out["bias"] = c.reshape(-1, c.shape[-1]).T @ _position_sums(g).reshape(-1, g.shape[-1])
        return out

    def cross_dots(self, module, a1, g1, a2, g2):
        names = self.params(module)
        (b1, t1, d_out), (b2, t2, _) = g1.shape, g2.shape
        if "weight" in names and not _ghost_cheaper(b1, b2, t1, t2, a1.shape[-1], d_out):
            return super().cross_dots(module, a1, g1, a2, g2)  # chunks of built g (bias included), then GEMMs
        out = torch.zeros(b1, b2, dtype=g1.dtype, device=g1.device)
        if "weight" in names:  # for T = 1 this is (A1A2ᵀ) ⊙ (G1G2ᵀ)
            out += linear_cross_dots(a1, g1, a2, g2)
        if "bias" in names:
            out += g1.sum(1) @ g2.sum(1).T
        return out


class Conv1DRule(LinearRule):
    """transformers' Conv1D: y = a W + b with W [d_in, d_out]."""

    def to_matrix(self, module, w):
        return w.transpose(-1, -2)

    def from_matrix(self, module, w):
        return w.transpose(-1, -2)


def conv_patches(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> torch.Tensor:
    """The patches of a 2-d convolution, x [B, C, H, W] → [B, L, C·kh·kw], in F.unfold's column order.

    Built from kh·kw strided slices of the padded input in channels-last layout: a copy of the
    patches and nothing more. F.unfold (im2col) computes the same but ran 5-50× slower on 2-core
    CPUs in our capture (measured 5-260 ms per call on [512, 1, 16, 16]), and its result needed
    another transpose copy.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    b, c, h, w = x.shape
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # [B, H', W', C]
    slices = [padded[:, i * dh:i * dh + (h_out - 1) * sh + 1:sh, j * dw:j * dw + (w_out - 1) * sw + 1:sw]
              for i in range(kh) for j in range(kw)]
    return torch.stack(slices, dim=-1).reshape(b, h_out * w_out, c * kh * kw)


class Conv2dRule(LinearRule):
    """Conv2d as a Linear over unfolded patches: A [B, L, C_in·kh·kw], G [B, L, C_out]."""

    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def prepare(self, module, inp, grad_out):
        patches = conv_patches(inp, module.kernel_size, module.stride, module.padding, module.dilation)
        return patches, self.prepare_grad(module, inp, grad_out)

    def prepare_grad(self, module, inp, grad_out):
        return grad_out.flatten(2).transpose(1, 2)

    def to_matrix(self, module, w):
        return w.reshape(*w.shape[:-3], -1) if w.dim() == 5 else w.reshape(w.shape[0], -1)

    def from_matrix(self, module, w):
        return w.reshape(*w.shape[:-1], *module.weight.shape[1:])


class EmbeddingRule(Rule):
    """Embedding: g_i adds G_{i,t} to row id_{i,t}; A holds the ids [B, T] (long)."""

    def supports(self, module):
        return module.max_norm is None and not module.sparse

    def prepare(self, module, inp, grad_out):
        ids = inp.reshape(inp.shape[0], -1)
        g = grad_out.reshape(ids.shape[0], ids.shape[1], -1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    def per_sample(self, module, a, g):
        b, t, d = g.shape
        out = torch.zeros(b, module.num_embeddings, d, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, a.unsqueeze(-1).expand(b, t, d), g)
        return {"weight": out}

    def dots(self, module, a, g, v):
        rows = v["weight"][:, a]  # [K, B, T, d]
        return (rows * g.unsqueeze(0)).sum((2, 3)).T

    def sq_norms(self, module, a, g):
        same = (a.unsqueeze(2) == a.unsqueeze(1)).to(g.dtype)
        return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))

    def weighted_sum(self, module, a, g, c):
        k, d = c.shape[1], g.shape[-1]
        weighted = torch.einsum("bk,btd->kbtd", c, g).reshape(k, -1, d)
        out = torch.zeros(k, module.num_embeddings, d, dtype=g.dtype, device=g.device)
        out.index_add_(1, a.reshape(-1), weighted)
        return {"weight": out}

    def multi_dots(self, module, a, g, v):
        rows = v["weight"][:, a]  # [K, B, T, d], gathered once for the R gradients of each sample
        return torch.einsum("kbtd,brtd->brk", rows, g)

    def multi_weighted_sum(self, module, a, g, c):
        combined = torch.einsum("brk,brtd->kbtd", c, g)  # Σ_r c_{i,r,k} G_{i,r} first: one scatter per vector
        k, d = combined.shape[0], g.shape[-1]
        out = torch.zeros(k, module.num_embeddings, d, dtype=g.dtype, device=g.device)
        out.index_add_(1, a.reshape(-1), combined.reshape(k, -1, d))
        return {"weight": out}

    def cross_dots(self, module, a1, g1, a2, g2):
        # Σ_{t,s} [id_{i,t} = id_{j,s}] g_{i,t}·g_{j,s}: a built g_i would be [num_embeddings, d]
        return torch_path.position_pairs(a1, g1, a2, g2, _same_id)


class LayerNormRule(Rule):
    """LayerNorm affine parameters: g_i(weight) = Σ_t G ⊙ x̂, g_i(bias) = Σ_t G; small, so materialised."""

    def supports(self, module):
        return module.elementwise_affine

    def prepare(self, module, inp, grad_out):
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean = inp.mean(dims, keepdim=True)
        var = inp.var(dims, unbiased=False, keepdim=True)
        x_hat = (inp - mean) / torch.sqrt(var + module.eps)
        d = math.prod(module.normalized_shape)
        return x_hat.reshape(inp.shape[0], -1, d), grad_out.reshape(inp.shape[0], -1, d)

    def per_sample(self, module, a, g):
        shape = tuple(module.normalized_shape)
        out = {}
        names = self.params(module)
        if "weight" in names:
            out["weight"] = (g * a).sum(1).reshape(-1, *shape)
        if "bias" in names:
            out["bias"] = g.sum(1).reshape(-1, *shape)
        return out


class BatchNormRule(Rule):
    """BatchNorm affine parameters in eval mode (running statistics), per channel; materialised."""

    def supports(self, module):
        return module.affine and module.track_running_stats and module.running_mean is not None

    def prepare(self, module, inp, grad_out):
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        x_hat = (inp - module.running_mean.reshape(shape)) / torch.sqrt(module.running_var.reshape(shape) + module.eps)
        channels = inp.shape[1]
        return (x_hat.reshape(inp.shape[0], channels, -1).transpose(1, 2),
                grad_out.reshape(inp.shape[0], channels, -1).transpose(1, 2))

    def per_sample(self, module, a, g):
        names = self.params(module)
        out = {}
        if "weight" in names:
            out["weight"] = (g * a).sum(1)
        if "bias" in names:
            out["bias"] = g.sum(1)
        return out


RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
}
# transformers' Conv1D is matched by name so that transformers stays an optional dependency.
RULES_BY_NAME: dict[str, Rule] = {"Conv1D": Conv1DRule()}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type, or None (its parameters then use the fallback)."""
    rule = RULES.get(type(module)) or RULES_BY_NAME.get(type(module).__name__)
    return rule if rule is not None and rule.supports(module) else None

