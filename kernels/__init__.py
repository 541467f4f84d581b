"""Per-layer kernels behind one dispatch point: Triton on CUDA, the factored torch path on CPU.

Installed as ``unlearn_fast.kernels`` (the build maps this top-level folder there). Every operation
works on one layer's cached factors, A [B, T, d_in] (what the weight multiplies) and G [B, T, d_out]
(the output gradient), so that the per-sample weight gradient is g_i = G_iᵀA_i; an optional mask
[B, T] (bool, or float weights) multiplies G's positions:

- :func:`linear_dots`          ⟨g_i, V_k⟩ for V [K, d_out, d_in]        → [B, K]
- :func:`linear_sq_norms`      ‖g_i‖²                                    → [B]
- :func:`linear_cross_dots`    ⟨g_i, g'_j⟩ between two factor sets, ghost form → [B1, B2]
- :func:`linear_weighted_sum`  Σ_i c_{i,k} g_i for C [B, K]               → [K, d_out, d_in]
- :func:`linear_fisher_vp`     Σ_i ⟨g_i, V_k⟩ g_i (dots, then the weighted sum: two passes) → [K, d_out, d_in]
- :func:`linear_multi_dots`, :func:`linear_multi_weighted_sum`: dots and weighted sums of R output
  gradients per sample sharing its A, G [B, R, T, d_out] (the factored GGN); torch path on every device

Backend: :func:`select_backend` picks "triton" for CUDA tensors when Triton imports, else "torch";
``UNLEARN_FAST_BACKEND=triton|torch`` forces one (forced Triton on CPU tensors needs the
interpreter, TRITON_INTERPRET=1). float64 always takes the torch path. If Triton is missing, the
torch path runs instead, with one warning per process; if a kernel fails to compile or launch, the
torch path runs that operation from then on, with one warning per operation and dtype.
Results are float32 for half inputs (accumulated in float32) and the input dtype otherwise.
On the CPU, the torch path's large float32 GEMMs go through :func:`.cpu_gemm.matmul_nt` (oneDNN
where MKL is slower; ``UNLEARN_FAST_CPU_GEMM=matmul`` turns that off).

Not fused here: the K-FAC factors AᵀA and GᵀG (issue 4 asks for them "where it pays"). They are
accumulated once per solve (:mod:`unlearn_fast.influence.kfac`; for the default GGN from random output
cotangents, not the data's labels), while these operations run on every product of an iterative
solve: fusing would save one read of A and G per solve, and for the GGN no pass here sees that G.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import torch_path
from .checks import accumulate_dtype, check_factors, check_multi_factors, check_vectors, check_weights

BACKENDS = ("triton", "torch")
BACKEND_ENV = "UNLEARN_FAST_BACKEND"
_failed: dict[tuple[str, torch.dtype], str] = {}  # (operation, dtype) → why its Triton kernel could not run


def select_backend(device: torch.device | str) -> str:
    """"triton" for CUDA tensors when Triton imports, else "torch"; ``UNLEARN_FAST_BACKEND`` overrides.

    A CUDA device without an importable Triton gets "torch" and one warning per process."""
    forced = os.environ.get(BACKEND_ENV)
    if forced and forced.strip():
        forced = forced.strip().lower()
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not valid; valid choices: {', '.join(BACKENDS)}")
        return forced
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cuda":
        return "torch"
    return "triton" if _triton_imports() else "torch"


_triton_import_error: str | None = None  # why Triton did not import ("" once it has)


def _triton_imports() -> bool:
    """Whether Triton imports; the first failure warns (once per process) that the torch path runs instead."""
    global _triton_import_error
    if _triton_import_error is None:
        try:
            import triton  # noqa: F401
            _triton_import_error = ""
        except ImportError as error:
            _triton_import_error = f"{type(error).__name__}: {error}"
            warnings.warn(f"unlearn_fast.kernels: Triton cannot be imported ({_triton_import_error}); the torch "
                          f"path runs every kernel instead", RuntimeWarning, stacklevel=4)
    return not _triton_import_error


def _dispatch(op: str, a: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
    """Run ``op`` on the selected backend; fall back to torch if Triton is missing (one warning per
    process) or the op's kernel fails to compile or launch (one warning per operation and dtype)."""
    reference: Callable[..., torch.Tensor] = getattr(torch_path, op)
    # The common CPU call, first and cheapest: the issue's CPU target is "never slower than the
    # torch path", and the full choice below cost ~3 µs, 8 % of a 64×1024 T=1 norm.
    if not a.is_cuda and not os.environ.get(BACKEND_ENV):
        return reference(*args)
    # The Triton kernels build no autograd graph: inputs that need gradients take the torch path.
    if (a.dtype == torch.float64 or select_backend(a.device) == "torch" or (op, a.dtype) in _failed
            or any(isinstance(t, torch.Tensor) and t.requires_grad for t in args) or not _triton_imports()):
        return reference(*args)
    try:
        from . import triton_path
        kernel = getattr(triton_path, op, None)
        if kernel is None:  # no Triton kernel for this operation: the torch path serves every device
            return reference(*args)
        return kernel(*args)
    except torch.cuda.OutOfMemoryError:
        raise  # not a kernel failure: the torch path would need more memory still
    except Exception as error:  # noqa: BLE001  (compile or launch failure: torch takes over)
        # The torch path first: an error it raises too comes from the inputs, not the kernel, so it
        # propagates and the kernel stays in use (found in review: a bad call switched Triton off).
        result = reference(*args)
        key = (op, a.dtype)
        _failed[key] = f"{type(error).__name__}: {error}"
        warnings.warn(f"unlearn_fast.kernels: the Triton kernel for {op} ({a.dtype}) failed ({_failed[key]}); "
                      f"using the torch path for it from now on", RuntimeWarning, stacklevel=3)
        return result


def _empty(*tensors: torch.Tensor) -> bool:
    """Whether a factor or vector set has no elements: every result is then a sum over nothing, zeros."""
    return any(t.numel() == 0 for t in tensors)


def linear_dots(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G_iᵀA_i, V_k⟩ for A [B, T, d_in], G [B, T, d_out], V [K, d_out, d_in] → [B, K]."""
    check_factors(a, g, mask)
    check_vectors(a, g, v)
    if _empty(a, g, v):
        return torch.zeros(a.shape[0], v.shape[0], dtype=accumulate_dtype(a.dtype), device=a.device)
    return _dispatch("linear_dots", a, (a, g, v, mask))


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖G_iᵀA_i‖²_F → [B]: the ghost form ⟨A_iA_iᵀ, G_iG_iᵀ⟩ when 2T² < d_in·d_out, else built g_i."""
    check_factors(a, g, mask)
    if _empty(a, g):
        return torch.zeros(a.shape[0], dtype=accumulate_dtype(a.dtype), device=a.device)
    return _dispatch("linear_sq_norms", a, (a, g, mask))


def linear_cross_dots(a1: torch.Tensor, g1: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor,
                      mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> torch.Tensor:
    """⟨G1_iᵀA1_i, G2_jᵀA2_j⟩ = ⟨A1_iA2_jᵀ, G1_iG2_jᵀ⟩ → [B1, B2], tiled so no T×T Gram is stored whole."""
    check_factors(a1, g1, mask1, names=("A1", "G1"))
    check_factors(a2, g2, mask2, names=("A2", "G2"))
    if a1.shape[2] != a2.shape[2] or g1.shape[2] != g2.shape[2] or a1.dtype != a2.dtype or a1.device != a2.device:
        raise ValueError(f"the two factor sets must share d_in, d_out, dtype and device: A1 {list(a1.shape)} {a1.dtype}, "
                         f"G1 {list(g1.shape)}, A2 {list(a2.shape)} {a2.dtype}, G2 {list(g2.shape)}")
    if _empty(a1, g1, a2, g2):
        return torch.zeros(a1.shape[0], a2.shape[0], dtype=accumulate_dtype(a1.dtype), device=a1.device)
    return _dispatch("linear_cross_dots", a1, (a1, g1, a2, g2, mask1, mask2))


def linear_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i c_{i,k} G_iᵀA_i = (diag(c_k) G)ᵀA for C [B, K] → [K, d_out, d_in]."""
    check_factors(a, g, mask)
    check_weights(a, c)
    if _empty(a, g, c):
        return torch.zeros(c.shape[1], g.shape[2], a.shape[2], dtype=accumulate_dtype(a.dtype), device=a.device)
    return _dispatch("linear_weighted_sum", a, (a, g, c, mask))


def linear_fisher_vp(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's empirical-Fisher product Σ_i ⟨g_i, V_k⟩ g_i → [K, d_out, d_in], in two passes
    (c = linear_dots, then linear_weighted_sum(c)); a model's product sums c over its layers first."""
    return linear_weighted_sum(a, g, linear_dots(a, g, v, mask), mask)


def linear_multi_dots(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """⟨G_{i,r}ᵀA_i, V_k⟩ for A [B, T, d_in], G [B, R, T, d_out], V [K, d_out, d_in] → [B, R, K]."""
    check_vectors(a, check_multi_factors(a, g), v)
    if _empty(a, g, v):
        return torch.zeros(a.shape[0], g.shape[1], v.shape[0], dtype=accumulate_dtype(a.dtype), device=a.device)
    return _dispatch("linear_multi_dots", a, (a, g, v))


def linear_multi_weighted_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_{i,r} c_{i,r,k} G_{i,r}ᵀA_i for A [B, T, d_in], G [B, R, T, d_out], C [B, R, K] → [K, d_out, d_in]."""
    check_multi_factors(a, g)
    check_weights(a, c, rows=(g.shape[1],))
    if _empty(a, g, c):
        return torch.zeros(c.shape[2], g.shape[3], a.shape[2], dtype=accumulate_dtype(a.dtype), device=a.device)
    return _dispatch("linear_multi_weighted_sum", a, (a, g, c))


__all__ = ["BACKENDS", "BACKEND_ENV", "select_backend", "linear_dots", "linear_sq_norms", "linear_cross_dots",
           "linear_weighted_sum", "linear_fisher_vp", "linear_multi_dots", "linear_multi_weighted_sum"]
