"""Kernel variants on a GPU, in one run: each Triton kernel and variant against the cuBLAS GEMMs of the
same products, then torch.func materialisation and peak memory for the default variant.

Run on a CUDA machine: ``python benchmarks/kernel_variants.py OUT.json``. Times are do_bench medians
(ms); "gemm" is the cuBLAS product of the same arithmetic in the factored order (dots: A·V_kᵀ for all
k; weighted sum: Gᵀ·A per k; ghost norms: the bmm's A·Aᵀ and G·Gᵀ); "built" dots (T·K > T + K) are
compared with the bmm building G_iᵀA_i plus the [B, d²]·[d², K] GEMM. Every variant's result is checked
against the float64 torch path (relerr column). Variants (kernels/triton_path.py LAYOUT): "new" reads
transposed operand tiles in stored order and transposes in registers, launches dots d_out-blocks
first, and multiplies float32 as tf32x3; "old" uses transposed pointers, row-blocks first, IEEE FMA;
both time the fused weighted sum. "scal" is the weighted sum's scaled_gemm route (c_k times the
narrower factor in one Triton pass, then a cuBLAS GEMM with float32 output), the current default.
"""
import sys, json, torch, triton
from triton.testing import do_bench
from torch.func import grad, vmap
from unlearn_fast.kernels import triton_path as tr, torch_path as tp
dev = "cuda"
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
def ms(fn): return do_bench(fn, warmup=25, rep=100, return_mode="median")
def rel(x, y): return ((x.double()-y.double()).norm()/y.double().norm()).item()
def _peak_tflops() -> float:
    """Same-run bf16 matmul rate (8192³) in TFLOP/s: the ceiling the kernels are compared with."""
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2*8192**3/ms(lambda: x @ x)/1e9


peak = _peak_tflops()
print(f"bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
CASES = [(256, 1, 1024, 1024, 8), (64, 128, 768, 768, 1), (64, 512, 768, 3072, 1), (32, 512, 3072, 768, 4)]
if len(sys.argv) > 2 and sys.argv[2] == "--quick":
    CASES = CASES[2:4]
TRANS = ("dots_trans", "ghost_trans", "built_trans", "wsum_trans")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED = dict.fromkeys(DTYPES, "fused")
VARIANTS = {"new": {**{f: dict.fromkeys(DTYPES, True) for f in TRANS}, "dots_q_major": True, "fp32": "tf32x3", "wsum_route": FUSED},
            "old": {**{f: dict.fromkeys(DTYPES, False) for f in TRANS}, "dots_q_major": False, "fp32": "ieee", "wsum_route": FUSED}}
DEFAULTS = {key: (dict(value) if isinstance(value, dict) else value) for key, value in tr.LAYOUT.items()}
F32_OUT = tr.float32_output_mode(torch.device(dev))  # None: 16-bit "scal" rows below fall back to the fused kernel
print("16-bit GEMMs with float32 output:", F32_OUT, flush=True)
rows = []
def emit(*r):
    rows.append(r); print(r, flush=True)
for dtype in (torch.bfloat16, torch.float32):
    for (b, t, din, dout, k) in CASES:
        a = torch.randn(b, t, din, device=dev, dtype=dtype); g = torch.randn(b, t, dout, device=dev, dtype=dtype)
        v = torch.randn(k, dout, din, device=dev, dtype=dtype); c = torch.randn(b, k, device=dev)
        a2 = a.reshape(b*t, din); v2 = v.reshape(k*dout, din); gt = g.reshape(b*t, dout).T.contiguous()
        if tp.built_dots_cheaper(t, k):  # the built order: bmm for every G_iᵀA_i, then one GEMM with the K vectors
            gemm_dots = ms(lambda: torch.bmm(g.transpose(1, 2), a).reshape(b, -1) @ v.reshape(k, -1).T)
        else:
            gemm_dots = ms(lambda: a2 @ v2.T)
        gemm_wsum = ms(lambda: [gt @ a2 for _ in range(k)])
        gemm_ghost = ms(lambda: (torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))))
        ref_d = tp.linear_dots(a.double(), g.double(), v.double()); ref_w = tp.linear_weighted_sum(a.double(), g.double(), c.double())
        ref_n = tp.linear_sq_norms(a.double(), g.double())
        fl = 2*b*t*din*dout*k
        for name, lay in VARIANTS.items():
            tr.LAYOUT.update(lay)
            emit("dots", name, str(dtype)[6:], b, t, din, dout, k, ms(lambda: tr.linear_dots(a, g, v)), gemm_dots, fl, rel(tr.linear_dots(a, g, v), ref_d))
            emit("wsum", name, str(dtype)[6:], b, t, din, dout, k, ms(lambda: tr.linear_weighted_sum(a, g, c)), gemm_wsum, fl, rel(tr.linear_weighted_sum(a, g, c), ref_w))
            if t > 1:
                emit("ghost", name, str(dtype)[6:], b, t, din, dout, 1, ms(lambda: tr.linear_sq_norms(a, g)), gemm_ghost, 2*b*t*t*(din+dout), rel(tr.linear_sq_norms(a, g), ref_n))
        # The scaled route (LAYOUT["wsum_route"]): c_k times the narrower factor, then cuBLAS with float32 output.
        tr.LAYOUT.update(DEFAULTS)
        tr.LAYOUT["wsum_route"] = dict.fromkeys(DTYPES, "scaled_gemm")
        emit("wsum", "scal" if dtype == torch.float32 or F32_OUT else "scal->fused", str(dtype)[6:], b, t, din, dout, k, ms(lambda: tr.linear_weighted_sum(a, g, c)), gemm_wsum, fl,
             rel(tr.linear_weighted_sum(a, g, c), ref_w))
        torch.cuda.empty_cache()
# torch.func materialisation (vmap(grad) of one layer, then the dot with V) against the kernel, fp32, with peak memory.
tr.LAYOUT.update(DEFAULTS)
def mem(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize(); return (torch.cuda.max_memory_allocated() - base) / 2**20
for (b, t, din, dout, k) in [(16, 128, 768, 768, 1), (16, 512, 768, 3072, 4)]:
    a = torch.randn(b, t, din, device=dev); g = torch.randn(b, t, dout, device=dev); v = torch.randn(k, dout, din, device=dev)
    def sample_loss(w, ai, gi): return (gi * (ai @ w.T)).sum()
    w0 = torch.zeros(dout, din, device=dev)
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    func = lambda: per_sample(w0, a, g).reshape(b, -1) @ v.reshape(k, -1).T
    ours = lambda: tr.linear_dots(a, g, v)
    err = rel(ours(), func())
    t_f, t_o = ms(func), ms(ours)
    print(f"torch.func dots B={b} T={t} {din}x{dout} K={k}: func {t_f:.3f} ms, ours {t_o:.3f} ms, ratio {t_f/t_o:.1f}x, "
          f"peak MiB func {mem(func):.0f} ours {mem(ours):.1f}, relerr {err:.1e}", flush=True)
    norms_f = lambda: per_sample(w0, a, g).pow(2).sum((1, 2))
    norms_o = lambda: tr.linear_sq_norms(a, g)
    print(f"torch.func norms B={b} T={t} {din}x{dout}: func {ms(norms_f):.3f} ms, ours {ms(norms_o):.3f} ms, "
          f"peak MiB func {mem(norms_f):.0f} ours {mem(norms_o):.1f}, relerr {rel(norms_o(), norms_f()):.1e}", flush=True)
print(f"\n{'op':6} {'var':4} {'dtype':8} {'B':>4} {'T':>4} {'din':>5} {'dout':>5} {'K':>2} {'ours ms':>8} {'gemm ms':>8} {'o/gemm':>6} {'TF/s':>6} {'relerr':>8}")
for r in rows:
    print(f"{r[0]:6} {r[1]:4} {r[2]:8} {r[3]:4} {r[4]:4} {r[5]:5} {r[6]:5} {r[7]:2} {r[8]:8.3f} {r[9]:8.3f} {r[8]/r[9]:6.2f} {r[10]/r[8]/1e9:6.0f} {r[11]:8.1e}")
json.dump({"peak_bf16_tflops": peak, "rows": rows}, open(sys.argv[1], "w"))
