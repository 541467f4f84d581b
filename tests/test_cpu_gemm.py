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
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 300), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_matches_float64_reference_across_shapes(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    want = x.double() @ y.double().T
    got = matmul_nt(x, y)
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
