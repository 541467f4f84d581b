"""Triton kernels over one layer's factors A [B, T, d_in] and G [B, T, d_out]; launched by triton_path.py.

Rows r = (b, t) run over B·T; every kernel takes full strides, so non-contiguous inputs are read
where they lie. Products accumulate in float32 whatever the input dtype; float32 inputs use the
dot precision the wrapper passes (TF32 only when torch allows TF32 matmuls).

- ``dots_kernel``:        rows[r, k] = g_rᵀ V_k a_r, one (row block, k, d_out block) per program, the
  [rows, d_out] tile of A V_kᵀ reduced against G in registers and added atomically: no [B, d_out, d_in]
  and no [B·T, K·d_out] intermediate is ever written.
- ``ghost_kernel``:       out[p] = Σ_{t,s} (a_{i,t}·a'_{j,s})(g_{i,t}·g'_{j,s}) for pairs p = (i, j),
  one (pair, t tile, s tile) per program; the T×T Gram tiles live in registers only. SYMMETRIC
  (norms, i = j) skips the tiles below the diagonal and counts those above it twice.
- ``built_kernel``:       (d_out, d_in) tiles of the built g_i in registers, squared (norms, for
  short-T layers where 2T² ≥ d_in·d_out) or dotted with the K vectors (dots, when T·K > T + K).
- ``row_norms_kernel``:   T = 1: ‖g_i‖²·‖a_i‖².
- ``weighted_sum_kernel``: out[k] = Σ_r c[r, k] g_r a_rᵀ = (diag(c_k) G)ᵀA, split over rows when the
  output tiles alone would not fill the GPU.
- ``scale_rows_kernel``:  out[r, :] = c[r, k]·x_r over a block of rows, products in float32 rounded once to
  x's dtype: the weighted sum's "scaled_gemm" route scales the narrower factor with it, then calls cuBLAS.

This module imports triton at import time; the Triton interpreter (TRITON_INTERPRET=1, CPU tensors)
must be chosen before it is imported.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# UNLEARN_FAST_TRITON_AUTOTUNE=0 keeps each kernel's first config: no tuning runs and one compile per
# specialisation, which is what many-shape tests want (tuning every new shape costs seconds).
AUTOTUNE = os.environ.get("UNLEARN_FAST_TRITON_AUTOTUNE", "1") != "0"


def _configs(shapes: list[tuple[int, ...]], names: tuple[str, ...], small: tuple[int, ...]) -> list[triton.Config]:
    """Autotuning candidates; one small config under the interpreter (each program is Python there)."""
    if INTERPRET:
        return [triton.Config(dict(zip(names, small)), num_warps=4, num_stages=1)]
    chosen = shapes if AUTOTUNE else shapes[:1]
    return [triton.Config(dict(zip(names, s[:-2])), num_warps=s[-2], num_stages=s[-1]) for s in chosen]


@triton.jit
def _dot(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y; UPCAST multiplies in float32 (the interpreter's bfloat16 dot is wrong in Triton 3.9)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(x, y, acc=acc, input_precision=PRECISION)


# (BLOCK_R, BLOCK_Q, BLOCK_P, warps, stages): rows × d_out tile, d_in step.
_DOTS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]


@triton.autotune(configs=_configs(_DOTS, ("BLOCK_R", "BLOCK_Q", "BLOCK_P"), (32, 32, 32)),
                 key=["R", "P", "Q", "K", "T", "PRECISION", "Q_MAJOR", "TRANS_LOAD"], reset_to_zero=["out_ptr"])
@triton.jit
def dots_kernel(x_ptr, y_ptr, w_ptr, out_ptr, R, T, P, Q, K,
                sxb, sxt, sxp, syb, syt, syq, swk, swq, swp,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, Q_MAJOR: tl.constexpr, TRANS_LOAD: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[r, k] += Σ_q y[r, q] Σ_p W[k, q, p] x[r, p] over this program's q block (out is [R, K], fp32).

    Q_MAJOR puts the d_out blocks first in launch order, so that programs running together share
    their rows of A (read once from memory, then from L2) while V_k stays in L2.
    """
    if Q_MAJOR:
        pid_q = tl.program_id(0)
        pid_r = tl.program_id(2)
    else:
        pid_r = tl.program_id(0)
        pid_q = tl.program_id(2)
    k = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < R
    bs, ts = rows // T, rows % T
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    x_rows = x_ptr + bs * sxb + ts * sxt
    w_k = w_ptr + k.to(tl.int64) * swk
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        x = tl.load(x_rows[:, None] + ps[None, :] * sxp, mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        if TRANS_LOAD:  # W_k's [Q, P] tile as stored, transposed in registers
            wt = tl.trans(tl.load(w_k + qs[:, None] * swq + ps[None, :] * swp, mask=q_ok[:, None] & p_ok[None, :], other=0.0))
        else:  # W_kᵀ tile [P, Q] read through transposed pointers
            wt = tl.load(w_k + ps[:, None] * swp + qs[None, :] * swq, mask=p_ok[:, None] & q_ok[None, :], other=0.0)
        acc = _dot(x, wt, acc, PRECISION, UPCAST)
    y = tl.load(y_ptr + (bs * syb + ts * syt)[:, None] + qs[None, :] * syq,
                mask=row_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + rows * K + k, tl.sum(acc * y, axis=1), mask=row_ok)


@triton.jit
def _gram_tile(x1_ptr, x2_ptr, ts, ss, t_ok, s_ok, D, s1t, s1d, s2t, s2d,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, TRANS_LOAD: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_T, BLOCK_S] tile of X1 X2ᵀ for one sample's positions ts (of X1) and ss (of X2), over D features."""
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x1 = tl.load(x1_ptr + ts[:, None] * s1t + ds[None, :] * s1d, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if TRANS_LOAD:  # X2's [S, D] tile as stored, transposed in registers
            x2 = tl.trans(tl.load(x2_ptr + ss[:, None] * s2t + ds[None, :] * s2d, mask=s_ok[:, None] & d_ok[None, :], other=0.0))
        else:
            x2 = tl.load(x2_ptr + ds[:, None] * s2d + ss[None, :] * s2t, mask=d_ok[:, None] & s_ok[None, :], other=0.0)
        acc = _dot(x1, x2, acc, PRECISION, UPCAST)
    return acc


# (BLOCK_T, BLOCK_S, BLOCK_D, warps, stages): T×T tile, feature step.
_GHOST = [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 128, 4, 3)]


@triton.autotune(configs=_configs(_GHOST, ("BLOCK_T", "BLOCK_S", "BLOCK_D"), (16, 16, 32)),
                 key=["T1", "T2", "DIN", "DOUT", "SYMMETRIC", "HAS_MASK", "PRECISION", "TRANS_LOAD"], reset_to_zero=["out_ptr"])
@triton.jit
def ghost_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, m1_ptr, m2_ptr, pi_ptr, pj_ptr, out_ptr,
                 T1, T2, DIN, DOUT,
                 sa1b, sa1t, sa1d, sg1b, sg1t, sg1d, sa2b, sa2t, sa2d, sg2b, sg2t, sg2d, sm1b, sm1t, sm2b, sm2t,
                 SYMMETRIC: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 TRANS_LOAD: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[p] += Σ_{t,s in this tile} (a1_{i,t}·a2_{j,s})(g1_{i,t}·g2_{j,s}) · m1_{i,t} m2_{j,s}."""
    pair = tl.program_id(0)
    tile_t = tl.program_id(1)
    tile_s = tl.program_id(2)
    if SYMMETRIC and BLOCK_T == BLOCK_S and tile_s < tile_t:
        return
    i = tl.load(pi_ptr + pair).to(tl.int64)
    j = tl.load(pj_ptr + pair).to(tl.int64)
    ts = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ss = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
    t_ok, s_ok = ts < T1, ss < T2
    aa = _gram_tile(a1_ptr + i * sa1b, a2_ptr + j * sa2b, ts, ss, t_ok, s_ok, DIN, sa1t, sa1d, sa2t, sa2d,
                    PRECISION, UPCAST, TRANS_LOAD, BLOCK_T, BLOCK_S, BLOCK_D)
    gg = _gram_tile(g1_ptr + i * sg1b, g2_ptr + j * sg2b, ts, ss, t_ok, s_ok, DOUT, sg1t, sg1d, sg2t, sg2d,
                    PRECISION, UPCAST, TRANS_LOAD, BLOCK_T, BLOCK_S, BLOCK_D)
    prod = aa * gg
    if HAS_MASK:
        w1 = tl.load(m1_ptr + i * sm1b + ts * sm1t, mask=t_ok, other=0.0).to(tl.float32)
        w2 = tl.load(m2_ptr + j * sm2b + ss * sm2t, mask=s_ok, other=0.0).to(tl.float32)
        prod = prod * w1[:, None] * w2[None, :]
    total = tl.sum(tl.sum(prod, axis=1), axis=0)
    if SYMMETRIC and BLOCK_T == BLOCK_S and tile_s > tile_t:
        total = total * 2.0
    tl.atomic_add(out_ptr + pair, total)


# (BLOCK_Q, BLOCK_P, BLOCK_T, warps, stages): a (d_out, d_in) tile of g_i, position step.
_BUILT = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)]


@triton.autotune(configs=_configs(_BUILT, ("BLOCK_Q", "BLOCK_P", "BLOCK_T"), (32, 32, 16)),
                 key=["T", "P", "Q", "K", "DOTS", "HAS_MASK", "PRECISION", "TRANS_LOAD"], reset_to_zero=["out_ptr"])
@triton.jit
def built_kernel(a_ptr, g_ptr, m_ptr, w_ptr, out_ptr, T, P, Q, K,
                 sab, sat, sap, sgb, sgt, sgq, smb, smt, swk, swq, swp,
                 DOTS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 TRANS_LOAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """A (d_out, d_in) tile of the built g_i = G_iᵀA_i (positions weighted by the mask), then either
    out[i] += ‖tile‖² (norms) or, DOTS, out[i, k] += ⟨tile, V_k tile⟩ for every k (out is [B, K]).

    The tile lives in registers only; building it costs T·d_in·d_out per sample once, where the
    factored dots cost T·K·d_in·d_out (the torch path's order rule picks between the two).
    """
    i = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_p = tl.cdiv(P, BLOCK_P)
    qs = (tile // n_p) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ps = (tile % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok, p_ok = qs < Q, ps < P
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < T
        if TRANS_LOAD:  # G_i's [T, Q] tile as stored, weighted, then transposed
            gs = tl.load(g_ptr + i * sgb + ts[:, None] * sgt + qs[None, :] * sgq, mask=t_ok[:, None] & q_ok[None, :], other=0.0)
            if HAS_MASK:
                weight = tl.load(m_ptr + i * smb + ts * smt, mask=t_ok, other=0.0).to(tl.float32)
                gs = (gs.to(tl.float32) * weight[:, None]).to(a_ptr.dtype.element_ty)
            gt = tl.trans(gs)
        else:
            gt = tl.load(g_ptr + i * sgb + qs[:, None] * sgq + ts[None, :] * sgt, mask=q_ok[:, None] & t_ok[None, :], other=0.0)
            if HAS_MASK:
                weight = tl.load(m_ptr + i * smb + ts * smt, mask=t_ok, other=0.0).to(tl.float32)
                gt = (gt.to(tl.float32) * weight[None, :]).to(a_ptr.dtype.element_ty)
        x = tl.load(a_ptr + i * sab + ts[:, None] * sat + ps[None, :] * sap, mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        acc = _dot(gt, x, acc, PRECISION, UPCAST)
    if DOTS:
        v_ptr = w_ptr  # advanced by a pointer step per k: a k·stride product could overflow int32
        for k in range(K):
            v = tl.load(v_ptr + qs[:, None] * swq + ps[None, :] * swp, mask=q_ok[:, None] & p_ok[None, :], other=0.0)
            v_ptr += swk
            tl.atomic_add(out_ptr + i * K + k, tl.sum(tl.sum(acc * v.to(tl.float32), axis=1), axis=0))
    else:
        tl.atomic_add(out_ptr + i, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def row_norms_kernel(a_ptr, g_ptr, m_ptr, out_ptr, B, P, Q, sab, sap, sgb, sgq, smb,
                     HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """T = 1: out[i] = ‖g_i‖²·‖a_i‖² (· m_i², the mask weighting g)."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    ok = rows < B
    sa = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, P, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(a_ptr + rows[:, None] * sab + ds[None, :] * sap, mask=ok[:, None] & (ds < P)[None, :], other=0.0).to(tl.float32)
        sa += tl.sum(x * x, axis=1)
    sg = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, Q, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        y = tl.load(g_ptr + rows[:, None] * sgb + ds[None, :] * sgq, mask=ok[:, None] & (ds < Q)[None, :], other=0.0).to(tl.float32)
        sg += tl.sum(y * y, axis=1)
    out = sa * sg
    if HAS_MASK:
        weight = tl.load(m_ptr + rows * smb, mask=ok, other=0.0).to(tl.float32)
        out = out * weight * weight
    tl.store(out_ptr + rows, out, mask=ok)


# (BLOCK_Q, BLOCK_P, BLOCK_R, warps, stages): output tile, row step.
_WSUM = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]


@triton.autotune(configs=_configs(_WSUM, ("BLOCK_Q", "BLOCK_P", "BLOCK_R"), (32, 32, 16)),
                 key=["R", "P", "Q", "K", "SPLIT", "PRECISION", "TRANS_LOAD"], reset_to_zero=["out_ptr"])
@triton.jit
def weighted_sum_kernel(a_ptr, g_ptr, c_ptr, out_ptr, R, T, P, Q, K, SPLIT,
                        sab, sat, sap, sgb, sgt, sgq,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, TRANS_LOAD: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[k, q, p] += Σ_{r in this split} c[r, k] g[r, q] a[r, p]; c is [R, K] fp32, out [K, Q, P] fp32."""
    tile = tl.program_id(0)
    k = tl.program_id(1)
    split = tl.program_id(2)
    n_p = tl.cdiv(P, BLOCK_P)
    qs = (tile // n_p) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ps = (tile % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok, p_ok = qs < Q, ps < P
    chunk = tl.cdiv(tl.cdiv(R, SPLIT), BLOCK_R) * BLOCK_R
    start = split * chunk
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, chunk, BLOCK_R):
        rows = (start + r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rows < R
        bs, ts = rows // T, rows % T
        weight = tl.load(c_ptr + rows * K + k, mask=r_ok, other=0.0)
        if TRANS_LOAD:  # G's [rows, Q] tile as stored, weighted, then transposed
            gs = tl.load(g_ptr + (bs * sgb + ts * sgt)[:, None] + qs[None, :] * sgq, mask=r_ok[:, None] & q_ok[None, :], other=0.0)
            gt = tl.trans((gs.to(tl.float32) * weight[:, None]).to(a_ptr.dtype.element_ty))
        else:
            gt = tl.load(g_ptr + qs[:, None] * sgq + (bs * sgb + ts * sgt)[None, :], mask=q_ok[:, None] & r_ok[None, :], other=0.0)
            gt = (gt.to(tl.float32) * weight[None, :]).to(a_ptr.dtype.element_ty)
        x = tl.load(a_ptr + (bs * sab + ts * sat)[:, None] + ps[None, :] * sap, mask=r_ok[:, None] & p_ok[None, :], other=0.0)
        acc = _dot(gt, x, acc, PRECISION, UPCAST)
    tl.atomic_add(out_ptr + k.to(tl.int64) * Q * P + qs[:, None] * P + ps[None, :], acc, mask=q_ok[:, None] & p_ok[None, :])


@triton.jit
def scale_rows_kernel(x_ptr, c_ptr, out_ptr, ROW0, N, T, D, K, COL, sxb, sxt, sxd,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [N, D] (contiguous, x's dtype) = c[r, COL] · x[r, :] for rows r = ROW0 … ROW0 + N − 1 of x;
    c is [R, K] fp32, the product is taken in fp32 and rounded once."""
    rows = (ROW0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ds = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # ds·sxd passes 2³¹ column-major
    r_ok = rows < ROW0 + N
    ok = r_ok[:, None] & (ds < D)[None, :]
    x = tl.load(x_ptr + ((rows // T) * sxb + (rows % T) * sxt)[:, None] + ds[None, :] * sxd, mask=ok, other=0.0)
    weight = tl.load(c_ptr + rows * K + COL, mask=r_ok, other=0.0)
    scaled = (x.to(tl.float32) * weight[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (rows - ROW0)[:, None] * D + ds[None, :], scaled, mask=ok)
