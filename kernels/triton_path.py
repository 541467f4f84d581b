"""Launchers of the Triton kernels: the same operations and signatures as torch_path.py.

Inputs are float16, bfloat16 or float32 (float64 stays on the torch path, see the dispatch);
results are float32. For the tensor-core products, factored-order dots cast V to A's dtype, and the
weighted sum rounds each c·g to it (C itself is read in float32), so half inputs round those too;
built-order dots read V in float32, unrounded.
"""

from __future__ import annotations

import torch
import triton

from . import triton_kernels as tk
from .torch_path import built_dots_cheaper, ghost_norms_cheaper, linear_cross_dots as _torch_cross_dots


def _precision(dtype: torch.dtype) -> str:
    """float32 dots: TF32 exactly when torch's own matmuls would (torch.backends.cuda.matmul.allow_tf32);
    otherwise float32 accuracy, from three TF32 products per multiply ("tf32x3", errors near float32's)
    or plain FMA ("ieee"), per LAYOUT["fp32"]. Half inputs multiply exactly either way."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if tk.INTERPRET else LAYOUT["fp32"]


# Variants, kept switchable so that one GPU run times each (benchmarks/kernel_variants.py; figures in
# benchmarks/RESULTS.md): "<kernel>_trans" reads that kernel's transposed operand tile in its stored
# order and transposes it in registers (else through transposed pointers), per input dtype;
# "dots_q_major" launches the dots kernel's d_out blocks first; "fp32" is the float32 dot precision
# when TF32 is off. The defaults follow one H100 run (2026-11-23, benchmarks/RESULTS.md run B): the
# "new" bundle (stored-order tiles, d_out-first dots, tf32x3) won or tied except for the 16-bit weighted
# sum (1.6× slower, so it keeps transposed-pointer tiles) and fp32 built-order dots (1.16× slower,
# kept so that float32 has one precision). In run B the autotune key did not include these flags, so
# each variant ran with the configs tuned for the first one timed; the keys now include them (each
# variant is tuned on its own), which no GPU run has timed yet.
_ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUT: dict[str, object] = {
    "dots_trans": dict.fromkeys(_ALL_DTYPES, True),
    "ghost_trans": dict.fromkeys(_ALL_DTYPES, True),
    "built_trans": dict.fromkeys(_ALL_DTYPES, True),
    "wsum_trans": {torch.float32: True, torch.bfloat16: False, torch.float16: False},
    "dots_q_major": True,
    "fp32": "tf32x3",
    # Weighted sum (diag(c_k)G)ᵀA: "fused" weights G's tiles inside one Triton GEMM; "scaled_gemm" writes
    # c_k times the narrower factor (scale_rows_kernel, one memory pass) and hands the product to cuBLAS.
    # The fused kernel took 3.3–6.2× the cuBLAS GEMM in run B; the scaled route costs that GEMM plus one
    # pass over B·T·min(d_in, d_out)·K elements, so it is the default, by that arithmetic: no GPU run has
    # timed it yet (benchmarks/kernel_variants.py times both).
    "wsum_route": dict.fromkeys(_ALL_DTYPES, "scaled_gemm"),
}
WSUM_ROUTES = ("fused", "scaled_gemm")
# Bytes of the narrower factor scaled per GEMM: the route's extra memory, beyond a float32 output slice when
# 16-bit GEMMs cannot add into float32 in place. Large enough (21,845 rows at d = 768 in bf16: ~100 µs of
# H100 GEMM at 768×3072) that the two launches per chunk (~30 µs of Python) stay hidden behind the GPU.
SCALED_CHUNK_BYTES = 32 << 20


def _flags(dtype: torch.dtype, kernel: str) -> dict[str, object]:
    """The constexpr flags: the dot's float32 precision, float32 products for bfloat16 under the
    interpreter, and the kernel's tile-loading variant for this dtype."""
    return {"PRECISION": _precision(dtype), "UPCAST": tk.INTERPRET and dtype == torch.bfloat16,
            "TRANS_LOAD": LAYOUT[f"{kernel}_trans"][dtype]}


def _row_view(x: torch.Tensor) -> tuple[int, tuple[int, int, int]]:
    """(T, strides) to pass for x [B, T, d]: when (b, t) merge into one row index with one stride, T = 1
    and the row stride (Triton specialises an argument equal to 1, so the kernel's row // T and
    row % T then cost nothing); else x's own T and strides."""
    b, t, _ = x.shape
    if t == 1 or x.stride(0) == t * x.stride(1):
        return 1, (x.stride(1) if t > 1 else x.stride(0), 0, x.stride(2))
    return t, tuple(x.stride())


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def linear_dots(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G_iᵀA_i, W_k⟩ → [B, K] float32, in the cheaper of two orders (the torch path's rule):
    fused A·W_kᵀ tiles reduced against G (B·T·K·d_in·d_out), or, when T·K > T + K, built g_i tiles
    dotted with every V_k in registers (B·T·d_in·d_out + B·K·d_in·d_out)."""
    b, t, d_in = a.shape
    d_out, k = g.shape[2], w.shape[0]
    if built_dots_cheaper(t, k) and d_in and d_out:
        out = torch.zeros(b, k, dtype=torch.float32, device=a.device)  # V is read in float32: no rounding
        return _built(a, g, None if mask is None else mask.to(torch.float32), w, out)
    rows = torch.zeros(b * t, k, dtype=torch.float32, device=a.device)
    if rows.numel() and d_in and d_out:
        w = w.to(a.dtype)
        q_major = LAYOUT["dots_q_major"]

        def grid(meta):
            blocks = (triton.cdiv(b * t, meta["BLOCK_R"]), triton.cdiv(d_out, meta["BLOCK_Q"]))
            return (blocks[1], k, blocks[0]) if q_major else (blocks[0], k, blocks[1])
        tk.dots_kernel[grid](a, g, w, rows, b * t, t, d_in, d_out, k,
                             a.stride(0), a.stride(1), a.stride(2), g.stride(0), g.stride(1), g.stride(2),
                             w.stride(0), w.stride(1), w.stride(2), Q_MAJOR=q_major, **_flags(a.dtype, "dots"))
    rows = rows.view(b, t, k)
    if mask is not None:
        rows = rows * mask.to(torch.float32).unsqueeze(-1)
    return rows[:, 0] if t == 1 else rows.sum(1)


def _ghost(a1, g1, a2, g2, m1, m2, pairs_i, pairs_j, symmetric: bool) -> torch.Tensor:
    out = torch.zeros(pairs_i.shape[0], dtype=torch.float32, device=a1.device)
    if out.numel() == 0 or a1.shape[1] == 0 or a2.shape[1] == 0:
        return out
    has_mask = m1 is not None
    m1 = m1 if has_mask else out  # placeholders, never read
    m2 = m2 if has_mask else out
    sm1 = (m1.stride(0), m1.stride(1)) if has_mask else (0, 0)
    sm2 = (m2.stride(0), m2.stride(1)) if has_mask else (0, 0)
    t1, t2 = a1.shape[1], a2.shape[1]
    grid = lambda meta: (pairs_i.shape[0], triton.cdiv(t1, meta["BLOCK_T"]), triton.cdiv(t2, meta["BLOCK_S"]))  # noqa: E731
    tk.ghost_kernel[grid](a1, g1, a2, g2, m1, m2, pairs_i, pairs_j, out, t1, t2, a1.shape[2], g1.shape[2],
                          *a1.stride(), *g1.stride(), *a2.stride(), *g2.stride(), *sm1, *sm2,
                          SYMMETRIC=symmetric, HAS_MASK=has_mask, **_flags(a1.dtype, "ghost"))
    return out


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖G_iᵀA_i‖² → [B] float32: T = 1 row norms, else the ghost form or built tiles (2T² vs d_in·d_out)."""
    b, t, d_in = a.shape
    d_out = g.shape[2]
    out = torch.zeros(b, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0 or d_in == 0 or d_out == 0:
        return out
    mask_f = None if mask is None else mask.to(torch.float32)
    if t == 1:
        m = mask_f if mask_f is not None else out
        block_d = 16 if tk.INTERPRET else 128
        tk.row_norms_kernel[(triton.cdiv(b, 32),)](a, g, m, out, b, d_in, d_out, a.stride(0), a.stride(2), g.stride(0),
                                                    g.stride(2), m.stride(0), HAS_MASK=mask_f is not None,
                                                    BLOCK_B=32, BLOCK_D=block_d)
        return out
    if ghost_norms_cheaper(t, d_in, d_out):
        index = torch.arange(b, device=a.device, dtype=torch.int32)
        return _ghost(a, g, a, g, mask_f, mask_f, index, index, symmetric=True)
    return _built(a, g, mask_f, None, out)


def _built(a: torch.Tensor, g: torch.Tensor, mask_f: torch.Tensor | None, w: torch.Tensor | None,
           out: torch.Tensor) -> torch.Tensor:
    """Per-sample tiles of the built g_i: squared norms into out [B] (w None) or dots with w into out [B, K]."""
    b, t, d_in = a.shape
    d_out = g.shape[2]
    m = mask_f if mask_f is not None else out
    sm = (m.stride(0), m.stride(1)) if mask_f is not None else (0, 0)
    k, sw = (w.shape[0], w.stride()) if w is not None else (1, (0, 0, 0))
    grid = lambda meta: (b, triton.cdiv(d_out, meta["BLOCK_Q"]) * triton.cdiv(d_in, meta["BLOCK_P"]))  # noqa: E731
    tk.built_kernel[grid](a, g, m, w if w is not None else out, out, t, d_in, d_out, k,
                          *a.stride(), *g.stride(), *sm, *sw, DOTS=w is not None,
                          HAS_MASK=mask_f is not None, **_flags(a.dtype, "built"))
    return out


def linear_cross_dots(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                      mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G1_iᵀA1_i, G2_jᵀA2_j⟩ → [B1, B2] float32, ghost form, every pair (i, j).

    Below 16×16 position pairs the kernel's tiles (one program per sample pair, at least 16×16)
    would be mostly padding, so short sequences (T = 1 in an MLP) take the torch path's two GEMMs.
    """
    b1, b2 = a1.shape[0], a2.shape[0]
    if a1.shape[1] * a2.shape[1] < 256:
        return _torch_cross_dots(a1.float(), g1.float(), a2.float(), g2.float(), mask1, mask2)
    if (mask1 is None) != (mask2 is None):  # one kernel signature: a missing mask is all ones
        mask1 = mask1 if mask1 is not None else torch.ones(a1.shape[:2], device=a1.device)
        mask2 = mask2 if mask2 is not None else torch.ones(a2.shape[:2], device=a2.device)
    m1 = None if mask1 is None else mask1.to(torch.float32)
    m2 = None if mask2 is None else mask2.to(torch.float32)
    pairs_i = torch.arange(b1, device=a1.device, dtype=torch.int32).repeat_interleave(b2)
    pairs_j = torch.arange(b2, device=a1.device, dtype=torch.int32).repeat(b1)
    return _ghost(a1, g1, a2.to(a1.dtype), g2.to(a1.dtype), m1, m2, pairs_i, pairs_j, symmetric=False).view(b1, b2)


def linear_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i c_{i,k} G_iᵀA_i → [K, d_out, d_in] float32, by LAYOUT["wsum_route"]: the weights fused into G's
    tiles of one Triton GEMM, or c_k times the narrower factor then a cuBLAS GEMM with float32 output."""
    b, t, d_in = a.shape
    d_out, k = g.shape[2], c.shape[1]
    out = torch.zeros(k, d_out, d_in, dtype=torch.float32, device=a.device)
    if out.numel() == 0 or b * t == 0:
        return out
    weights = c.to(torch.float32).unsqueeze(1).expand(b, t, k)
    if mask is not None:
        weights = weights * mask.to(torch.float32).unsqueeze(-1)
    weights = weights.reshape(b * t, k).contiguous()
    route = LAYOUT["wsum_route"][a.dtype]
    if route not in WSUM_ROUTES:
        raise ValueError(f"LAYOUT['wsum_route'][{a.dtype}] = {route!r} is not valid; valid choices: {', '.join(WSUM_ROUTES)}")
    if route == "scaled_gemm" and (a.dtype == torch.float32 or float32_output_mode(a.device)):
        return _scaled_gemm_weighted_sum(a, g, weights, out)
    # Split the rows when the output tiles (at 128×128) would leave most multiprocessors idle.
    tiles = triton.cdiv(d_out, 128) * triton.cdiv(d_in, 128) * k
    split = max(1, min(triton.cdiv(2 * _multiprocessors(a.device), tiles), triton.cdiv(b * t, 256)))
    (t_a, strides_a), (t_g, strides_g) = _row_view(a), _row_view(g)
    if t_a != t_g:  # only one of the two merges its rows: index both by (b, t)
        t_a, strides_a, strides_g = t, tuple(a.stride()), tuple(g.stride())
    grid = lambda meta: (triton.cdiv(d_out, meta["BLOCK_Q"]) * triton.cdiv(d_in, meta["BLOCK_P"]), k, split)  # noqa: E731
    tk.weighted_sum_kernel[grid](a, g, weights, out, b * t, t_a, d_in, d_out, k, split,
                                 *strides_a, *strides_g, **_flags(a.dtype, "wsum"))
    return out


_FLOAT32_OUTPUT: dict[str, str | None] = {}  # device type → how 16-bit GEMMs write float32 there (see below)


def float32_output_mode(device: torch.device) -> str | None:
    """How 16-bit GEMMs give float32 results on ``device``, probed once on a tiny product: "out" when
    ``torch.mm`` / ``torch.addmm`` with ``out_dtype=float32`` write and add into a float32 tensor in place
    (CUDA in recent torch), "copy" when only ``torch.mm(..., out_dtype=)`` runs (its result is then added
    to the output), None when neither does: the scaled route would then round the sum to 16 bits or
    multiply in float32, so the fused kernel serves."""
    if device.type not in _FLOAT32_OUTPUT:
        _FLOAT32_OUTPUT[device.type] = None
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        for mode in ("out", "copy"):
            out = torch.zeros(2, 2, dtype=torch.float32, device=device)
            try:
                _FLOAT32_OUTPUT[device.type] = mode
                _gemm_into(out, probe, probe, accumulate=False)
                _gemm_into(out, probe, probe, accumulate=True)
                if bool((out == 4).all()):
                    break
            except (TypeError, RuntimeError, NotImplementedError):
                pass
            _FLOAT32_OUTPUT[device.type] = None
    return _FLOAT32_OUTPUT[device.type]


def _gemm_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    """out [m, n] float32 (+)= x [m, r] @ y [r, n], the product accumulated in float32 by the GEMM itself."""
    if x.dtype == torch.float32:
        torch.addmm(out, x, y, out=out) if accumulate else torch.mm(x, y, out=out)
    elif _FLOAT32_OUTPUT[out.device.type] == "out":
        if accumulate:
            torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
        else:
            torch.mm(x, y, out_dtype=torch.float32, out=out)
    else:
        product = torch.mm(x, y, out_dtype=torch.float32)
        out.add_(product) if accumulate else out.copy_(product)


def _scaled_gemm_weighted_sum(a: torch.Tensor, g: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [K, d_out, d_in] = Gᵀ(diag(w_k)A) or (diag(w_k)G)ᵀA, scaling whichever factor is narrower;
    weights [B·T, K] float32. Rows go SCALED_CHUNK_BYTES of the narrower factor at a time: one scaling
    pass, then one GEMM adding into out[k] (float32 output from 16-bit operands)."""
    b, t, d_in = a.shape
    d_out, k = g.shape[2], weights.shape[1]
    rows = b * t
    scale_a = d_in <= d_out
    narrow, wide = (a, g) if scale_a else (g, a)
    d_narrow = narrow.shape[2]
    wide_rows = wide.reshape(rows, wide.shape[2])  # a view when (b, t) merge, else one copy for cuBLAS
    block_r, block_d = (16, 32) if tk.INTERPRET else (32, 128)
    step = max(1, min(rows, SCALED_CHUNK_BYTES // (d_narrow * a.element_size())))
    scaled = torch.empty(step, d_narrow, dtype=a.dtype, device=a.device)
    for col in range(k):
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            grid = (triton.cdiv(n, block_r), triton.cdiv(d_narrow, block_d))
            tk.scale_rows_kernel[grid](narrow, weights, scaled, r0, n, t, d_narrow, k, col, *narrow.stride(),
                                       BLOCK_R=block_r, BLOCK_D=block_d)
            x, y = (wide_rows[r0:r0 + n].T, scaled[:n]) if scale_a else (scaled[:n].T, wide_rows[r0:r0 + n])
            _gemm_into(out[col], x, y, accumulate=r0 > 0)
    return out
