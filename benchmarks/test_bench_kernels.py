"""Per-layer kernels (``unlearn_fast.kernels``) against materialising per-sample gradients and against cuBLAS.

Every operation works on one layer's cached factors A [B, T, d_in] and G [B, T, d_out], whose
per-sample weight gradient is g_i = G_iᵀA_i. Each group (one operation, size and dtype) times, in
the same run:

- ``func`` (the peer): torch.func ``vmap(grad)`` of Σ_t g_tᵀ(W a_t) w.r.t. W per sample, which
  materialises g_i [chunk of 64, d_out, d_in], then the same product with V / squared norms /
  weighted sum: the usual way without factored kernels;
- ``opacus`` (norms only): Opacus 1.6's ghost-clipping norm function for nn.Linear,
  ``opacus.grad_sample.linear.compute_linear_norm_sample``, on the same A and G (skipped without opacus);
- ``torch``: the plain factored torch path, ``unlearn_fast.kernels.torch_path``;
- ``kernels``: the public dispatch, ``unlearn_fast.kernels`` (Triton on CUDA, the torch path on CPU);
- ``gemm`` (CUDA only): the cuBLAS products of the same size, ``torch.matmul`` on the same data. For
  grad_dots A.reshape(B·T, d_in) @ V.reshape(K·d_out, d_in)ᵀ, the reference of the issue's target
  (fused dots ≤ 1.3× its time), or, where T·K > T + K and the kernels build g_i instead, the bmm
  building every G_iᵀA_i plus the [B, d_out·d_in] @ [d_out·d_in, K] GEMM; for fisher_vp that GEMM plus (diag(c_k)G)ᵀA, [d_out, B·T] @ [B·T, d_in];
  for ghost norms the bmm's A Aᵀ and G Gᵀ. Their outputs are not the result, so they are not checked.

Operations: grad_dots (K=1, K=8), grad_norms (T=1: row norms; sequences: ghost form), fisher_vp (K=1).
Sizes (kernel_cases.cases): on CUDA an MLP layer (B=256, T=1, 1024→1024) and GPT-2-small's layers
768→768, 768→3072, 3072→768 at T=128 and 512 (B=64), in float32 and bfloat16; on CPU two small
float32 sizes, or with ``KERNEL_BENCH_CPU_SIZES=gpt2`` the three GPT-2 shapes at B=8, T=128. Before
timing, each path's result must match the float64 torch path on the same inputs (relative Frobenius
error ≤ 5e-3 in float32, ≤ 3e-2 in bfloat16), and the kernels path must not have fallen back from
Triton to torch: a fast wrong kernel cannot post a figure.

Timing: the first calls warm up (Triton autotunes each new shape there). The benchmarked callable
synchronises on CUDA, so pytest-benchmark's time is real wall time, launch and Python overhead
included; on CUDA ``triton.testing.do_bench`` (median, L2 flushed) is recorded too, and the table's
``ms`` and its ratios use it there (pytest-benchmark's median on CPU). ``extra_info`` holds the device,
dtype, shapes, analytic flops and minimal bytes (kernel_cases.flops / bytes_moved), TFLOP/s and GB/s,
and on CUDA the peak memory one call allocates beyond what was allocated before it (output included),
with the issue's budget for the kernels, O(B·(d_in+d_out) + B·T·K) beyond inputs and output; on the
CPU the growth of the peak resident set during one call (``benchmarks/peak_rss.py``), measured for
every case and path in one child process before the timing, since the allocator setting it needs
slows timed calls. The
bfloat16 ghost-norm T=512 groups also record the measured bf16 tensor-core peak (an 8192³ matmul)
and the fraction of it each path reaches. After the run one table is printed; with
``KERNEL_BENCH_JSON=path`` it is written there as JSON too. ``KERNEL_BENCH_TF32=1`` lets float32
matmuls (cuBLAS and the Triton dots alike) use TF32.

Run: ``pytest benchmarks/test_bench_kernels.py --benchmark-only`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict

import pytest
import torch

from kernel_cases import (CUDA, OPS, TOLERANCE, Case, bytes_moved, cases, flops, make_inputs, make_path,
                          memory_bound_bytes, opacus_norm_fn, paths_for, reference, rel_error)
from peak_rss import child_json, mmap_large_allocations, peak_rss_growth_mib
from unlearn_fast import kernels

SUITE = "kernels"
JSON_ENV = "KERNEL_BENCH_JSON"
TF32_ENV = "KERNEL_BENCH_TF32"
ROWS: list[dict] = []  # one per benchmark that ran, for the closing table
META: dict = {}


def _params() -> list:
    out = []
    for case in cases():
        for path in paths_for(case):
            marks = [] if CUDA or path != "gemm" else [pytest.mark.skip(reason="the cuBLAS reference is CUDA-only")]
            out.append(pytest.param(case, path, id=f"{case.id}-{path}", marks=marks))
    return out


def _device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# Inputs: one case at a time (consecutive tests share it), with its float64 reference

_current: dict = {}


def _inputs(case: Case):
    if _current.get("case") != case:
        _current.clear()
        if CUDA:
            torch.cuda.empty_cache()
        a, g, v = make_inputs(case)
        _current.update(case=case, data=(a, g, v, reference(case, a, g, v)))
    return _current["data"]


# ---------------------------------------------------------------------------------------------
# CUDA measurements


def _synced(fn):
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _peak_mib(fn) -> float:
    """MiB one call allocates beyond what was allocated before it (its output included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _cpu_peaks() -> dict[str, float | None]:
    """Peak resident-set growth of one call of every CPU case and path, measured in a child process
    (this file run as a script): there glibc is told to mmap large allocations, so that freed ones leave
    the resident set, a setting that would slow the timed calls here (found in review: 20–50 %)."""
    peaks, error = child_json(__file__, "--cpu-peaks")
    if peaks is None:
        META["cpu_peaks_error"] = error
    return peaks or {}


def _cpu_peaks_main() -> None:
    torch.set_num_threads(2)
    if not mmap_large_allocations():
        print(json.dumps({}))
        return
    peaks: dict[str, float | None] = {}
    for case in cases():
        a, g, v = make_inputs(case)
        for path in paths_for(case):
            if path == "gemm" or (path == "opacus" and opacus_norm_fn() is None):
                continue
            fn = make_path(case, path, a, g, v)
            fn()  # warm-up: lazy inits, thread pools
            peaks[f"{case.id}-{path}"] = peak_rss_growth_mib(fn)
    print(json.dumps(peaks))


def _do_bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, return_mode="median"))


def _bf16_peak_tflops() -> float:
    """The bf16 tensor-core rate of this GPU as torch.matmul reaches it: one 8192³ product, measured once."""
    if "bf16_peak_tflops" not in META:
        n = 8192
        x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        META["bf16_peak_tflops"] = 2 * n**3 / (_do_bench_ms(lambda: x @ y) * 1e9)
        del x, y
    return META["bf16_peak_tflops"]


def _plan(ms: float) -> tuple[int, int]:
    """(rounds, iterations) so a round lasts ≥ ~1 ms and a benchmark ~0.2 s at most (5 to 10 rounds)."""
    iterations = max(1, min(100, math.ceil(1.0 / max(ms, 1e-3))))
    rounds = int(min(10, max(5, 200 // (ms * iterations))))
    return rounds, iterations


@pytest.fixture(scope="module", autouse=True)
def _setup(request):
    if not CUDA:
        torch.set_num_threads(2)
        META["cpu_peaks"] = _cpu_peaks()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or os.environ.get(TF32_ENV) == "1"
    META.update(device=_device_name(), torch=torch.__version__, tf32=torch.backends.cuda.matmul.allow_tf32)
    manager = request.config.pluginmanager
    if not manager.has_plugin("kernel-bench-table"):
        manager.register(_Table(), "kernel-bench-table")
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    _current.clear()


# ---------------------------------------------------------------------------------------------
# The benchmark


@pytest.mark.parametrize(("case", "path"), _params())
def test_kernel(benchmark, case: Case, path: str):
    if path == "opacus":
        pytest.importorskip("opacus")
        if opacus_norm_fn() is None:
            pytest.skip("this opacus has no opacus.grad_sample.linear.compute_linear_norm_sample")
    a, g, v, ref = _inputs(case)
    fn = make_path(case, path, a, g, v)
    run = _synced(fn)
    benchmark.group = case.group
    info = benchmark.extra_info
    info.update(suite=SUITE, path=path, peer=path == "func", device=META["device"], dtype=case.dtype,
                tf32=META["tf32"], backend=kernels.select_backend(a.device) if path == "kernels" else path,
                shapes={"A": list(a.shape), "G": list(g.shape), "V": list(v.shape) if v is not None else None},
                flops=flops(case), bytes=bytes_moved(case))

    result = run()  # first call: Triton autotunes each new shape here
    if path != "gemm":
        info["rel_error"] = error = rel_error(result, ref)
        assert error <= TOLERANCE[case.dtype], f"{path} is wrong on {case.label}: relative error {error:.3g}"
        info["output_mib"] = result.numel() * result.element_size() / 2**20
    if path == "kernels":
        failed = {op: why for op, why in getattr(kernels, "_failed", {}).items() if op in OPS[case.op]}
        assert not failed, f"the Triton kernels fell back to torch: {failed}"
    del result
    start = time.perf_counter()
    run()
    warm_ms = (time.perf_counter() - start) * 1e3

    info["peak_mib"] = _peak_mib(fn) if CUDA else META["cpu_peaks"].get(f"{case.id}-{path}")
    if path == "kernels":
        info["budget_mib"] = memory_bound_bytes(case) / 2**20
    if CUDA:
        info["do_bench_ms"] = _do_bench_ms(fn)
        rounds, iterations = _plan(info["do_bench_ms"])
    else:
        rounds, iterations = _plan(warm_ms)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    info["wall_ms"] = stats.stats.median * 1e3 if stats is not None else None
    ms = info.get("do_bench_ms") or info["wall_ms"]
    if ms:
        info["tflops"] = info["flops"] / (ms * 1e9)
        info["gbps"] = info["bytes"] / (ms * 1e6)
        if CUDA and case.op == "grad_norms" and case.t == 512 and case.dtype == "bfloat16":
            info["bf16_peak_tflops"] = _bf16_peak_tflops()
            info["fraction_of_bf16_peak"] = info["tflops"] / info["bf16_peak_tflops"]
    ROWS.append({"group": case.group, "case": case.label, "path": path, "ms": ms,
                 **{key: info.get(key) for key in ("wall_ms", "do_bench_ms", "tflops", "gbps", "peak_mib",
                                                   "budget_mib", "rel_error", "fraction_of_bf16_peak")}})


# ---------------------------------------------------------------------------------------------
# The closing table (printed in the terminal summary; JSON to $KERNEL_BENCH_JSON)


def table_rows(rows: list[dict]) -> list[dict]:
    """Each row with its group's peer (func) and GEMM times and the ratios to them."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    out = []
    for items in groups.values():
        peer = next((r["ms"] for r in items if r["path"] == "func"), None)
        gemm = next((r["ms"] for r in items if r["path"] == "gemm"), None)
        for row in items:
            ms = row["ms"]
            out.append({**row, "peer_ms": peer, "ratio": ms / peer if ms and peer else None,
                        "gemm_ms": gemm, "over_gemm": ms / gemm if ms and gemm else None})
    return out


def _fmt(value, width: int, spec: str) -> str:
    return f"{'-':>{width}s}" if value is None else format(value, f"{width}{spec}")


def format_table(rows: list[dict]) -> list[str]:
    head = (f"{'case':40s} {'path':8s} {'ms':>9s} {'wall ms':>9s} {'peer ms':>9s} {'ratio':>7s} "
            f"{'GEMM ms':>9s} {'/GEMM':>6s} {'TFLOP/s':>8s} {'GB/s':>8s} {'peak MiB':>9s} {'budget':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:40s} {r['path']:8s} {_fmt(r['ms'], 9, '.3f')} {_fmt(r['wall_ms'], 9, '.3f')} "
                     f"{_fmt(r['peer_ms'], 9, '.3f')} {_fmt(r['ratio'], 7, '.3f')} {_fmt(r['gemm_ms'], 9, '.3f')} "
                     f"{_fmt(r['over_gemm'], 6, '.2f')} {_fmt(r['tflops'], 8, '.3g')} {_fmt(r['gbps'], 8, '.1f')} "
                     f"{_fmt(r['peak_mib'], 9, '.1f')} {_fmt(r['budget_mib'], 7, '.2f')}")
    return lines


class _Table:
    """Registered by the module fixture, so only a run that includes this file prints the table."""

    def pytest_terminal_summary(self, terminalreporter, config):  # noqa: ANN001, ANN201
        if not ROWS:
            return
        rows = table_rows(ROWS)
        where = "do_bench median (CUDA)" if CUDA else "pytest-benchmark median"
        terminalreporter.section(f"per-layer kernels on {META.get('device')}: ms = {where}; "
                                 f"ratio = ms / torch.func peer ms; /GEMM = ms / cuBLAS ms")
        if "bf16_peak_tflops" in META:
            terminalreporter.write_line(f"bf16 matmul peak measured: {META['bf16_peak_tflops']:.0f} TFLOP/s")
        for line in format_table(rows):
            terminalreporter.write_line(line)
        target = os.environ.get(JSON_ENV)
        if target:
            with open(target, "w") as f:
                json.dump({"meta": META, "rows": rows}, f, indent=1)
            terminalreporter.write_line(f"table written to {target}")


if __name__ == "__main__":  # the CPU peak-memory child: python test_bench_kernels.py --cpu-peaks
    _cpu_peaks_main()
