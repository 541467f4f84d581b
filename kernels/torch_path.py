"""The factored torch path of every kernel: the CPU backend, and the reference the Triton kernels match.

Per layer, on A [B, T, d_in] and G [B, T, d_out] (the per-sample gradient is g_i = G_iᵀA_i):
- :func:`linear_dots`:          ⟨g_i, V_k⟩                 → [B, K]
- :func:`linear_sq_norms`:      ‖g_i‖²                      → [B]
- :func:`linear_cross_dots`:    ⟨g_i, g'_j⟩ in ghost form   → [B1, B2]
- :func:`linear_weighted_sum`:  Σ_i c_{i,k} g_i             → [K, d_out, d_in]
- :func:`linear_multi_dots`, :func:`linear_multi_weighted_sum`: the same for R output gradients per
  sample that share its A (G [B, R, T, d_out]: the columns of the loss's Hessian root, for the GGN)

A mask [B, T] multiplies G's rows (a masked position contributes nothing). Half inputs are upcast
and accumulated in float32; other dtypes stay as they are.

Memory: the issue asks for O(B·(d_in + d_out) + B·T) per layer beyond the inputs. The Triton kernels
keep their products in registers; this path works through chunks instead, so that each intermediate
(a chunk's A·Wᵀ product, multiplied by G in place, its scaled rows of G, its Gram rows, a block of
built g_i, and the float32 or masked copies of its rows of A and G) holds at most CHUNK_ELEMENTS
elements whatever B and T (a few of them are alive at once), but for cross dots, which take at least
one pair's [T1, T2] Gram at a time. Peak resident-set growth at B = 64, T = 512, 768→3072 (float32,
480 MiB of inputs), whole-batch → chunked: dots (K = 1) 768 → 24 MiB, with a mask 1152 → 36, weighted
sum 393 → 33, ghost norms 192 → 24, cross dots against 4 samples 384 → 31; at B = 8, T = 128 1–21
MiB, at no cost in time (benchmarks/RESULTS.md). That is below materialisation (torch.func: 23–102
MiB at B = 8) but above the issue's budget at these sizes, which only a fused kernel reaches. Only the
outputs ([B, K], [B], [B1, B2], [K, d_out, d_in]) scale with the batch. The multi operations (the
factored GGN, whose caller bounds its own cache) split over K by MAX_INTERMEDIATE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .checks import accumulate_dtype
from .cpu_gemm import differentiated, matmul_nt

# Cap on the elements of an intermediate [B, K, T, d] product of the multi operations, and of callers'
# chunks (influence.layers, influence.kfac); larger work is split.
MAX_INTERMEDIATE = 1 << 25
# Cap on each intermediate of the per-layer operations below (16 MiB of float32). Chunks of this size
# ran as fast as whole batches on the 2-core CPU (768→3072 and 3072→768 dots and weighted sums at
# B=8, T=128, within 1 %; 4× smaller chunks cost up to 10 %).
CHUNK_ELEMENTS = 1 << 22
# Chunks keep at least this many rows (B·T positions) where there are, however many vectors share them,
# so that their GEMMs stay efficient: K vectors are split instead.
MIN_CHUNK_ROWS = 256
# On the CPU, built per-sample gradients whose whole batch would exceed CHUNK_ELEMENTS are made
# BUILT_TILE_ROWS rows of d_out at a time ([n, 128, d_in] blocks), faster as well as smaller, the blocks
# staying in cache (B=16, T=128, K=4 dots, 2 cores, medians of 9 interleaved: 768→3072 109–111 → 68–72
# ms, 3072→768 114–116 → 75–85 ms). Below that size whole g_i were as fast or faster (B=32, T=64,
# 256×256, K=8: 2.1–2.7 ms whole, 2.9–3.7 in 128-row blocks).
BUILT_TILE_ROWS = 128


def position_chunks(b: int, t: int, per_position: int) -> Iterator[tuple[slice, slice]]:
    """(samples, positions) chunks covering [B, T] once, each of at most CHUNK_ELEMENTS // per_position
    positions: whole samples while one fits, else one sample's positions a block at a time."""
    rows = max(1, CHUNK_ELEMENTS // max(1, per_position))
    if t <= rows:
        step = max(1, rows // max(1, t))
        for s in range(0, b, step):
            yield slice(s, s + step), slice(None)
    else:
        for s in range(b):
            for p in range(0, t, rows):
                yield slice(s, s + 1), slice(p, p + rows)


def chunk_rows(x: torch.Tensor, samples: slice, positions: slice, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x[samples, positions] [n, p, d] in the accumulation dtype, masked positions zeroed: a copy of
    the chunk only where the dtype or the mask asks for one."""
    rows = x[samples, positions].to(accumulate_dtype(x.dtype))
    if mask is not None:
        rows = rows * mask[samples, positions].to(rows.dtype).unsqueeze(-1)
    return rows


def copied_width(x: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Elements per position that :func:`chunk_rows` copies of x: its width when it upcasts or masks,
    else 0 (the rows are then views, and no chunk budget need count them)."""
    return x.shape[-1] if mask is not None or accumulate_dtype(x.dtype) != x.dtype else 0


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(accumulate_dtype(t.dtype)) for t in tensors]


def _k_chunks(k: int, per_k: int, cap: int = MAX_INTERMEDIATE) -> int:
    return max(1, min(k, cap // max(per_k, 1)))


def linear_dots(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G_iᵀA_i, W_k⟩ for A [B, T, d_in], G [B, T, d_out], W [K, d_out, d_in] → [B, K].

    Two exact orders, chosen by arithmetic:
    - factored, Σ_t g_tᵀ W_k a_t: per chunk of positions, one GEMM [rows, d] × [d, K·d'] whose
      [rows, K, d'] product is then reduced against the other factor (d' = d_out when d_in ≤ d_out),
      B·T·K·d_in·d_out multiply-adds; best when T = 1 or K = 1;
    - per-sample gradients G_iᵀA_i built whole or, for large batches, a block of rows at a time
      (:func:`built_blocks`), each block dotted with the same rows of the K vectors: B·(T + K)·d_in·d_out.
    """
    dtype = accumulate_dtype(a.dtype)
    w = w.to(dtype)
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    k = w.shape[0]
    out = torch.zeros(b, k, dtype=dtype, device=g.device)
    if not built_dots_cheaper(t, k):
        narrow_in = d_in <= d_out  # (A Wᵀ) [rows, K, d_out] · G, else (G W) [rows, K, d_in] · A
        wide = d_out if narrow_in else d_in
        step = _k_chunks(k, wide * min(b * t, MIN_CHUNK_ROWS), CHUNK_ELEMENTS)
        for k0 in range(0, k, step):
            wk = w[k0:k0 + step]
            n = wk.shape[0]
            w_rows = wk.reshape(-1, d_in) if narrow_in else wk.transpose(1, 2).reshape(-1, d_out)
            for samples, positions in position_chunks(b, t, n * wide):
                x, y = chunk_rows(a, samples, positions), chunk_rows(g, samples, positions, mask)
                if not narrow_in:
                    x, y = y, x
                rows = x.shape[0] * x.shape[1]
                product = matmul_nt(x.reshape(rows, -1), w_rows).reshape(x.shape[0], x.shape[1], n, wide)
                # in place: one intermediate, not two (mul then sum was 7× faster than einsum's bmm here)
                out[samples, k0:k0 + n] += product.mul_(y.unsqueeze(2)).sum((1, 3))
        return out
    for samples, rows, block in built_blocks(a, g, mask):  # a skinny GEMM on the vectors' rows (a view if W is contiguous)
        out[samples] += block.reshape(block.shape[0], -1) @ w[:, rows].reshape(k, -1).T
        del block  # before the generator builds the next one: one block alive at a time
    return out


def built_blocks(a: torch.Tensor, g: torch.Tensor,
                 mask: torch.Tensor | None = None) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(samples, d_out rows, block) covering every per-sample gradient g_i = G_iᵀA_i (masked rows of G
    zeroed), in the accumulation dtype: block [n, q, d_in] holds rows ``rows`` of the g_i of
    ``samples``; whole g_i off the CPU (where the torch path serves only float64 and differentiable
    inputs, and blocks were not timed) or when all B of them take at most CHUNK_ELEMENTS, else
    BUILT_TILE_ROWS rows at a time; n·q·d_in at most CHUNK_ELEMENTS (one sample's q rows at least).
    Rows of A and G that must be copied (upcast or masked) are copied a span of positions at a time,
    at most CHUNK_ELEMENTS of them, and the block summed over the spans."""
    b, t, d_in = a.shape
    d_out = g.shape[2]
    whole = a.device.type != "cpu" or b * d_out * d_in <= CHUNK_ELEMENTS
    height = max(1, d_out if whole else min(d_out, BUILT_TILE_ROWS))
    step = max(1, CHUNK_ELEMENTS // max(1, height * d_in))
    copied = copied_width(a) + min(height, copied_width(g, mask))  # per position of one sample
    span = t if not copied else max(1, CHUNK_ELEMENTS // (min(step, b) * copied))
    for s in range(0, b, step):
        samples = slice(s, s + step)
        for q in range(0, d_out, height):
            g_q = g[:, :, q:q + height]
            block = None
            for p in range(0, t, span):
                positions = slice(p, p + span) if span < t else slice(None)
                part = torch.bmm(chunk_rows(g_q, samples, positions, mask).transpose(1, 2),
                                 chunk_rows(a, samples, positions))
                block = part if block is None else block + part
            yield samples, slice(q, q + height), block


def built_dots_cheaper(t: int, k: int) -> bool:
    """Whether ⟨g_i, V_k⟩ is cheaper from g_i built per sample (T + K multiply-adds per weight entry)
    than in the factored order Σ_t g_tᵀ V_k a_t (T·K)."""
    return t * k > t + k


def ghost_norms_cheaper(t: int, d_in: int, d_out: int) -> bool:
    """Whether ‖g_i‖² is cheaper as ⟨A_iA_iᵀ, G_iG_iᵀ⟩ than from the built g_i (2T² < d_in·d_out)."""
    return 2 * t * t < d_in * d_out


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖G_iᵀA_i‖²_F for A [B, T, d_in], G [B, T, d_out] → [B].

    T = 1: ‖g‖²·‖a‖² (times the mask squared). Otherwise the ghost form Σ_{t,s} (a_t·a_s)(g_t·g_s)
    when 2T² < d_in·d_out, a chunk of samples (or of one sample's position pairs) at a time, else g_i
    built in blocks of rows (:func:`built_blocks`).
    """
    dtype = accumulate_dtype(a.dtype)
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    traced = differentiated(a, g)
    if t == 1:
        if traced:  # ‖·‖² by pow+sum: the square of vector_norm has no second derivative at a zero row
            out = g.to(dtype).pow(2).sum((1, 2)) * a.to(dtype).pow(2).sum((1, 2))
        else:  # vector_norm: one pass each, 1.3x faster than pow+sum at 64x1024 (float32, 2 cores)
            out = (torch.linalg.vector_norm(g, dim=(1, 2), dtype=dtype).square()
                   * torch.linalg.vector_norm(a, dim=(1, 2), dtype=dtype).square())
        return out if mask is None else out * mask[:, 0].to(dtype).square()
    if ghost_norms_cheaper(t, d_in, d_out) and b:
        return per_sample_sums(list(_ghost_norm_parts(a, g, mask)))
    out = torch.zeros(b, dtype=dtype, device=g.device)
    for samples, _, block in built_blocks(a, g, mask):
        out[samples] += block.pow(2).sum((1, 2))
        del block
    return out


def _ghost_norm_parts(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(samples, Σ_{t,s} (a_t·a_s)(g_t·g_s) over a part of their position pairs). Whole samples while one
    sample's Grams [T, T] and rows of A and G fit in CHUNK_ELEMENTS; past that, one sample in blocks of
    r positions, every pair of blocks in turn ([r, r] Grams, [r, d] rows), so no intermediate grows with T."""
    b, t, _ = a.shape
    copied = max(copied_width(a), copied_width(g, mask))  # per position, when rows are copied
    per_sample = t * max(2 * t, copied)
    if per_sample <= CHUNK_ELEMENTS:
        step = CHUNK_ELEMENTS // per_sample
        for s in range(0, b, step):
            samples = slice(s, s + step)
            a_c, g_c = chunk_rows(a, samples, slice(None)), chunk_rows(g, samples, slice(None), mask)
            yield samples, (torch.bmm(a_c, a_c.transpose(1, 2)) * torch.bmm(g_c, g_c.transpose(1, 2))).sum((1, 2))
        return
    r = max(1, min(math.isqrt(CHUNK_ELEMENTS // 2), CHUNK_ELEMENTS // max(1, copied)))
    for s in range(b):
        sample = slice(s, s + 1)
        for p in range(0, t, r):
            a_p, g_p = chunk_rows(a, sample, slice(p, p + r)), chunk_rows(g, sample, slice(p, p + r), mask)
            for q in range(0, t, r):
                a_q, g_q = ((a_p, g_p) if q == p else
                            (chunk_rows(a, sample, slice(q, q + r)), chunk_rows(g, sample, slice(q, q + r), mask)))
                yield sample, (torch.bmm(a_p, a_q.transpose(1, 2)) * torch.bmm(g_p, g_q.transpose(1, 2))).sum((1, 2))


def per_sample_sums(parts: list[tuple[slice, torch.Tensor]]) -> torch.Tensor:
    """[B] from per-chunk sums in sample order: consecutive parts over the same samples (one sample's
    position blocks) added, then concatenated. Out of place, so that torch.func
    transforms (vmap) and autograd see ordinary ops."""
    merged: list[torch.Tensor] = []
    last = None
    for samples, value in parts:
        if samples == last:
            merged[-1] = merged[-1] + value
        else:
            merged.append(value)
            last = samples
    return torch.cat(merged)


def tiles(b1: int, b2: int, per_pair: int, per_row1: int = 0, per_row2: int = 0) -> Iterator[tuple[slice, slice]]:
    """(rows of set 1, rows of set 2) tiles whose [n1, n2, per_pair] intermediates, and the [n1, per_row1]
    and [n2, per_row2] copies of their samples' rows, stay within CHUNK_ELEMENTS."""
    step2 = max(1, min(b2, CHUNK_ELEMENTS // max(per_pair, per_row2, 1)))
    step1 = max(1, CHUNK_ELEMENTS // max(per_pair * step2, per_row1, 1))
    for s1 in range(0, b1, step1):
        for s2 in range(0, b2, step2):
            yield slice(s1, s1 + step1), slice(s2, s2 + step2)


def position_pairs(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                   pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{t,s} pair(a_{i,t}, a_{j,s}) (g_{i,t}·g_{j,s}) → [B1, B2] for G1 [B1, T1, d], G2 [B2, T2, d].

    ``pair`` maps rows [n1·T1, ·], [n2·T2, ·] of A to their [n1·T1, n2·T2] pairings (inner products
    for Linear, id equality for Embedding); tiles bound the pairing matrices (the ghost form). G's rows
    are upcast and masked a tile at a time; A's are passed to ``pair`` as they are.
    """
    (b1, t1, d), (b2, t2, _) = g1.shape, g2.shape
    out = torch.empty(b1, b2, dtype=accumulate_dtype(g1.dtype), device=g1.device)
    # per sample: A's rows (1 wide for ids; copied by ``pair`` when upcast) and G's when copied
    row1 = t1 * (math.prod(a1.shape[2:]) + copied_width(g1, mask1))
    row2 = t2 * (math.prod(a2.shape[2:]) + copied_width(g2, mask2))
    for r1, r2 in tiles(b1, b2, t1 * t2, row1, row2):
        x1, x2 = a1[r1], a2[r2]
        n1, n2 = x1.shape[0], x2.shape[0]
        y1, y2 = chunk_rows(g1, r1, slice(None), mask1), chunk_rows(g2, r2, slice(None), mask2)
        gg = matmul_nt(y1.reshape(n1 * t1, d), y2.reshape(n2 * t2, d))
        pairs = pair(x1.reshape(n1 * t1, -1), x2.reshape(n2 * t2, -1))
        out[r1, r2] = (gg * pairs).reshape(n1, t1, n2, t2).sum((1, 3))
    return out


def inner_products(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    dtype = accumulate_dtype(x1.dtype)
    return matmul_nt(x1.to(dtype), x2.to(dtype))


def linear_cross_dots(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                      mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G1_iᵀA1_i, G2_jᵀA2_j⟩ in the ghost form ⟨A1_iA2_jᵀ, G1_iG2_jᵀ⟩ → [B1, B2], tiled."""
    return position_pairs(a1, g1, a2, g2, inner_products, mask1, mask2)


def linear_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i c_{i,k} G_iᵀA_i = (diag(c_k) G)ᵀ A for C [B, K] → [K, d_out, d_in], accumulated over chunks
    of positions: (diag(c) G)ᵀ [K·d_out, rows] of a chunk times its rows of A."""
    dtype = accumulate_dtype(a.dtype)
    b, t, d_out = g.shape
    d_in = a.shape[-1]
    k = c.shape[1]
    c = c.to(dtype)
    traced = differentiated(a, g, c)  # torch.func cannot batch an in-place addmm_: out of place then
    parts = []
    step = _k_chunks(k, d_out * min(b * t, MIN_CHUNK_ROWS), CHUNK_ELEMENTS)
    for k0 in range(0, k, step):
        n = min(step, k - k0)
        acc = torch.zeros(n * d_out, d_in, dtype=dtype, device=g.device)
        for samples, positions in position_chunks(b, t, max(n * d_out, copied_width(a))):
            g_c = chunk_rows(g, samples, positions, mask)
            rows = g_c.shape[0] * g_c.shape[1]
            scaled = torch.einsum("bk,bto->kobt", c[samples, k0:k0 + n], g_c).reshape(n * d_out, rows)
            a_c = chunk_rows(a, samples, positions).reshape(rows, d_in)
            acc = torch.addmm(acc, scaled, a_c) if traced else acc.addmm_(scaled, a_c)
        parts.append(acc.view(n, d_out, d_in))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
