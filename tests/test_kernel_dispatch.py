"""The dispatch in front of the kernels (unlearn_fast.kernels): input checks, empty inputs, backend
choice, fallbacks to the torch path and their warnings, and the influence code that goes through it.

Both backends run here: the torch path by default on CPU tensors, and the Triton kernels forced with
UNLEARN_FAST_BACKEND=triton (in Triton's interpreter on CPU tensors, TRITON_INTERPRET=1 from conftest.py).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections import Counter

import pytest
import torch

import unlearn_fast as uf
import unlearn_fast.kernels as kernels
from helpers import layer_factors, rel_error
from unlearn_fast.influence import fisher_vp, grad_dots, grad_norms
from unlearn_fast.influence.vectors import trainable
from unlearn_fast.kernels import torch_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
try:
    from unlearn_fast.kernels import triton_path
except ImportError:
    triton_path = None
needs_triton = pytest.mark.skipif(triton_path is None or not TRITON_RUNS,
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    """Each test starts with no kernel marked failed and Triton's import not yet tried."""
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_triton_import_error", None)
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)


def factors(b, t, d_in, d_out, dtype=torch.float32, seed=0):
    return layer_factors(b, t, d_in, d_out, dtype, seed, DEVICE)


def test_dispatch_validates_inputs():
    a, g = factors(2, 3, 5, 4)
    v = torch.randn(1, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"A \[2, 3, 5\] and G \[2, 2, 4\] must agree"):
        kernels.linear_dots(a, g[:, :2], v)
    with pytest.raises(ValueError, match=r"V must be \[K, d_out, d_in\] = \[K, 4, 5\].*got \[1, 5, 4\]"):
        kernels.linear_dots(a, g, torch.randn(1, 5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="must have one dtype"):
        kernels.linear_sq_norms(a, g.double())
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] = \[2, 3\]"):
        kernels.linear_sq_norms(a, g, torch.ones(3, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="has dtype torch.int64; valid choices"):
        kernels.linear_sq_norms(a.long(), g.long())
    with pytest.raises(ValueError, match=r"C must be \[B, K\] with B = 2"):
        kernels.linear_weighted_sum(a, g, torch.ones(3, 1, device=DEVICE))
    with pytest.raises(ValueError, match="must share d_in, d_out"):
        kernels.linear_cross_dots(a, g, a[..., :4], g)
    # V and C in another dtype than A would be rounded to it silently: refused, naming the choices
    with pytest.raises(ValueError, match=r"V has dtype torch.float64 beside A \[2, 3, 5\] of torch.float32; "
                                         r"valid choices: torch.float32$"):
        kernels.linear_dots(a, g, v.double())
    with pytest.raises(ValueError, match=r"C has dtype torch.float16 .* valid choices: torch.float32$"):
        kernels.linear_weighted_sum(a, g, torch.ones(2, 1, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"V has dtype torch.float16 .* valid choices: torch.bfloat16 or torch.float32"):
        kernels.linear_dots(a.bfloat16(), g.bfloat16(), v.half())
    # float32 vectors beside half factors are what results accumulate in: accepted
    half = kernels.linear_dots(a.bfloat16(), g.bfloat16(), v)
    assert half.dtype == torch.float32 and rel_error(half, torch_path.linear_dots(a.bfloat16().double(),
                                                                                   g.bfloat16().double(), v.double())) < 1e-5


def _calls(b, t, d_in, d_out, k, r):
    """Every public operation on factors of these sizes → (name, operands, call, result shape)."""
    a, g = torch.randn(b, t, d_in, device=DEVICE), torch.randn(b, t, d_out, device=DEVICE)
    g_multi = torch.randn(b, r, t, d_out, device=DEVICE)
    v = torch.randn(k, d_out, d_in, device=DEVICE)
    c, c_multi = torch.ones(b, k, device=DEVICE), torch.ones(b, r, k, device=DEVICE)
    return [
        ("linear_dots", (a, g, v), kernels.linear_dots, (b, k)),
        ("linear_sq_norms", (a, g), kernels.linear_sq_norms, (b,)),
        ("linear_cross_dots", (a, g, a[:1], g[:1]), kernels.linear_cross_dots, (b, min(b, 1))),
        ("linear_weighted_sum", (a, g, c), kernels.linear_weighted_sum, (k, d_out, d_in)),
        ("linear_fisher_vp", (a, g, v), kernels.linear_fisher_vp, (k, d_out, d_in)),
        ("linear_multi_dots", (a, g_multi, v), kernels.linear_multi_dots, (b, r, k)),
        ("linear_multi_weighted_sum", (a, g_multi, c_multi), kernels.linear_multi_weighted_sum, (k, d_out, d_in)),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("sizes", [(0, 3, 5, 4, 2, 2), (2, 0, 5, 4, 2, 2), (2, 3, 0, 4, 2, 2), (2, 3, 5, 0, 2, 2),
                                   (2, 3, 5, 4, 0, 2), (2, 3, 5, 4, 2, 0), (2, 1, 0, 4, 3, 1), (2, 4, 5, 0, 3, 1)],
                         ids=["B=0", "T=0", "d_in=0", "d_out=0", "K=0", "R=0", "T=1,d_in=0", "built,d_out=0"])
def test_empty_inputs_give_zeros_of_the_right_shape(monkeypatch, backend, sizes):
    """A result over an empty operand is a sum over nothing: zeros of the right shape (found in review:
    T, d_in or d_out = 0 crashed). Operations with no empty operand must still compute something."""
    monkeypatch.setenv(kernels.BACKEND_ENV, backend)
    for name, operands, call, shape in _calls(*sizes):
        out = call(*operands)
        assert out.shape == shape and out.dtype == torch.float32, (name, out.shape, shape)
        if any(x.numel() == 0 for x in operands):
            assert not out.any(), name
        else:
            assert out.any(), name


@needs_triton
def test_forced_backends_agree_and_float64_stays_on_torch(monkeypatch):
    a, g = factors(3, 4, 12, 9, seed=1)
    v = torch.randn(2, 9, 12, device=DEVICE)
    results = {}
    for backend in kernels.BACKENDS:
        monkeypatch.setenv(kernels.BACKEND_ENV, backend)
        results[backend] = kernels.linear_fisher_vp(a, g, v)
    assert rel_error(results["triton"], results["torch"]) < 1e-5
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    monkeypatch.setattr(triton_path, "linear_dots", lambda *args: pytest.fail("float64 reached Triton"))
    kernels.linear_dots(a.double(), g.double(), v.double())


@needs_triton
def test_a_failing_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")

    def broken(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_path, "linear_sq_norms", broken)
    a, g = factors(2, 3, 5, 4)
    with pytest.warns(RuntimeWarning, match=r"linear_sq_norms \(torch.float32\) failed .*PTX assembly failed.*torch path"):
        first = kernels.linear_sq_norms(a, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = kernels.linear_sq_norms(a, g)
    assert torch.equal(first, second) and rel_error(first, torch_path.linear_sq_norms(a.double(), g.double())) < 1e-6


@needs_triton
def test_an_error_the_torch_path_shares_propagates_and_keeps_the_kernel(monkeypatch):
    """An error that comes from the inputs (the torch path raises it too) is not a kernel failure: it
    reaches the caller, with no warning, and the kernel keeps serving later calls."""
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    calls = []

    def fails_on_odd_batches(a, g, mask=None):
        if a.shape[0] % 2:
            raise RuntimeError("bad input")
        calls.append(a.shape)
        return torch_path.linear_sq_norms(a, g, mask)

    def torch_fails_too(a, g, mask=None):
        raise RuntimeError("bad input")

    monkeypatch.setattr(triton_path, "linear_sq_norms", fails_on_odd_batches)
    a, g = factors(3, 2, 4, 5)
    with monkeypatch.context() as patch:
        patch.setattr(torch_path, "linear_sq_norms", torch_fails_too)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeError, match="bad input"):
                kernels.linear_sq_norms(a, g)
    assert kernels._failed == {}
    kernels.linear_sq_norms(a[:2], g[:2])
    assert calls == [torch.Size([2, 2, 4])]


def test_missing_triton_warns_once_and_runs_torch(monkeypatch):
    """Triton not importable (forced backend, or CUDA tensors): one warning in all, whatever the
    operations and dtypes, and the torch path's results."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.bfloat16):
            a, g = factors(3, 4, 5, 6, dtype)
            v = torch.randn(2, 6, 5, device=DEVICE)
            fisher = kernels.linear_fisher_vp(a, g, v)
            kernels.linear_sq_norms(a, g)
            kernels.linear_cross_dots(a, g, a, g)
            assert torch.equal(fisher, torch_path.linear_weighted_sum(a, g, torch_path.linear_dots(a, g, v)))
    messages = [str(w.message) for w in caught if "unlearn_fast.kernels" in str(w.message)]
    assert len(messages) == 1 and "Triton cannot be imported" in messages[0], messages
    monkeypatch.delenv(kernels.BACKEND_ENV)
    assert kernels.select_backend("cuda") == "torch"


@needs_triton
def test_influence_operations_use_the_dispatch(monkeypatch):
    """grad_dots, grad_norms and the Fisher product of a model give the same numbers on both backends,
    and the Triton backend is really called for them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(DEVICE)
    batch = (torch.randn(5, 6, device=DEVICE), torch.randint(0, 3, (5,), device=DEVICE))
    params = trainable(model)
    vectors = {n: torch.randn(2, *p.shape, device=DEVICE) for n, p in params.items()}
    calls = []
    for name in ("linear_dots", "linear_sq_norms", "linear_weighted_sum"):
        real = getattr(triton_path, name)
        monkeypatch.setattr(triton_path, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    out = {}
    for backend in kernels.BACKENDS:
        monkeypatch.setenv(kernels.BACKEND_ENV, backend)
        out[backend] = (grad_dots(model, "cross_entropy", batch, vectors), grad_norms(model, "cross_entropy", batch),
                        fisher_vp(model, "cross_entropy", batch, vectors, params))
    assert set(calls) == {"linear_dots", "linear_sq_norms", "linear_weighted_sum"}
    assert rel_error(out["triton"][0], out["torch"][0]) < 1e-5
    assert rel_error(out["triton"][1], out["torch"][1]) < 1e-5
    for name in params:
        assert rel_error(out["triton"][2][name], out["torch"][2][name]) < 1e-5


@pytest.mark.parametrize("options, expected", [
    ({"curvature": "fisher"}, {"linear_dots", "linear_weighted_sum"}),
    ({"preconditioner": "woodbury"}, {"linear_dots", "linear_weighted_sum", "linear_sq_norms", "linear_cross_dots"}),
    ({"preconditioner": "nystrom"}, {"linear_multi_dots", "linear_multi_weighted_sum"}),
    ({"solver": "exact"}, {"linear_multi_dots", "linear_multi_weighted_sum"}),
])
def test_influence_unlearn_products_go_through_the_dispatch(monkeypatch, trained_mlp, options, expected):
    """influence_unlearn's per-sample and factored products are the dispatch's operations. (The default
    GGN with plain CG multiplies one vector at a time by jvp/vjp, which has no per-layer product to
    dispatch: see unlearn_fast/influence/curvature.py, FACTORED_GGN_MIN_VECTORS.)"""
    from unlearn_fast.influence import layers

    calls = Counter()
    for name in kernels.__all__:
        if name.startswith("linear_"):
            real = getattr(kernels, name)
            counted = (lambda *args, real=real, name=name: calls.update([name]) or real(*args))
            monkeypatch.setattr(kernels, name, counted)
            if hasattr(layers, name):  # the layer rules import the dispatch's operations by name
                monkeypatch.setattr(layers, name, counted)
    model = copy.deepcopy(trained_mlp)
    uf.influence_unlearn(model, [0, 1, 2], progress=False, device="cpu", **options)
    assert expected <= set(calls), dict(calls)
