"""The factored torch path of every kernel: the CPU backend, and the reference the Triton kernels match.

Per layer, on A [B, T, d_in] and G [B, T, d_out] (the per-sample gradient is g_i = G_iᵀA_i):
- :func:`linear_dots`:          ⟨g_i, V_k⟩                 → [B, K]
- :func:`linear_sq_norms`:      ‖g_i‖²                      → [B]
- :func:`linear_cross_dots`:    ⟨g_i, g'_j⟩ in ghost form   → [B1, B2]
- :func:`linear_weighted_sum`:  Σ_i c_{i,k} g_i             → [K, d_out, d_in]
- :func:`linear_multi_dots`, :func:`linear_multi_weighted_sum`: the same for R output gradients per
  sample that share its A (G [B, R, T, d_out]: the columns of the loss's Hessian root, for the GGN)

A mask [B, T] multiplies G's rows (a masked position contributes nothing). Half inputs are upcast
and accumulated in float32; other dtypes stay as they are. The dots' [B·T, K, d] products are split
over K down to one vector: then the product and its elementwise product take 2·B·T·max(d_in, d_out)
elements, twice the larger of the layer's input and output; built per-sample
gradients and cross-dot tiles are bounded by MAX_INTERMEDIATE elements (split over samples, rows or
tiles); the weighted sum's (diag(c)G)ᵀ [K, d_out, B·T] and the ghost norms' [B, T, T] Grams are not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .checks import accumulate_dtype
from .cpu_gemm import matmul_nt

# Cap on the elements of an intermediate [B, K, T, d] product; larger work is split.
MAX_INTERMEDIATE = 1 << 25
# On the CPU, built per-sample gradients of a whole batch larger than BUILT_WHOLE_ELEMENTS are made
# BUILT_TILE_ROWS rows of d_out at a time ([n, 128, d_in] blocks): memory O(B·d_in) instead of
# O(B·d_in·d_out), and faster, the blocks staying in cache (B=16, T=128, K=4 dots, 2 cores, medians of 9
# interleaved: 768→3072 109–111 → 68–72 ms, 3072→768 114–116 → 75–85 ms). Below that size whole g_i were
# as fast or faster (B=32, T=64, 256×256, K=8: 2.1–2.7 ms whole, 2.9–3.7 in 128-row blocks).
BUILT_WHOLE_ELEMENTS = 1 << 22
BUILT_TILE_ROWS = 128


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(accumulate_dtype(t.dtype)) for t in tensors]


def masked(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """G with masked positions zeroed (G itself when there is no mask)."""
    return g if mask is None else g * mask.to(g.dtype).unsqueeze(-1)


def _k_chunks(k: int, per_k: int) -> int:
    return max(1, min(k, MAX_INTERMEDIATE // max(per_k, 1)))


def linear_dots(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G_iᵀA_i, W_k⟩ for A [B, T, d_in], G [B, T, d_out], W [K, d_out, d_in] → [B, K].

    Two exact orders, chosen by arithmetic:
    - factored, Σ_t g_tᵀ W_k a_t: one GEMM [B·T, d] × [d, K·d'] whose [B·T, K, d'] product is then
      reduced against the other factor (d' = d_out when d_in ≤ d_out), B·T·K·d_in·d_out
      multiply-adds; best when T = 1 or K = 1;
    - per-sample gradients G_iᵀA_i built whole or, for large batches, a block of rows at a time
      (:func:`built_blocks`), each block dotted with the same rows of the K vectors: B·(T + K)·d_in·d_out.
    """
    a, g = _upcast(a, g)
    g = masked(g, mask)
    w = w.to(g.dtype)
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    k = w.shape[0]
    out = torch.empty(b, k, dtype=g.dtype, device=g.device)
    if not built_dots_cheaper(t, k):
        if d_in <= d_out:  # (A Wᵀ) [B·T, K, d_out] · G
            step = _k_chunks(k, 2 * b * t * d_out)  # the product and its mul with G
            for k0 in range(0, k, step):
                wk = w[k0:k0 + step]
                av = matmul_nt(a.reshape(b * t, d_in), wk.reshape(-1, d_in)).reshape(b, t, -1, d_out)
                out[:, k0:k0 + step] = (av * g.unsqueeze(2)).sum((1, 3))  # 7× faster than einsum's bmm here
        else:  # (G W) [B·T, K, d_in] · A
            step = _k_chunks(k, 2 * b * t * d_in)
            for k0 in range(0, k, step):
                wk = w[k0:k0 + step]
                gw = matmul_nt(g.reshape(b * t, d_out), wk.transpose(1, 2).reshape(-1, d_out)).reshape(b, t, -1, d_in)
                out[:, k0:k0 + step] = (gw * a.unsqueeze(2)).sum((1, 3))
        return out
    out.zero_()
    for samples, rows, block in built_blocks(a, g):  # a skinny GEMM on the vectors' rows (a view if W is contiguous)
        out[samples] += block.reshape(block.shape[0], -1) @ w[:, rows].reshape(k, -1).T
    return out


def built_blocks(a: torch.Tensor, g: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(samples, d_out rows, block) covering every per-sample gradient g_i = G_iᵀA_i: block [n, q, d_in]
    holds rows ``rows`` of the g_i of ``samples``: whole g_i off the CPU (where the torch path serves only
    float64 and differentiable inputs, and blocks were not timed) or when all B of them take at most
    BUILT_WHOLE_ELEMENTS, else BUILT_TILE_ROWS rows at a time; at most MAX_INTERMEDIATE elements."""
    b, _, d_in = a.shape
    d_out = g.shape[2]
    whole = a.device.type != "cpu" or b * d_out * d_in <= BUILT_WHOLE_ELEMENTS
    height = max(1, d_out if whole else min(d_out, BUILT_TILE_ROWS))
    step = max(1, MAX_INTERMEDIATE // max(1, height * d_in))
    g_t = g.transpose(1, 2)
    for s in range(0, b, step):
        for q in range(0, d_out, height):
            yield slice(s, s + step), slice(q, q + height), torch.bmm(g_t[s:s + step, q:q + height], a[s:s + step])


def built_dots_cheaper(t: int, k: int) -> bool:
    """Whether ⟨g_i, V_k⟩ is cheaper from g_i built per sample (T + K multiply-adds per weight entry)
    than in the factored order Σ_t g_tᵀ V_k a_t (T·K)."""
    return t * k > t + k


def ghost_norms_cheaper(t: int, d_in: int, d_out: int) -> bool:
    """Whether ‖g_i‖² is cheaper as ⟨A_iA_iᵀ, G_iG_iᵀ⟩ than from the built g_i (2T² < d_in·d_out)."""
    return 2 * t * t < d_in * d_out


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖G_iᵀA_i‖²_F for A [B, T, d_in], G [B, T, d_out] → [B].

    T = 1: ‖g‖²·‖a‖². Otherwise the ghost form Σ_{t,s} (a_t·a_s)(g_t·g_s) when 2T² < d_in·d_out,
    else g_i built in blocks of rows (:func:`built_blocks`).
    """
    a, g = _upcast(a, g)
    g = masked(g, mask)
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    if t == 1:  # vector_norm: one pass each, 1.3x faster than pow+sum at 64x1024 (float32, 2 cores)
        return torch.linalg.vector_norm(g, dim=(1, 2)).square() * torch.linalg.vector_norm(a, dim=(1, 2)).square()
    if ghost_norms_cheaper(t, d_in, d_out):
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    out = torch.zeros(b, dtype=g.dtype, device=g.device)
    for samples, _, block in built_blocks(a, g):
        out[samples] += block.pow(2).sum((1, 2))
    return out


def tiles(b1: int, b2: int, per_pair: int) -> Iterator[tuple[slice, slice]]:
    """(rows of set 1, rows of set 2) tiles whose [n1, n2, per_pair] intermediates stay within MAX_INTERMEDIATE."""
    step2 = max(1, min(b2, MAX_INTERMEDIATE // max(per_pair, 1)))
    step1 = max(1, MAX_INTERMEDIATE // max(per_pair * step2, 1))
    for s1 in range(0, b1, step1):
        for s2 in range(0, b2, step2):
            yield slice(s1, s1 + step1), slice(s2, s2 + step2)


def position_pairs(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                   pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_{t,s} pair(a_{i,t}, a_{j,s}) (g_{i,t}·g_{j,s}) → [B1, B2] for G1 [B1, T1, d], G2 [B2, T2, d].

    ``pair`` maps rows [n1·T1, ·], [n2·T2, ·] of A to their [n1·T1, n2·T2] pairings (inner products
    for Linear, id equality for Embedding); tiles bound the pairing matrices (the ghost form).
    """
    (b1, t1, d), (b2, t2, _) = g1.shape, g2.shape
    out = torch.empty(b1, b2, dtype=g1.dtype, device=g1.device)
    for r1, r2 in tiles(b1, b2, t1 * t2):
        x1, x2 = a1[r1], a2[r2]
        n1, n2 = x1.shape[0], x2.shape[0]
        gg = matmul_nt(g1[r1].reshape(n1 * t1, d), g2[r2].reshape(n2 * t2, d))
        pairs = pair(x1.reshape(n1 * t1, -1), x2.reshape(n2 * t2, -1))
        out[r1, r2] = (gg * pairs).reshape(n1, t1, n2, t2).sum((1, 3))
    return out


def inner_products(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return matmul_nt(x1, x2)


def linear_cross_dots(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                      mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G1_iᵀA1_i, G2_jᵀA2_j⟩ in the ghost form ⟨A1_iA2_jᵀ, G1_iG2_jᵀ⟩ → [B1, B2], tiled."""
    a1, g1, a2, g2 = _upcast(a1, g1, a2, g2)
    g1, g2 = masked(g1, mask1), masked(g2, mask2)
    return position_pairs(a1, g1, a2, g2, inner_products)


def linear_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i c_{i,k} G_iᵀA_i = (diag(c_k) G)ᵀ A for C [B, K] → [K, d_out, d_in]."""
    a, g = _upcast(a, g)
    g = masked(g, mask)
    b, t, d_out = g.shape
    k = c.shape[1]
    gw = torch.einsum("bk,bto->kobt", c.to(g.dtype), g).reshape(k, d_out, b * t)  # (diag(c) G)ᵀ
    return gw @ a.reshape(b * t, -1)


def linear_multi_dots(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """⟨G_{i,r}ᵀA_i, W_k⟩ for A [B, T, d_in], G [B, R, T, d_out], W [K, d_out, d_in] → [B, R, K].

    The R gradients of a sample share its A, so one GEMM A Wᵀ [B·T, K·d_out] serves all of them and is
    then reduced against each G_{i,r}: B·T·K·d_in·d_out + B·R·T·K·d_out multiply-adds, where treating
    the B·R gradients as samples would repeat the GEMM R times. K = 1 reduces by mul+sum, K > 1 by a
    [R, T·d_out] × [T·d_out, K] bmm per sample (a batched GEMV was 3× slower than mul+sum at K = 1).
    """
    a, g = _upcast(a, g)
    w = w.to(g.dtype)
    b, r, t, d_out = g.shape
    d_in = a.shape[-1]
    k = w.shape[0]
    rows = g.reshape(b, r, t * d_out)
    out = torch.empty(b, r, k, dtype=g.dtype, device=g.device)
    step = _k_chunks(k, b * t * d_out)
    for k0 in range(0, k, step):
        wk = w[k0:k0 + step]
        n = wk.shape[0]
        av = matmul_nt(a.reshape(b * t, d_in), wk.reshape(-1, d_in))  # [B·T, n·d_out]
        if n == 1:
            out[:, :, k0] = (rows * av.reshape(b, 1, t * d_out)).sum(-1)
        else:
            per_k = av.reshape(b, t, n, d_out).transpose(1, 2).reshape(b, n, t * d_out)
            out[:, :, k0:k0 + n] = torch.bmm(rows, per_k.transpose(1, 2))
    return out


def linear_multi_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_{i,r} c_{i,r,k} G_{i,r}ᵀA_i for A [B, T, d_in], G [B, R, T, d_out], C [B, R, K] → [K, d_out, d_in].

    Each sample's R gradients are combined first (Σ_r c_{i,r,k} G_{i,r}: a [K, R] × [R, T·d_out] bmm per
    sample), then one GEMM with A per vector, as in :func:`linear_weighted_sum`.
    """
    a, g = _upcast(a, g)
    b, r, t, d_out = g.shape
    k = c.shape[2]
    rows, weights = g.reshape(b, r, t * d_out), c.to(g.dtype).transpose(1, 2)  # [B, K, R]
    out = torch.empty(k, d_out, a.shape[-1], dtype=g.dtype, device=g.device)
    step = _k_chunks(k, b * t * d_out)
    for k0 in range(0, k, step):
        combined = torch.bmm(weights[:, k0:k0 + step], rows)  # [B, n, T·d_out]
        n = combined.shape[1]
        gw = combined.reshape(b, n, t, d_out).permute(1, 3, 0, 2).reshape(n, d_out, b * t)  # (Σ_r c G)ᵀ per vector
        out[k0:k0 + n] = gw @ a.reshape(b * t, -1)
    return out
