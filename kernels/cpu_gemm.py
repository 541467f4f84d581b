"""The CPU GEMM behind the torch path: x @ yᵀ through oneDNN where that is the faster library.

torch's CPU builds run float32 ``matmul`` through MKL, which takes a generic code path on non-Intel
CPUs. On the 2-core AMD EPYC (Zen 4, AVX-512) CI machine, MKL ran [256, 1024] × [1024, 8192] at
105–120 GFLOP/s and oneDNN (also bundled with torch, and also run on torch's OpenMP threads) at
197–203, against OpenBLAS sgemm's 196 at 4096³; see benchmarks/RESULTS.md. oneDNN lost only on
tiny products (64³: 16 against 44 GFLOP/s, call overhead) and on transposed views, which it copies
first. So :func:`matmul_nt` sends a product to oneDNN only when it is float32 on the CPU, both
operands are row-major, no autodiff can see it (the op has no derivative formulas: no requires_grad,
no open forward-mode level, no torch.func transform) and it has at least MIN_MULTIPLY_ADDS
multiply-adds; everything else is ``x @ y.T``.

The oneDNN entry point is ``torch.ops.mkldnn._linear_pointwise`` (the op inductor's CPU backend
uses for linear layers). Being private, it is probed once per process: if it is missing, fails, or
disagrees with ``x @ y.T`` on a probe product, every call takes ``x @ y.T``.
``UNLEARN_FAST_CPU_GEMM=matmul`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch.autograd import forward_ad

CPU_GEMM_ENV = "UNLEARN_FAST_CPU_GEMM"
CPU_GEMM_CHOICES = ("auto", "matmul")
# Below this many multiply-adds oneDNN's call overhead outweighs its faster kernel: it lost at 64³ = 2¹⁸
# (16 vs 44 GFLOP/s) and won from [1437, 256] × [256, 10] ≈ 2²¹·⁸ up (76 vs 35); 2²⁰ lies between.
MIN_MULTIPLY_ADDS = 1 << 20
_PROBE_SHAPE = (37, 129, 65)  # (M, K, N): odd sizes, so that edge tiles are exercised
_onednn_ok: bool | None = None


def _choice() -> str:
    value = os.environ.get(CPU_GEMM_ENV, "auto").strip().lower() or "auto"
    if value not in CPU_GEMM_CHOICES:
        raise ValueError(f"{CPU_GEMM_ENV}={value!r} is not valid; valid choices: {', '.join(CPU_GEMM_CHOICES)}")
    return value


def _onednn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, y, None, "none", [], "")


def onednn_available() -> bool:
    """Whether oneDNN's float32 linear runs here and matches ``x @ y.T`` (probed once per process)."""
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = False
        if torch.backends.mkldnn.is_available():
            m, k, n = _PROBE_SHAPE
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            try:
                got = _onednn(x, y)
            except (RuntimeError, AttributeError, TypeError):
                return False
            want = (x.double() @ y.double().T).float()
            _onednn_ok = bool(got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4))
    return _onednn_ok


def matmul_nt(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ yᵀ for x [M, K], y [N, K] → [M, N], on oneDNN when that is faster (module docstring)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"matmul_nt needs x [M, K] and y [N, K] with one K, got x {list(x.shape)} and y {list(y.shape)}")
    if x.device.type != "cpu" or _choice() != "auto":
        return x @ y.T
    m, k = x.shape
    n = y.shape[0]
    if (x.dtype == torch.float32 and y.dtype == torch.float32 and m * k * n >= MIN_MULTIPLY_ADDS
            and x.is_contiguous() and y.is_contiguous() and not differentiated(x, y) and onednn_available()):
        return _onednn(x, y)
    return x @ y.T


def differentiated(*tensors: torch.Tensor) -> bool:
    """Whether autodiff could see an operation on these tensors: reverse mode (requires_grad), forward
    mode (a dual level is open) or a torch.func transform (wrapped tensors). The oneDNN op has no
    derivative formulas, so under forward mode it silently returned a zero tangent (found in review):
    all of these take matmul; the torch path also avoids in-place accumulation and non-smooth forms."""
    if any(t.requires_grad for t in tensors):
        return True
    try:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        return forward_ad._current_level >= 0 or any(wrapped(t) for t in tensors)
    except AttributeError:  # a torch without these internals: assume the worst
        return True
