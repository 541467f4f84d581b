"""Cases, inputs and the compared paths of benchmarks/test_bench_kernels.py (see its docstring).

A case is one operation on one layer's factors A [B, T, d_in], G [B, T, d_out] (and V [K, d_out, d_in]);
a path is a zero-argument callable computing it one way. Results are compared with the float64 torch
path on the same (already rounded) inputs, so input rounding is never counted as error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from func_peer import FUNC_CHUNK
from unlearn_fast import kernels
from unlearn_fast.kernels import torch_path

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
# Relative Frobenius error allowed against the float64 reference (float32 may run as TF32).
TOLERANCE = {"float32": 5e-3, "bfloat16": 3e-2}
# The public operations each case's kernel path calls (for the Triton-fallback check).
OPS = {"grad_dots": ("linear_dots",), "grad_norms": ("linear_sq_norms",),
       "fisher_vp": ("linear_dots", "linear_weighted_sum")}
GPT2_LAYERS = ((768, 768), (768, 3072), (3072, 768))  # attention proj / MLP up / MLP down


@dataclass(frozen=True)
class Case:
    op: str  # grad_dots | grad_norms | fisher_vp
    b: int
    t: int
    d_in: int
    d_out: int
    k: int  # vectors V (0 for grad_norms)
    dtype: str  # a key of DTYPES

    @property
    def label(self) -> str:
        k = f" K={self.k}" if self.op != "grad_norms" else ""
        return f"{self.op}{k} B={self.b} T={self.t} {self.d_in}x{self.d_out} {SHORT[self.dtype]}"

    @property
    def group(self) -> str:
        return f"kernels {self.label}"

    @property
    def id(self) -> str:
        k = f"-K{self.k}" if self.op != "grad_norms" else ""
        return f"{self.op}{k}-B{self.b}-T{self.t}-{self.d_in}x{self.d_out}-{SHORT[self.dtype]}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _for_shapes(shapes, dtypes) -> list[Case]:
    ops = (("grad_dots", 1), ("grad_dots", 8), ("grad_norms", 0), ("fisher_vp", 1))
    return [Case(op, b, t, d_in, d_out, k, dtype)
            for dtype in dtypes for (b, t, d_in, d_out) in shapes for op, k in ops]


CPU_SIZES_ENV = "KERNEL_BENCH_CPU_SIZES"
CPU_SIZES = ("small", "gpt2")


def cases() -> list[Case]:
    """On CUDA: an MLP layer and GPT-2-small's three layer shapes at T=128 and 512, fp32 and bf16.
    On CPU, by ``KERNEL_BENCH_CPU_SIZES``: "small" (the default: two small fp32 sizes, so the file runs
    in about a minute on 2 cores) or "gpt2" (GPT-2-small's three layer shapes at B=8, T=128, fp32:
    several minutes)."""
    if CUDA:
        shapes = [(256, 1, 1024, 1024)] + [(64, t, d_in, d_out) for t in (128, 512) for d_in, d_out in GPT2_LAYERS]
        return _for_shapes(shapes, ("float32", "bfloat16"))
    sizes = os.environ.get(CPU_SIZES_ENV, "small").strip().lower() or "small"
    if sizes not in CPU_SIZES:
        raise ValueError(f"{CPU_SIZES_ENV}={sizes!r} is not valid; valid choices: {', '.join(CPU_SIZES)}")
    if sizes == "gpt2":
        return _for_shapes([(8, 128, d_in, d_out) for d_in, d_out in GPT2_LAYERS], ("float32",))
    return _for_shapes([(64, 1, 1024, 1024), (32, 64, 256, 256)], ("float32",))


def paths_for(case: Case) -> list[str]:
    """func (the peer), opacus (norms only), torch, kernels, and gemm where a GEMM computes the same products."""
    paths = ["func"] + (["opacus"] if case.op == "grad_norms" else []) + ["torch", "kernels"]
    if not (case.op == "grad_norms" and case.t == 1):  # T = 1 norms are two row reductions: no GEMM
        paths.append("gemm")
    return paths


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 reference


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A, G (and V unless norms) in the case's dtype, generated on the device (seeded)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(case.torch_dtype)

    a = randn(case.b, case.t, case.d_in)
    g = randn(case.b, case.t, case.d_out)
    v = randn(case.k, case.d_out, case.d_in) if case.op != "grad_norms" else None
    return a, g, v


def reference(case: Case, a: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """The float64 torch path on the same inputs."""
    a, g = a.double(), g.double()
    if case.op == "grad_norms":
        return torch_path.linear_sq_norms(a, g)
    dots = torch_path.linear_dots(a, g, v.double())
    return dots if case.op == "grad_dots" else torch_path.linear_weighted_sum(a, g, dots)


def rel_error(result: torch.Tensor, ref: torch.Tensor) -> float:
    """‖result − ref‖_F / ‖ref‖_F, in float64."""
    result = result.to(torch.float64).reshape(ref.shape)
    return ((result - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


# ---------------------------------------------------------------------------------------------
# The paths


def _sample_objective(w: torch.Tensor, a_i: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
    """Σ_t g_tᵀ(W a_t) for one sample: its gradient w.r.t. W is G_iᵀA_i."""
    return (g_i * (a_i @ w.T)).sum()


_per_sample_grad = vmap(grad(_sample_objective), in_dims=(None, 0, 0))


def func_chunks(a: torch.Tensor, g: torch.Tensor, chunk: int = FUNC_CHUNK) -> Iterator[torch.Tensor]:
    """torch.func per-sample gradients G_iᵀA_i, flattened, [chunk, d_out·d_in], chunks of 64 samples."""
    w = torch.zeros(g.shape[2], a.shape[2], dtype=a.dtype, device=a.device)
    for s in range(0, a.shape[0], chunk):
        yield _per_sample_grad(w, a[s:s + chunk], g[s:s + chunk]).flatten(1)


def func_dots(a, g, v):
    flat_v = v.flatten(1)
    return torch.cat([gs @ flat_v.T for gs in func_chunks(a, g)]).float()


def func_norms(a, g):
    return torch.cat([torch.linalg.vector_norm(gs, dim=1).float().square() for gs in func_chunks(a, g)])


def func_fisher_vp(a, g, v):
    flat_v = v.flatten(1)
    out = torch.zeros(flat_v.shape, dtype=torch.float32, device=a.device)
    for gs in func_chunks(a, g):
        out += (gs @ flat_v.T).T @ gs  # Σ_i ⟨g_i, V_k⟩ g_i over this chunk
    return out.view(v.shape)


def opacus_norm_fn() -> Callable | None:
    """Opacus' per-layer ghost-clipping norm function for nn.Linear, or None if this opacus has none."""
    try:
        from opacus.grad_sample import linear
    except ImportError:
        return None
    return getattr(linear, "compute_linear_norm_sample", None)


def make_path(case: Case, path: str, a: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None) -> Callable[[], object]:
    """The zero-argument callable of ``path`` on these inputs (its result is checked unless path is gemm)."""
    op = case.op
    if path == "func":
        return {"grad_dots": lambda: func_dots(a, g, v), "grad_norms": lambda: func_norms(a, g),
                "fisher_vp": lambda: func_fisher_vp(a, g, v)}[op]
    if path == "opacus":
        norm_sample = opacus_norm_fn()
        layer = torch.nn.Linear(case.d_in, case.d_out, bias=False, device=a.device, dtype=a.dtype)
        # An MLP's Linear hands Opacus 2-D activations/backprops (its ‖g‖·‖a‖ branch); sequences 3-D (ghost).
        acts, backs = (a[:, 0], g[:, 0]) if case.t == 1 else (a, g)
        return lambda: norm_sample(layer, [acts], backs)[layer.weight].float().square()
    if path in ("torch", "kernels"):
        lib = torch_path if path == "torch" else kernels
        return {"grad_dots": lambda: lib.linear_dots(a, g, v), "grad_norms": lambda: lib.linear_sq_norms(a, g),
                "fisher_vp": lambda: lib.linear_weighted_sum(a, g, lib.linear_dots(a, g, v))}[op]
    if path == "gemm":  # the cuBLAS products of the same size; their outputs are not the result
        if op == "grad_norms":
            return lambda: (torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2)))
        rows = case.b * case.t
        a2, v2 = a.reshape(rows, case.d_in), v.reshape(-1, case.d_in)
        if op == "grad_dots":
            if torch_path.built_dots_cheaper(case.t, case.k):  # the order the kernels take here: build g_i, then dot
                return lambda: torch.bmm(g.transpose(1, 2), a).reshape(case.b, -1) @ v.reshape(case.k, -1).T
            return lambda: a2 @ v2.T  # [B·T, d_in] @ [d_in, K·d_out]
        # fisher_vp: the dots GEMM, then per k (diag(c_k)G)ᵀA, [d_out, B·T] @ [B·T, d_in]; c scaled in beforehand
        c = torch_path.linear_dots(a.double(), g.double(), v.double())  # [B, K]
        scaled = [(g * c[:, k, None, None].to(g.dtype)).reshape(rows, case.d_out) for k in range(case.k)]
        return lambda: (a2 @ v2.T, [s.T @ a2 for s in scaled])
    raise ValueError(f"unknown path {path!r}")


# ---------------------------------------------------------------------------------------------
# Analytic cost of the operation (the same for every path of a group)


def flops(case: Case) -> int:
    """2 × multiply-adds. grad_dots: the factored form Σ_t g_tᵀ(V_k a_t), 2·B·T·K·d_in·d_out, which is
    what the fused kernel and the cuBLAS GEMM do (the per-sample order needs B·(T+K)·d_in·d_out, fewer
    when T·K > T+K: there TFLOP/s is effective, not executed); fisher_vp: dots + weighted sum, twice that;
    grad_norms: T=1 ‖g‖²‖a‖², 2·B·(d_in+d_out); ghost Grams A Aᵀ and G Gᵀ, 2·B·T²·(d_in+d_out)."""
    b, t, d_in, d_out, k = case.b, case.t, case.d_in, case.d_out, case.k
    if case.op == "grad_dots":
        return 2 * b * t * k * d_in * d_out
    if case.op == "fisher_vp":
        return 4 * b * t * k * d_in * d_out
    if t == 1:
        return 2 * b * (d_in + d_out)
    if torch_path.ghost_norms_cheaper(t, d_in, d_out):
        return 2 * b * t * t * (d_in + d_out)
    return 2 * b * t * d_in * d_out + 2 * b * d_in * d_out


def bytes_moved(case: Case) -> int:
    """Minimal traffic: A, G (and V) read once, the float32 result written once."""
    size = torch.empty((), dtype=case.torch_dtype).element_size()
    inputs = case.b * case.t * (case.d_in + case.d_out) * size
    if case.op == "grad_norms":
        return inputs + case.b * 4
    vectors = case.k * case.d_out * case.d_in * size
    out = case.b * case.k * 4 if case.op == "grad_dots" else case.k * case.d_out * case.d_in * 4
    return inputs + vectors + out


def memory_bound_bytes(case: Case) -> int:
    """The issue's per-layer budget for the kernels beyond inputs and output, O(B·(d_in+d_out) + B·T·K), in float32."""
    return 4 * (case.b * (case.d_in + case.d_out) + case.b * case.t * max(case.k, 1))
