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
- ``per_sample``:    g_i materialised             → [B, *shape] (reference and small layers only)

For Linear-type layers g_i = G_iᵀA_i is never built for the whole batch: ⟨g_i, V⟩ = Σ_t g_{i,t}ᵀ V a_{i,t}
(or, when T·K > T + K makes it cheaper, g_i built for a bounded chunk of samples), and
‖g_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩ (the "ghost" form) when 2T² < d_in·d_out. A layer type not in the
table falls back to chunked torch.func materialisation (see per_sample.py).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

# Cap on the elements of an intermediate [B, K, T, d] product; larger work is split over K.
MAX_INTERMEDIATE = 1 << 25


def _k_chunks(k: int, per_k: int) -> int:
    return max(1, min(k, MAX_INTERMEDIATE // max(per_k, 1)))


def _linear_weight_dots(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """⟨G_iᵀA_i, W_k⟩ for A [B, T, d_in], G [B, T, d_out], W [K, d_out, d_in] → [B, K].

    Two exact orders, chosen by arithmetic:
    - factored, Σ_t g_tᵀ W_k a_t: one GEMM [B·T, d] × [d, K·d'] (contracting the smaller of
      d_in/d_out last), B·T·K·d_in·d_out multiply-adds; best when T = 1 or K = 1;
    - per-sample gradients G_iᵀA_i built for a chunk of samples at a time, then one GEMM with the
      K vectors: B·(T + K)·d_in·d_out. Never the whole [B, d_out, d_in] at once.
    """
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    k = w.shape[0]
    out = torch.empty(b, k, dtype=g.dtype, device=g.device)
    if t * k <= t + k:
        if d_in <= d_out:  # (A Wᵀ) [B·T, K, d_out] · G
            step = _k_chunks(k, b * t * d_out)
            for k0 in range(0, k, step):
                wk = w[k0:k0 + step]
                av = (a.reshape(b * t, d_in) @ wk.reshape(-1, d_in).T).reshape(b, t, -1, d_out)
                out[:, k0:k0 + step] = torch.einsum("btko,bto->bk", av, g)
        else:  # (G W) [B·T, K, d_in] · A
            step = _k_chunks(k, b * t * d_in)
            for k0 in range(0, k, step):
                wk = w[k0:k0 + step]
                gw = (g.reshape(b * t, d_out) @ wk.transpose(0, 1).reshape(d_out, -1)).reshape(b, t, -1, d_in)
                out[:, k0:k0 + step] = torch.einsum("btki,bti->bk", gw, a)
        return out
    flat_w = w.reshape(k, -1)
    step = max(1, MAX_INTERMEDIATE // (d_in * d_out))
    for s in range(0, b, step):
        per_sample = torch.bmm(g[s:s + step].transpose(1, 2), a[s:s + step])  # [chunk, d_out, d_in]
        out[s:s + step] = per_sample.reshape(per_sample.shape[0], -1) @ flat_w.T
    return out


class Rule:
    """Base rule: the products from a materialised per-sample gradient (fine for small layers)."""

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def supports(self, module: nn.Module) -> bool:
        return True

    def prepare(self, module: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dots(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        grads = self.per_sample(module, a, g)
        return sum(grads[n].flatten(1) @ v[n].flatten(1).T for n in grads)

    def sq_norms(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        grads = self.per_sample(module, a, g)
        return sum(grads[n].flatten(1).pow(2).sum(1) for n in grads)

    def weighted_sum(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = self.per_sample(module, a, g)
        return {n: (c.T @ grads[n].flatten(1)).reshape(c.shape[1], *grads[n].shape[1:]) for n in grads}


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
            total += _linear_weight_dots(a, g, w)
        if "bias" in names:
            total += g.sum(1) @ v["bias"].T
        return total

    def sq_norms(self, module, a, g):
        names = self.params(module)
        b, t, d_out = g.shape
        d_in = a.shape[-1]
        out = torch.zeros(b, dtype=g.dtype, device=g.device)
        if "weight" in names:
            if t == 1:
                out += g.pow(2).sum((1, 2)) * a.pow(2).sum((1, 2))
            elif 2 * t * t < d_in * d_out:
                out += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
            else:
                step = max(1, MAX_INTERMEDIATE // (d_in * d_out))
                for s in range(0, b, step):
                    out[s:s + step] += torch.einsum("bto,bti->boi", g[s:s + step], a[s:s + step]).pow(2).sum((1, 2))
        if "bias" in names:
            out += g.sum(1).pow(2).sum(1)
        return out

    def weighted_sum(self, module, a, g, c):
        names = self.params(module)
        b, t, d_out = g.shape
        k = c.shape[1]
        out = {}
        if "weight" in names:
            gw = torch.einsum("bk,bto->kobt", c, g).reshape(k, d_out, b * t)  # (diag(c) G)ᵀ
            out["weight"] = self.from_matrix(module, gw @ a.reshape(b * t, -1))
        if "bias" in names:
            out["bias"] = torch.einsum("bk,bto->ko", c, g)
        return out


class Conv1DRule(LinearRule):
    """transformers' Conv1D: y = a W + b with W [d_in, d_out]."""

    def to_matrix(self, module, w):
        return w.transpose(-1, -2)

    def from_matrix(self, module, w):
        return w.transpose(-1, -2)


class Conv2dRule(LinearRule):
    """Conv2d as a Linear over unfolded patches: A [B, L, C_in·kh·kw], G [B, L, C_out]."""

    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def prepare(self, module, inp, grad_out):
        patches = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return patches.transpose(1, 2), grad_out.flatten(2).transpose(1, 2)

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

