"""Per-sample gradient dot products ⟨∇ℓ_i, v_k⟩: ``grad_dots`` against torch.func (peer).

Two groups, each timed in one run against its peer:

- MLP 1024-1024-10, B=256, K=8: ``grad_dots``; the peer, torch.func ``vmap(grad)`` materialising
  the per-sample gradients in chunks of 64 samples and then one GEMM with the K vectors (the usual
  way); Opacus ``GradSampleModule`` per-sample gradients then the same GEMM (skipped when opacus is
  not installed); and the floor, one plain forward+backward of the batch plus one GEMM per Linear
  of the size of the dot contraction ([B·T, d_in] @ [d_in, K·d_out]).
- sequences, Linear(768, 768) over [B, T=128, 768], mean-pool, Linear(768, 10); B=8, K=4:
  ``grad_dots`` against the same torch.func peer (and Opacus when installed), and two measured lower
  bounds that make the peer's headroom visible. "seq bound: forward + G" is the least any exact
  method must run: the forward of the batch and the output gradient G of the 768→768 layer (G_t
  depends on that layer's pre-activations, so its GEMM cannot be skipped), without any weight
  gradient. "seq floor: + build g_i" adds the cheapest exact contraction we know for dense
  vectors, one bmm G_iᵀA_i per sample (B·T·d_in·d_out multiply-adds, the forward's own size;
  contracting A Vᵀ instead costs K times that). peer / bound is the largest speed-up any exact
  method can show over torch.func at this shape.

Memory: tracemalloc does not see torch's CPU allocations, so each entry records in ``extra_info``
(a) ``peak_rss_growth_mib``: the growth of the peak resident set while the path runs once on
the full batch, measured in a fresh subprocess (this file run as a script) after the setup and a
1-sample warm-up: the peak (VmHWM) is reset through /proc/self/clear_refs and read back from
/proc/self/status, minus the resident set before the run (``ru_maxrss`` is no use here: after
fork+exec it keeps the parent's peak, i.e. pytest's). Large intermediates are mmap'ed by glibc and
returned when freed, so this tracks them to within a few MiB; and (b) ``largest_intermediate_elements``: the analytic element count of the
largest intermediate the method needs by design (what the implementation actually allocates is
what (a) measures).
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from func_peer import FUNC_CHUNK, func_per_sample_chunks
from peak_rss import child_json, mmap_large_allocations, peak_rss_growth_mib

from unlearn_fast.influence.per_sample import grad_dots
from unlearn_fast.kernels.cpu_gemm import matmul_nt

MLP_GROUP = "grad_dots MLP 1024-1024-10 B=256 K=8"
SEQ_GROUP = "grad_dots sequences T=128 d=768 B=8 K=4"
MLP_ROUNDS = 5
SEQ_ROUNDS = 5


# ---------------------------------------------------------------------------------------------
# Setups (module-level functions: the fixtures and the peak-memory subprocess build the same ones)


class SeqModel(nn.Module):
    """Linear(768, 768) applied per position of [B, T, 768], ReLU, mean over T, Linear(768, 10)."""

    def __init__(self, d: int = 768, classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)).mean(1))


def _vectors(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    return {n: torch.randn(k, *p.shape) for n, p in model.named_parameters()}


def mlp_setup(batch_size: int = 256, k: int = 8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x, y = torch.randn(256, 1024)[:batch_size], torch.randint(0, 10, (256,))[:batch_size]
    return model, (x, y), _vectors(model, k)


def seq_setup(batch_size: int = 8, k: int = 4):
    torch.manual_seed(0)
    model = SeqModel()
    x, y = torch.randn(8, 128, 768)[:batch_size], torch.randint(0, 10, (8,))[:batch_size]
    return model, (x, y), _vectors(model, k)


SETUP_FNS = {MLP_GROUP: mlp_setup, SEQ_GROUP: seq_setup}


# ---------------------------------------------------------------------------------------------
# The paths compared


def ours_dots(model, batch, vectors):
    return grad_dots(model, "cross_entropy", batch, vectors)


def func_dots(model, batch, vectors, chunk: int = FUNC_CHUNK):
    """torch.func: vmap(grad) per-sample gradients [chunk, *shape] per parameter, then dots."""
    flat_v = {n: v.reshape(v.shape[0], -1) for n, v in vectors.items()}
    parts = [sum(g[n].reshape(g[n].shape[0], -1) @ flat_v[n].T for n in g)
             for g in func_per_sample_chunks(model, batch, chunk)]
    return torch.cat(parts)


def make_opacus(model):
    """Opacus GradSampleModule around a copy of ``model`` (it adds hooks to the module it wraps)."""
    import copy

    from opacus import GradSampleModule

    return GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")


def opacus_dots(gsm, batch, vectors):
    x, y = batch
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    with torch.no_grad():
        total = sum(p.grad_sample.reshape(x.shape[0], -1) @ vectors[n].reshape(vectors[n].shape[0], -1).T
                    for n, p in gsm._module.named_parameters())
    gsm.zero_grad(set_to_none=True)  # drops p.grad and p.grad_sample
    return total


def floor_dots(model, batch, vectors):
    """The floor: one forward+backward of Σℓ_i w.r.t. the parameters, plus per Linear one GEMM
    [B·T, d_in] @ [d_in, K·d_out] (the size of the factored dot contraction), through the same CPU
    GEMM routine as ours (``kernels.cpu_gemm.matmul_nt``: oneDNN where it is faster than MKL)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
               for name, m in linears]
    try:
        x, y = batch
        losses = F.cross_entropy(model(x), y, reduction="none")
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
    gemms = []
    for name, m in linears:
        d_in = m.in_features
        gemms.append(matmul_nt(inputs[name].reshape(-1, d_in), vectors[f"{name}.weight"].reshape(-1, d_in)))
    return grads, gemms


def _seq_output_gradient(model: SeqModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the batch and ∂Σℓ_i/∂(proj's output) → (A [B, T, d_in], G [B, T, d_out]). The
    768→768 GEMM goes through ``matmul_nt`` (oneDNN where it beats MKL), the fastest this machine has."""
    x, y = batch
    with torch.no_grad():
        z = matmul_nt(x.reshape(-1, x.shape[-1]), model.proj.weight.detach()).add_(model.proj.bias).view(*x.shape[:2], -1)
    z.requires_grad_(True)
    losses = F.cross_entropy(model.head(torch.relu(z).mean(1)), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), z)
    return x, g


def seq_bound(model, batch, vectors):
    """The least any exact method runs: forward + the 768→768 layer's output gradient (see the docstring)."""
    return _seq_output_gradient(model, batch)[1]


def seq_floor(model, batch, vectors):
    """The bound plus building every g_i = G_iᵀA_i (one bmm) and its K dots with the vectors."""
    a, g = _seq_output_gradient(model, batch)
    built = torch.bmm(g.transpose(1, 2), a)  # [B, d_out, d_in]
    return built.reshape(a.shape[0], -1) @ vectors["proj.weight"].reshape(vectors["proj.weight"].shape[0], -1).T


SEQ_BOUNDS = {"bound": seq_bound, "floor": seq_floor}


# ---------------------------------------------------------------------------------------------
# Memory: analytic largest intermediates and the measured peak-RSS growth (in a subprocess)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def largest_intermediate(path: str, model: nn.Module, batch, k: int) -> int:
    """Elements of the largest intermediate each method needs by design (see the module docstring)."""
    b = batch[0].shape[0]
    t = batch[0][0].numel() // batch[0].shape[-1]  # positions per sample (1 for the MLP)
    p_total = sum(p.numel() for p in model.parameters())
    if path == "ours":  # per Linear: (A Vᵀ) [B, K, T, d_out], never [B, P]
        return max(b * k * t * m.out_features for m in _linears(model))
    if path == "func":  # per-sample gradients of one chunk: [chunk, P]
        return min(b, FUNC_CHUNK) * p_total
    if path == "opacus":  # every grad_sample at once: [B, P]
        return b * p_total
    if path == "seq_bound":  # G [B, T, d_out]
        return b * t * model.proj.out_features
    if path == "seq_floor":  # the built gradients [B, d_out, d_in]
        return b * model.proj.weight.numel()
    if path == "floor":  # the GEMM output [B·T, K·d_out] or the weight gradient, whichever is larger
        return max(max(b * t * k * m.out_features, m.weight.numel()) for m in _linears(model))
    raise ValueError(path)


def _run_path(path: str, model, batch, vectors):
    if path == "ours":
        return ours_dots(model, batch, vectors)
    if path == "func":
        return func_dots(model, batch, vectors)
    if path == "floor":
        return floor_dots(model, batch, vectors)
    if path == "opacus":
        return opacus_dots(make_opacus(model), batch, vectors)
    if path.startswith("seq_"):
        return SEQ_BOUNDS[path.removeprefix("seq_")](model, batch, vectors)
    raise ValueError(path)


def _peak_rss_main(group: str, path: str) -> None:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, harmless
    torch.set_num_threads(2)
    model, batch, vectors = SETUP_FNS[group]()
    _run_path(path, model, (batch[0][:1], batch[1][:1]), vectors)  # warm-up: lazy inits, thread pools
    mmap_large_allocations()  # freed intermediates leave the resident set (this child is not timed)
    growth = peak_rss_growth_mib(lambda: _run_path(path, model, batch, vectors))
    print(json.dumps({"peak_rss_growth_mib": None if growth is None else round(growth, 1)}))


def record_memory(benchmark, group: str, path: str, model, batch, vectors) -> None:
    benchmark.extra_info["largest_intermediate_elements"] = largest_intermediate(path, model, batch, next(iter(vectors.values())).shape[0])
    measured, error = child_json(__file__, group, path, timeout=600)
    if measured is not None:
        benchmark.extra_info.update(measured)
    else:
        benchmark.extra_info["peak_rss_growth_mib"] = None
        benchmark.extra_info["peak_rss_error"] = error


def _assert_matches(result: torch.Tensor, reference: torch.Tensor) -> None:
    # Sums over ~10⁶ float32 products: relative tolerance against the largest entry.
    scale = reference.abs().max().item()
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def mlp():
    model, batch, vectors = mlp_setup()
    return model, batch, vectors, func_dots(model, batch, vectors)


@pytest.fixture(scope="module")
def seq():
    model, batch, vectors = seq_setup()
    return model, batch, vectors, func_dots(model, batch, vectors)


def _pedantic(benchmark, fn, args, rounds):
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# Both groups (MLP, sequences): ours, the torch.func peer and Opacus; the floor for the MLP, the bounds for sequences.
SETUPS = {"mlp": (MLP_GROUP, MLP_ROUNDS), "seq": (SEQ_GROUP, SEQ_ROUNDS)}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_grad_dots(benchmark, request, setup):
    model, batch, vectors, reference = request.getfixturevalue(setup)
    group, rounds = SETUPS[setup]
    benchmark.group = group
    result = _pedantic(benchmark, ours_dots, (model, batch, vectors), rounds)
    record_memory(benchmark, group, "ours", model, batch, vectors)
    _assert_matches(result, reference)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_func_peer(benchmark, request, setup):
    model, batch, vectors, _ = request.getfixturevalue(setup)
    group, rounds = SETUPS[setup]
    benchmark.group = group
    benchmark.extra_info["peer"] = True
    _pedantic(benchmark, func_dots, (model, batch, vectors), rounds)
    record_memory(benchmark, group, "func", model, batch, vectors)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("setup", list(SETUPS))
def test_opacus(benchmark, request, setup):
    pytest.importorskip("opacus")
    model, batch, vectors, reference = request.getfixturevalue(setup)
    group, rounds = SETUPS[setup]
    benchmark.group = group
    gsm = make_opacus(model)
    result = _pedantic(benchmark, opacus_dots, (gsm, batch, vectors), rounds)
    record_memory(benchmark, group, "opacus", model, batch, vectors)
    _assert_matches(result, reference)


def test_mlp_floor(benchmark, mlp):
    model, batch, vectors, _ = mlp
    benchmark.group = MLP_GROUP
    _pedantic(benchmark, floor_dots, (model, batch, vectors), MLP_ROUNDS)
    record_memory(benchmark, MLP_GROUP, "floor", model, batch, vectors)


@pytest.mark.parametrize("bound", list(SEQ_BOUNDS))
def test_seq_bounds(benchmark, seq, bound):
    model, batch, vectors, reference = seq
    benchmark.group = SEQ_GROUP
    result = _pedantic(benchmark, SEQ_BOUNDS[bound], (model, batch, vectors), SEQ_ROUNDS)
    record_memory(benchmark, SEQ_GROUP, f"seq_{bound}", model, batch, vectors)
    if bound == "floor":  # the floor's dots are the proj weight's share of the real ones: check them
        v = vectors["proj.weight"].reshape(vectors["proj.weight"].shape[0], -1)
        share = torch.cat([g["proj.weight"].reshape(g["proj.weight"].shape[0], -1) @ v.T
                           for g in func_per_sample_chunks(model, batch)])
        _assert_matches(result, share)

if __name__ == "__main__":  # peak-memory probe: python test_bench_grad_dots.py GROUP PATH
    _peak_rss_main(sys.argv[1], sys.argv[2])
