"""The Triton kernels against the float64 torch path (the dispatch in front of them: test_kernel_dispatch.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest.py before anything imports them), so CI exercises the kernels' own code. With a GPU the
same tests run them compiled, on CUDA tensors. Tolerances are relative Frobenius errors against a
float64 evaluation of the same (rounded) inputs: float32 products are IEEE in the interpreter and
tf32x3 (float32-level error) compiled, unless torch enables TF32; half inputs are multiplied exactly
and summed in float32, so dots, norms and cross dots keep float32-level error in every dtype; only
the weighted sum rounds c·g to the input dtype before its product (bfloat16: 2⁻⁸ per element).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unlearn_fast.kernels as kernels
from helpers import layer_factors, rel_error
from unlearn_fast.kernels import torch_path

triton = pytest.importorskip("triton", reason="the Triton kernel tests need the triton package")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here", allow_module_level=True)

from unlearn_fast.kernels import triton_path  # noqa: E402  (after the interpreter choice)

# Compiled, every new shape costs a Triton compile of a few seconds; the interpreter costs milliseconds.
EXAMPLES = 25 if DEVICE == "cpu" else 6
EXACT = 2e-5  # dots, norms and cross dots, any dtype: exact half products summed in float32
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # the weighted sum
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def _no_silent_fallback(monkeypatch):
    """A Triton failure inside the dispatch would fall back to torch with a warning; here it fails the test."""
    monkeypatch.setattr(kernels, "_failed", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="unlearn_fast.kernels", category=RuntimeWarning)
        yield


def factors(b, t, d_in, d_out, dtype, seed):
    return layer_factors(b, t, d_in, d_out, dtype, seed, DEVICE)


def make_mask(kind, b, t, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    mask = torch.rand(b, t, generator=gen) > 0.3
    return (mask if kind == "bool" else mask * torch.rand(b, t, generator=gen)).to(DEVICE)


def ref(op, *args):
    """The torch path in float64 on the same (already rounded) values."""
    up = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    return getattr(torch_path, op)(*up)


def ref_error(got: torch.Tensor, op: str, *args) -> float:
    """max over entries of |got − ref| relative to that entry of ``op`` on the inputs' magnitudes: the
    sum of |products| that float rounding scales with. Relative to ‖ref‖, a sum that cancels to ~1e-4 of
    its terms (hypothesis found one, b=1 t=2 d_in=1 d_out=2) fails on rounding no float32 product can
    avoid; per entry, a kernel that corrupts only the small entries of a result still fails."""
    magnitudes = [x.abs() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    scale = ref(op, *magnitudes).double()
    assert torch.isfinite(got).all(), "a kernel produced non-finite values from finite inputs"
    error = (got.double() - ref(op, *args).double()).abs()
    return (error / scale.clamp_min(1e-30)).max().item() if error.numel() else 0.0


def _float32_gemm_into(out, x, y, accumulate):
    out.add_(x.float() @ y.float()) if accumulate else out.copy_(x.float() @ y.float())


@contextmanager
def weighted_sum_route(route: str):
    """LAYOUT's weighted-sum route for every dtype. The CPU interpreter's torch.mm has no float32 output
    for 16-bit inputs, so there the scaled route's cuBLAS product is stood in for by a float32 product
    of the same 16-bit operands: what runs is the route's own scaling kernel, layout and chunking."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(triton_path.LAYOUT, "wsum_route", dict.fromkeys(DTYPES, route))
        if DEVICE == "cpu":
            patch.setitem(triton_path._FLOAT32_OUTPUT, "cpu", "out")
            patch.setattr(triton_path, "_gemm_into", _float32_gemm_into)
        yield


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40), st.integers(1, 40),
                   st.integers(1, 3), st.sampled_from(DTYPES), st.sampled_from(["none", "bool", "float"]),
                   st.integers(0, 2**16))


@settings(max_examples=EXAMPLES, deadline=None)
@given(shapes)
def test_dots_norms_and_weighted_sums_match_the_reference(case):
    b, t, d_in, d_out, k, dtype, mask_kind, seed = case
    a, g = factors(b, t, d_in, d_out, dtype, seed)
    mask = make_mask(mask_kind, b, t, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    v = torch.randn(k, d_out, d_in, generator=gen).to(dtype).to(DEVICE)
    c = torch.randn(b, k, generator=gen).to(DEVICE)
    # Fractional mask weights scale G's tiles before the product, where the tensor-core operands are
    # rounded back to the input dtype; 0/1 masks and float32 stay exact.
    exact = EXACT if mask_kind != "float" or dtype == torch.float32 else TOLERANCE[dtype]
    assert ref_error(triton_path.linear_dots(a, g, v, mask), "linear_dots", a, g, v, mask) < exact
    assert ref_error(triton_path.linear_sq_norms(a, g, mask), "linear_sq_norms", a, g, mask) < exact
    got = triton_path.linear_weighted_sum(a, g, c, mask)
    assert ref_error(got, "linear_weighted_sum", a, g, c, mask) < TOLERANCE[dtype]


@pytest.mark.parametrize("route", triton_path.WSUM_ROUTES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(shapes, st.booleans())
def test_weighted_sum_routes_match_the_reference(route, case, small_chunks):
    b, t, d_in, d_out, k, dtype, mask_kind, seed = case
    a, g = factors(b, t, d_in, d_out, dtype, seed)
    mask = make_mask(mask_kind, b, t, seed)
    c = torch.randn(b, k, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    with weighted_sum_route(route), pytest.MonkeyPatch.context() as patch:
        if small_chunks:  # rows in blocks of 1–3: the row loop, its offsets and the accumulation into out
            patch.setattr(triton_path, "SCALED_CHUNK_BYTES", 3 * min(d_in, d_out) * a.element_size())
        got = triton_path.linear_weighted_sum(a, g, c, mask)
    assert got.dtype == torch.float32
    assert ref_error(got, "linear_weighted_sum", a, g, c, mask) < TOLERANCE[dtype]


def test_float32_output_probe_picks_what_runs(monkeypatch):
    """"out" where mm/addmm write float32 in place, "copy" where only mm(out_dtype=) runs, None where
    neither does (the CPU build: the fused kernel then serves 16-bit inputs)."""
    calls = []
    monkeypatch.setattr(triton_path, "_FLOAT32_OUTPUT", {})
    real_mm = torch.mm

    def mm_without_out(x, y, out_dtype=None, out=None):
        calls.append("mm")
        if out is not None:
            raise RuntimeError("no dtype_out here")
        return real_mm(x.float(), y.float()) if out_dtype is not None else real_mm(x, y)
    monkeypatch.setattr(torch, "mm", mm_without_out)
    assert triton_path.float32_output_mode(torch.device("cpu")) == "copy" and calls
    monkeypatch.setattr(torch, "mm", real_mm)
    triton_path._FLOAT32_OUTPUT.clear()
    mode = triton_path.float32_output_mode(torch.device("cpu"))
    try:  # the probe must agree with what this build's CPU mm really does
        torch.mm(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bfloat16), out_dtype=torch.float32)
        assert mode in ("out", "copy")
    except (TypeError, RuntimeError, NotImplementedError):
        assert mode is None


def test_an_unknown_weighted_sum_route_is_refused(monkeypatch):
    a, g = factors(2, 3, 4, 5, torch.float32, 0)
    monkeypatch.setitem(triton_path.LAYOUT, "wsum_route", dict.fromkeys(DTYPES, "cublas"))
    with pytest.raises(ValueError, match=r"'cublas' is not valid; valid choices: fused, scaled_gemm"):
        triton_path.linear_weighted_sum(a, g, torch.ones(2, 1, device=DEVICE))


@settings(max_examples=EXAMPLES * 3 // 5, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 24),
       st.integers(1, 24), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**16))
def test_cross_dots_match_the_reference(b1, b2, t1, t2, d_in, d_out, dtype, masked, seed):
    a1, g1 = factors(b1, t1, d_in, d_out, dtype, seed)
    a2, g2 = factors(b2, t2, d_in, d_out, dtype, seed + 7)
    m1 = make_mask("bool", b1, t1, seed) if masked else None
    m2 = make_mask("float", b2, t2, seed) if masked else None
    got = triton_path.linear_cross_dots(a1, g1, a2, g2, m1, m2)
    assert ref_error(got, "linear_cross_dots", a1, g1, a2, g2, m1, m2) < EXACT  # masks weight the Grams in float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_dots_ghost_kernel_on_longer_sequences(dtype):
    """T1·T2 ≥ 256 reaches the ghost kernel (shorter pairs take two GEMMs): several T×T tiles, odd sizes."""
    a1, g1 = factors(2, 17, 13, 9, dtype, 1)
    a2, g2 = factors(3, 21, 13, 9, dtype, 2)
    m1, m2 = make_mask("bool", 2, 17, 1), make_mask("float", 3, 21, 2)
    for masks in ((None, None), (m1, m2)):
        got = triton_path.linear_cross_dots(a1, g1, a2, g2, *masks)
        assert ref_error(got, "linear_cross_dots", a1, g1, a2, g2, *masks) < EXACT


@pytest.mark.parametrize("t, d_in, d_out", [(1, 33, 17), (20, 70, 3), (3, 70, 50), (37, 60, 64), (40, 5, 6)])
def test_each_norm_branch(t, d_in, d_out):
    """T = 1 row norms, the ghost form (2T² < d_in·d_out; T = 37 spans several T×T tiles, off-diagonal
    ones counted twice) and built tiles (2T² ≥ d_in·d_out), odd sizes."""
    a, g = factors(3, t, d_in, d_out, torch.float32, 0)
    mask = make_mask("float", 3, t, 0)
    assert rel_error(triton_path.linear_sq_norms(a, g, mask), ref("linear_sq_norms", a, g, mask)) < 1e-5
    per_sample = torch.einsum("bto,bti->boi", (g * mask.unsqueeze(-1)).double(), a.double())
    assert rel_error(triton_path.linear_sq_norms(a, g, mask), per_sample.pow(2).sum((1, 2))) < 1e-5


def test_dots_against_materialised_per_sample_gradients():
    a, g = factors(4, 5, 19, 23, torch.float32, 3)
    v = torch.randn(3, 23, 19, device=DEVICE)
    per_sample = torch.einsum("bto,bti->boi", g.double(), a.double())
    want = per_sample.reshape(4, -1) @ v.double().reshape(3, -1).T
    assert rel_error(triton_path.linear_dots(a, g, v), want) < 1e-5
    c = torch.randn(4, 2, device=DEVICE)
    assert rel_error(triton_path.linear_weighted_sum(a, g, c), torch.einsum("bk,boi->koi", c.double(), per_sample)) < 1e-5


def test_non_contiguous_inputs_are_read_where_they_lie():
    a = torch.randn(19, 6, 3, device=DEVICE).permute(2, 1, 0)  # [3, 6, 19], strides (1, 3, 18)
    g = torch.randn(3, 12, 11, device=DEVICE)[:, ::2]           # [3, 6, 11], every other position
    v = torch.randn(2, 19, 22, device=DEVICE)[..., ::2].transpose(1, 2)  # [2, 11, 19] view
    c = torch.randn(2, 3, device=DEVICE).T
    assert not (a.is_contiguous() or g.is_contiguous() or v.is_contiguous() or c.is_contiguous())
    ac, gc, vc = a.contiguous(), g.contiguous(), v.contiguous()
    for route in triton_path.WSUM_ROUTES:
        with weighted_sum_route(route):
            got = triton_path.linear_weighted_sum(a, g, c)
            assert rel_error(got, ref("linear_weighted_sum", ac, gc, c.contiguous())) < 1e-5, route
            assert rel_error(triton_path.linear_weighted_sum(g.transpose(1, 2)[:, :5].transpose(1, 2), a, c),
                             ref("linear_weighted_sum", g[..., :5].contiguous(), ac, c.contiguous())) < 1e-5, route
            # the narrower factor permuted (no stride is 1 along d, rows do not merge), as A and as G
            narrow = torch.randn(4, 6, 3, device=DEVICE).permute(2, 1, 0)  # [3, 6, 4], strides (1, 3, 18)
            assert rel_error(triton_path.linear_weighted_sum(narrow, g, c), ref("linear_weighted_sum", narrow.contiguous(), gc, c.contiguous())) < 1e-5, route
            assert rel_error(triton_path.linear_weighted_sum(a, narrow, c), ref("linear_weighted_sum", ac, narrow.contiguous(), c.contiguous())) < 1e-5, route
    for op, args, dense in [("linear_dots", (a, g, v), (ac, gc, vc)), ("linear_sq_norms", (a, g), (ac, gc)),
                            ("linear_weighted_sum", (a, g, c), (ac, gc, c.contiguous())),
                            ("linear_cross_dots", (a, g, a, g), (ac, gc, ac, gc))]:
        assert rel_error(getattr(triton_path, op)(*args), ref(op, *dense)) < 1e-5, op


def test_non_finite_inputs_stay_non_finite():
    a, g = factors(3, 4, 9, 7, torch.float32, 5)
    g[1, 2, 3] = float("nan")
    a[2, 0, 0] = float("inf")
    v = torch.randn(2, 7, 9, device=DEVICE)
    dots, norms = triton_path.linear_dots(a, g, v), triton_path.linear_sq_norms(a, g)
    assert torch.isnan(dots[1]).all() and torch.isfinite(dots[0]).all() and not torch.isfinite(dots[2]).all()
    assert torch.isnan(norms[1]) and torch.isfinite(norms[0]) and not torch.isfinite(norms[2])
    assert not torch.isfinite(triton_path.linear_weighted_sum(a, g, torch.ones(3, 1, device=DEVICE))).all()


def test_weighted_sum_split_over_rows(monkeypatch):
    """Many multiprocessors and few output tiles split the fused kernel's rows (SPLIT > 1, offsets, an
    empty last split)."""
    monkeypatch.setattr(triton_path, "_multiprocessors", lambda device: 200)
    monkeypatch.setitem(triton_path.LAYOUT, "wsum_route", dict.fromkeys(DTYPES, "fused"))
    a, g = factors(7, 150, 9, 5, torch.float32, 4)  # 1050 rows, one 16×16-or-larger output tile
    c = torch.randn(7, 2, device=DEVICE)
    mask = make_mask("float", 7, 150, 4)
    assert rel_error(triton_path.linear_weighted_sum(a, g, c, mask), ref("linear_weighted_sum", a, g, c, mask)) < 1e-5
