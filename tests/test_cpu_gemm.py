"""kernels.cpu_gemm: the oneDNN route of the torch path's x @ yᵀ agrees with torch.matmul and is taken
only where the module says."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearn_fast.kernels import cpu_gemm
from unlearn_fast.kernels.cpu_gemm import CPU_GEMM_ENV, MIN_MULTIPLY_ADDS, matmul_nt

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="oneDNN linear not usable in this torch build")


@pytest.fixture
def spy(monkeypatch):
    """Counts the products sent to oneDNN."""
    calls = []
    real = cpu_gemm._onednn

    def counting(x, y):
        calls.append((tuple(x.shape), tuple(y.shape)))
        return real(x, y)

    monkeypatch.setattr(cpu_gemm, "_onednn", counting)
    return calls


@needs_onednn
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 300), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_matches_float64_reference_across_shapes(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    want = x.double() @ y.double().T
    routed = []
    real = cpu_gemm._onednn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_gemm, "_onednn", lambda a, b: routed.append(1) or real(a, b))
        got = matmul_nt(x, y)
    assert routed == ([1] if m * k * n >= MIN_MULTIPLY_ADDS else [])  # both routes are checked, each by its rule
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # float32 accumulation over k terms of size ~1: error grows like sqrt(k)·eps·|x||y|
    scale = x.double().norm(dim=1, keepdim=True) * y.double().norm(dim=1)
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-6).all()


@needs_onednn
def test_large_row_major_float32_goes_to_onednn(spy):
    x, y = torch.randn(256, 1024), torch.randn(512, 1024)
    assert 256 * 1024 * 512 >= MIN_MULTIPLY_ADDS
    torch.testing.assert_close(matmul_nt(x, y), x @ y.T, rtol=1e-5, atol=1e-4)
    assert spy == [((256, 1024), (512, 1024))]


@needs_onednn
@pytest.mark.parametrize("case", ["small", "float64", "transposed", "requires_grad", "env_off"])
def test_other_products_take_matmul(case, spy, monkeypatch):
    x, y = torch.randn(256, 1024), torch.randn(512, 1024)
    if case == "small":
        x, y = torch.randn(64, 64), torch.randn(64, 64)
    elif case == "float64":
        x, y = x.double(), y.double()
    elif case == "transposed":
        x = torch.randn(1024, 256).T
    elif case == "requires_grad":
        x.requires_grad_(True)
    elif case == "env_off":
        monkeypatch.setenv(CPU_GEMM_ENV, "matmul")
    got = matmul_nt(x, y)
    assert spy == []
    torch.testing.assert_close(got, x @ y.T)
    if case == "requires_grad":  # the gradient still flows through the matmul route
        got.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_bad_env_value_names_the_choices(monkeypatch):
    monkeypatch.setenv(CPU_GEMM_ENV, "blas")
    x, y = torch.randn(256, 1024), torch.randn(512, 1024)
    with pytest.raises(ValueError, match=r"UNLEARN_FAST_CPU_GEMM='blas'.*auto, matmul"):
        matmul_nt(x, y)


def test_failed_probe_falls_back_to_matmul(monkeypatch):
    def broken(x, y):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(cpu_gemm, "_onednn", broken)
    monkeypatch.setattr(cpu_gemm, "_onednn_ok", None)
    x, y = torch.randn(256, 1024), torch.randn(512, 1024)
    torch.testing.assert_close(matmul_nt(x, y), x @ y.T)
    assert cpu_gemm._onednn_ok is False


@needs_onednn
def test_forward_mode_and_torch_func_transforms_take_matmul(spy):
    """oneDNN's op has no derivative formulas: under forward mode it returned a zero tangent."""
    from torch.autograd import forward_ad
    from torch.func import jvp, vmap

    x, y = torch.randn(256, 1024), torch.randn(512, 1024)
    tangent = torch.randn_like(x)
    _, out_tangent = jvp(lambda a: matmul_nt(a, y), (x,), (tangent,))
    torch.testing.assert_close(out_tangent, tangent @ y.T)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        got = forward_ad.unpack_dual(matmul_nt(dual, y)).tangent
    assert got is not None
    torch.testing.assert_close(got, tangent @ y.T)
    batched = vmap(lambda a: matmul_nt(a, y))(x.reshape(2, 128, 1024))
    torch.testing.assert_close(batched.reshape(256, 512), x @ y.T, rtol=1e-5, atol=1e-4)
    assert spy == []


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"x \[4, 3\] and y \[5, 2\]"):
        matmul_nt(torch.randn(4, 3), torch.randn(5, 2))
