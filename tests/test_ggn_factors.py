"""The factored GGN: its per-layer kernels against materialised per-sample gradients, and the
operator's factored products against the linearised ones and the torch.func reference.

The kernels' reference builds every g_{i,r} = G_{i,r}ᵀA_i in float64 and takes plain dot products and
sums, so it shares no code with the shared-A GEMM order under test. Tolerances: float64 1e-10; float32
1e-5 relative to the float64 result on the same (rounded) inputs; half inputs are upcast (float32-level).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import ScaledLinear, SharedWeight
from test_curvature import F64_TOL, TextModel, problem, ref_matrix, rel_err
from torch import nn

import unlearn_fast.kernels as kernels
from unlearn_fast.influence import curvature
from unlearn_fast.influence.curvature import FACTORED_GGN_MIN_VECTORS, CurvatureOperator
from unlearn_fast.influence.ggn_factors import capture_ggn_factors, ggn_factor_bytes, hessian_root_columns
from unlearn_fast.influence.vectors import as_flat, trainable
from unlearn_fast.kernels import torch_path

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def materialised(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Every g_{i,r} = Σ_t G_{i,r,t} A_{i,t}ᵀ in float64 → [B, R, d_out, d_in]."""
    return torch.einsum("brto,bti->broi", g.double(), a.double())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 6), st.sampled_from(list(TOLERANCE)), st.integers(0, 2**16))
def test_multi_dots_and_weighted_sums_match_materialised_gradients(b, r, t, d_in, d_out, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, d_in, generator=gen).to(dtype)
    g = torch.randn(b, r, t, d_out, generator=gen).to(dtype)
    w = torch.randn(k, d_out, d_in, generator=gen).to(dtype)
    c = torch.randn(b, r, k, generator=gen).to(dtype)
    grads = materialised(a, g)
    want_dots = torch.einsum("broi,koi->brk", grads, w.double())
    want_sum = torch.einsum("brk,broi->koi", c.double(), grads)
    dots, summed = kernels.linear_multi_dots(a, g, w), kernels.linear_multi_weighted_sum(a, g, c)
    assert dots.shape == (b, r, k) and summed.shape == (k, d_out, d_in)
    assert dots.dtype == summed.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert rel_err(dots, want_dots) <= TOLERANCE[dtype]
    assert rel_err(summed, want_sum) <= TOLERANCE[dtype]


def test_multi_ops_split_over_vectors_give_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 2, 5, generator=gen).double(), torch.randn(3, 4, 2, 6, generator=gen).double()
    w, c = torch.randn(7, 6, 5, generator=gen).double(), torch.randn(3, 4, 7, generator=gen).double()
    whole = kernels.linear_multi_dots(a, g, w), kernels.linear_multi_weighted_sum(a, g, c)
    monkeypatch.setattr(torch_path, "MAX_INTERMEDIATE", 2 * 6)  # two vectors per chunk
    split = kernels.linear_multi_dots(a, g, w), kernels.linear_multi_weighted_sum(a, g, c)
    for x, y in zip(whole, split):
        torch.testing.assert_close(x, y)


def test_multi_ops_validate_and_handle_empty_inputs():
    a, g = torch.randn(2, 3, 5), torch.randn(2, 4, 3, 6)
    with pytest.raises(ValueError, match=r"G must be \[B, R, T, d_out\].*got \[2, 3, 6\]"):
        kernels.linear_multi_dots(a, g[:, 0], torch.randn(1, 6, 5))
    with pytest.raises(ValueError, match=r"V must be \[K, d_out, d_in\] = \[K, 6, 5\]"):
        kernels.linear_multi_dots(a, g, torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match=r"C must be \[B, R, K\] with B = 2, R = 4"):
        kernels.linear_multi_weighted_sum(a, g, torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match=r"must agree on \[B, T\]"):
        kernels.linear_multi_weighted_sum(a[:, :2], g, torch.randn(2, 4, 1))
    assert kernels.linear_multi_dots(a[:0], g[:0], torch.randn(3, 6, 5)).shape == (0, 4, 3)
    assert kernels.linear_multi_dots(a, g[:, :0], torch.randn(3, 6, 5)).shape == (2, 0, 3)  # R = 0
    assert kernels.linear_multi_weighted_sum(a, g[:, :0], torch.randn(2, 0, 3)).abs().sum() == 0
    assert kernels.linear_multi_weighted_sum(a, g, torch.randn(2, 4, 0)).shape == (0, 6, 5)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_root_columns_rebuild_the_output_hessian(loss):
    z = torch.randn(5, 4, dtype=torch.float64)
    cols = hessian_root_columns(loss, z)  # [R, B, O]
    got = torch.einsum("rbo,rbp->bop", cols, cols)
    if loss == "cross_entropy":
        p = z.softmax(-1)
        want = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        want = 2 * torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    torch.testing.assert_close(got, want)


def _operators(model, x, y, loss="cross_entropy", **kw):
    factored = CurvatureOperator(model, loss, (x, y), kind="ggn", **kw)
    linearised = CurvatureOperator(model, loss, (x, y), kind="ggn", **kw)
    linearised._factored_ggn = False
    return factored, linearised


@pytest.mark.parametrize("arch", ["mlp", "cnn", "text"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_factored_products_match_linearised_and_reference(arch, loss):
    model, x, y = problem(arch, 9, 3, 3, 0, loss)
    factored, linearised = _operators(model, x, y, loss, batch_size=4, damping=0.1)
    v = torch.randn(FACTORED_GGN_MIN_VECTORS + 1, factored.num_params, dtype=torch.float64)
    got = factored(v)
    assert factored._factored_ggn and len(factored._factor_cache) == 3  # three batches, captured once each
    want = v @ (ref_matrix(model, loss, x, y, "ggn") + 0.1 * torch.eye(v.shape[1], dtype=torch.float64)).T
    assert rel_err(got, want) <= F64_TOL
    assert rel_err(got, linearised(v)) <= F64_TOL
    assert not linearised._factor_cache  # the linearised operator never captured factors


def test_fewer_vectors_than_the_threshold_take_the_linearisation():
    model, x, y = problem("mlp", 6, 3, 3, 0)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")
    op(torch.randn(FACTORED_GGN_MIN_VECTORS - 1, op.num_params, dtype=torch.float64))
    assert op._ggn_cache and not op._factor_cache
    op(torch.randn(FACTORED_GGN_MIN_VECTORS, op.num_params, dtype=torch.float64))
    assert op._factor_cache


def test_layers_restriction_and_module_called_twice():
    class Twice(nn.Module):  # one Linear applied twice: its gradient sums both calls
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(0)
    model, x, y = Twice().double(), torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    for layers in (None, ["inner"]):
        factored, linearised = _operators(model, x, y, layers=layers)
        v = torch.randn(5, factored.num_params, dtype=torch.float64)
        assert rel_err(factored(v), v @ ref_matrix(model, "cross_entropy", x, y, "ggn", layers).T) <= F64_TOL
        assert factored._factored_ggn
        assert rel_err(factored(v), linearised(v)) <= F64_TOL


def test_no_rule_or_no_room_falls_back_to_the_linearisation(monkeypatch):
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    model = ScaledLinear(3, 4).double()  # its bare parameter 'scale' has no per-layer rule
    for probe in (ggn_factor_bytes, lambda m, p, x: capture_ggn_factors(m, "cross_entropy", x, p)):
        with pytest.raises(ValueError, match=r"needs a per-layer rule for every parameter; \['scale'\] have none"):
            probe(model, trainable(model), x[:2])
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")
    v = torch.randn(5, op.num_params, dtype=torch.float64)
    assert rel_err(op(v), v @ ref_matrix(model, "cross_entropy", x, y, "ggn").T) <= F64_TOL
    assert op._factored_ggn is False

    mlp, x, y = problem("mlp", 6, 3, 3, 0)
    per_sample = ggn_factor_bytes(mlp, trainable(mlp), x[:2])
    # A [1, 3] + 3 columns × G [1, 3] for the first layer, A [1, 3] + 3 × G [1, 3] for the second, float64
    assert per_sample == (3 + 3 * 3 + 3 + 3 * 3) * 8
    monkeypatch.setattr(curvature, "CACHE_BYTES", per_sample * 6 - 1)
    op = CurvatureOperator(mlp, "cross_entropy", (x, y), kind="ggn")
    v = torch.randn(5, op.num_params, dtype=torch.float64)
    assert rel_err(op(v), v @ ref_matrix(mlp, "cross_entropy", x, y, "ggn").T) <= F64_TOL
    assert op._factored_ggn is False


def test_text_model_factors_cover_embedding_and_layernorm():
    model, x, y = problem("text", 5, 3, 3, 1)
    assert isinstance(model, TextModel)
    factors = capture_ggn_factors(model, "cross_entropy", x, trainable(model))
    assert [layer.module_name for layer in factors.layers] == ["emb", "norm", "head"]
    assert all(layer.g.shape[:2] == (5, 3) for layer in factors.layers)  # [B, R, T, d]
    v = {n: torch.randn(4, *p.shape, dtype=torch.float64) for n, p in trainable(model).items()}
    got = as_flat(CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")(v), trainable(model))
    want = as_flat(v, trainable(model)) @ ref_matrix(model, "cross_entropy", x, y, "ggn").T
    assert rel_err(got, want) <= F64_TOL


class _Tied(nn.Module):
    """Embedding and a bias-free head sharing one weight: the head's use of it is outside 'emb'."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(5, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids).mean(1))))


def _in_place_relu():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4))


@pytest.mark.parametrize("build, make_x", [
    (_Tied, lambda: torch.randint(0, 5, (7, 3))),
    (lambda: SharedWeight(4), lambda: torch.randn(7, 3, dtype=torch.float64)),
    (_in_place_relu, lambda: torch.randn(7, 3, dtype=torch.float64)),
])
def test_models_the_factors_cannot_describe_keep_the_linearisation(build, make_x):
    """Parameters used outside their module's hooked call, or a layer output changed in place, make the
    factors wrong (review measured 0.33–0.60 relative error); the probe sees it and products stay exact."""
    torch.manual_seed(0)
    model, x = build().double(), make_x()
    y = torch.randint(0, 4 if isinstance(model, (SharedWeight, nn.Sequential)) else 5, (7,))
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", damping=1e-2)
    v = torch.randn(6, op.num_params, dtype=torch.float64)
    want = v @ (ref_matrix(model, "cross_entropy", x, y, "ggn") + 1e-2 * torch.eye(op.num_params, dtype=torch.float64)).T
    assert rel_err(op(v), want) <= F64_TOL
    assert op._factored_ggn is False and op._ggn_problem
    with pytest.raises(ValueError, match="preconditioner='nystrom'"):
        op.ggn_batch_factors(0)


def test_in_place_change_of_a_layer_output_is_refused_by_the_fisher_capture():
    from unlearn_fast.influence import grad_dots

    torch.manual_seed(0)
    model, x, y = _in_place_relu().double(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(ValueError, match=r"output of layer '0' \(Linear\) was changed in place.*ReLU\(inplace=True\)"):
        grad_dots(model, "cross_entropy", (x, y), torch.randn(1, sum(p.numel() for p in model.parameters()), dtype=torch.float64))


def test_factors_kept_for_products_and_graphs_have_separate_budgets(monkeypatch):
    """After K ≥ 4 products keep every batch's factors, K = 1 products still keep their graphs (review:
    with one shared budget they re-ran every forward)."""
    model, x, y = problem("mlp", 12, 3, 3, 0)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", batch_size=4)
    monkeypatch.setattr(curvature, "CACHE_BYTES", op._ggn_factor_problem() or op._ggn_bytes * 12)
    op(torch.randn(4, op.num_params, dtype=torch.float64))
    op(torch.randn(1, op.num_params, dtype=torch.float64))
    assert len(op._factor_cache) == 3 and len(op._ggn_cache) == 3


def test_overflow_past_the_probe_names_the_layer():
    """The probe's first samples are finite, a later batch overflows: the factored products name the layer
    (here the dots of layer '0', whose input A holds the 1e308; Tanh keeps the output gradients finite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 2, (12,))
    x[10] = 1e308  # the first layer's output overflows for this sample only
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn", batch_size=4)
    with pytest.raises(ValueError, match=r"non-finite (output gradient of a GGN factor|GGN dot) at layer '0'"):
        op(torch.randn(4, op.num_params, dtype=torch.float64))
