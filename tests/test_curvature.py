"""Curvature-vector products against dense references built with torch.func.

References (θ flat [P], N samples): the Hessian is ``torch.func.hessian`` of the mean loss; the GGN is
(1/N) Σ_i J_iᵀ H_i J_i with J = ``jacrev`` of the outputs [N, O, P] and the analytic output Hessian H_i;
the empirical Fisher is (1/N) Gᵀ G with G [N, P] from ``vmap(grad)``. Float64 products must match to a
norm-wise relative error of 1e-10; float32 ones (against the float64 reference) to 1e-4, or to 10× the
error of the same torch.func reference evaluated in float32 where float32 itself cannot reach 1e-4:
errors are typically 1e-7, but a 2-wide LayerNorm, whose normalisation is ill-conditioned, gave 1.4e-4
for ours and 8.6e-5 for torch.func's float32 on one problem hypothesis found (text, n=1, seed 512).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import TensorDataset

from unlearn_fast.influence.curvature import CurvatureOperator, curvature_vp
from unlearn_fast.influence.vectors import as_dict, as_flat, flat_params, trainable

F64_TOL, F32_TOL = 1e-10, 1e-4
F32_FLOOR_FACTOR = 10  # float32 products may be this many times less accurate than torch.func's own float32
FEW = settings(max_examples=12, deadline=None)


class TextModel(nn.Module):
    """tokens [B, T] → Embedding → LayerNorm → mean over T → Linear.

    ``decomposed=True`` spells LayerNorm out in elementary ops, for the references: in torch 2.13,
    torch.func's second derivatives of the fused ``F.layer_norm`` are wrong in the input × weight block
    (jacrev(jacrev) and hessian disagree with autograd's double backward and with the decomposed form;
    cf. pytorch/pytorch#196700), so a torch.func reference must not go through it.
    """

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.decomposed = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if self.decomposed:
            mu, var = h.mean(dim=-1, keepdim=True), h.var(dim=-1, unbiased=False, keepdim=True)
            h = (h - mu) / torch.sqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias
        else:
            h = self.norm(h)
        return self.head(h.mean(dim=1))


def problem(arch: str, n: int, width: int, classes: int, seed: int, loss: str = "cross_entropy", dtype=torch.float64):
    """(model, inputs, labels), all in ``dtype``, deterministic in ``seed``."""
    torch.manual_seed(seed)
    if arch == "mlp":
        model, x = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, classes)), torch.randn(n, 3)
    elif arch == "cnn":
        model = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 9, classes))
        x = torch.randn(n, 1, 5, 5)
    else:
        model, x = TextModel(6, width + 1, classes), torch.randint(0, 6, (n, 4))  # LayerNorm needs dim >= 2
    y = torch.randint(0, classes, (n,)) if loss == "cross_entropy" else torch.randn(n, classes)
    model = model.to(dtype)
    return model, (x.to(dtype) if x.is_floating_point() else x), (y if loss == "cross_entropy" else y.to(dtype))


def ref_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return ((out - y) ** 2).sum(dim=1)


def _theta(model, layers=None):
    params = trainable(model, layers)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}

    def unflatten(theta):
        out, i = dict(frozen), 0
        for n, p in params.items():
            out[n] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out

    return flat_params(params), unflatten


def ref_matrix(model, loss, x, y, kind, layers=None, dtype=torch.float64):
    """The dense [P, P] curvature of the mean loss, in ``dtype`` (from a copy of ``model`` in it)."""
    model = copy.deepcopy(model).to(dtype).eval()
    if isinstance(model, TextModel):
        model.decomposed = True
    x = x.to(dtype) if x.is_floating_point() else x
    y = y.to(dtype) if y.is_floating_point() else y
    theta, unflatten = _theta(model, layers)

    def outputs(th):
        return functional_call(model, unflatten(th), (x,))

    if kind == "hessian":
        return hessian(lambda th: ref_loss(outputs(th), y, loss).mean())(theta)
    if kind == "ggn":
        jac = jacrev(outputs)(theta)  # [N, O, P]
        z = outputs(theta).detach()
        if loss == "cross_entropy":
            p = z.softmax(dim=1)
            h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            h = 2 * torch.eye(z.shape[1], dtype=z.dtype).expand(z.shape[0], -1, -1)
        return torch.einsum("nop,noq,nqr->pr", jac, h, jac) / x.shape[0]
    g = vmap(grad(lambda th, xi, yi: ref_loss(functional_call(model, unflatten(th), (xi[None],)), yi[None], loss)[0]),
             in_dims=(None, 0, 0))(theta, x, y)  # [N, P] per-sample gradients, the materialised reference
    return g.T @ g / x.shape[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_against_reference(arch, kind, loss, n, width, classes, k, as_dict_form, batch_size, seed, dtype, tol):
    model, x, y = problem(arch, n, width, classes, seed, loss, dtype)
    params = trainable(model)
    size = sum(p.numel() for p in params.values())
    v = torch.randn(k, size, dtype=dtype)
    a = ref_matrix(model, loss, x, y, kind)
    vin = as_dict(v, params) if as_dict_form else v
    if k == 1 and seed % 2:  # also a single vector without the K dimension
        vin = {n_: t[0] for n_, t in vin.items()} if as_dict_form else v[0]
    got = curvature_vp(model, loss, (x, y), vin, kind=kind, batch_size=batch_size)
    if as_dict_form:
        assert set(got) == set(params) and all(got[n_].shape == vin[n_].shape and got[n_].dtype == dtype for n_ in got)
        got = as_flat(as_dict(got, params), params)
    else:
        assert got.shape == vin.shape and got.dtype == dtype
    ref = v.double() @ a.T
    if dtype == torch.float32:  # no tighter than float32 itself allows on this problem (module docstring)
        floor = rel_err(v @ ref_matrix(model, loss, x, y, kind, dtype=torch.float32).T, ref)
        tol = max(tol, F32_FLOOR_FACTOR * floor)
    assert rel_err(got.reshape(k, size), ref) <= tol


shapes = {"arch": st.sampled_from(["mlp", "cnn", "text"]), "kind": st.sampled_from(["hessian", "ggn"]),
          "loss": st.sampled_from(["cross_entropy", "mse"]), "n": st.integers(1, 10), "width": st.integers(1, 4),
          "classes": st.integers(2, 4), "k": st.integers(1, 3), "as_dict_form": st.booleans(),
          "batch_size": st.integers(1, 8), "seed": st.integers(0, 2**16)}


@FEW
@given(**shapes)
def test_float64_products_match_torch_func(**kw):
    check_against_reference(**kw, dtype=torch.float64, tol=F64_TOL)


@settings(max_examples=6, deadline=None)
@given(**shapes)
def test_float32_products_match_within_1e4(**kw):
    check_against_reference(**kw, dtype=torch.float32, tol=F32_TOL)


def test_callable_loss_hessian_and_dataset_input_match_named_loss():
    model, x, y = problem("mlp", 9, 4, 3, 0)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)

    def my_loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    named = curvature_vp(model, "cross_entropy", (x, y), v, kind="hessian", batch_size=4)
    assert rel_err(curvature_vp(model, my_loss, (x, y), v, kind="hessian"), named.double()) <= F64_TOL
    assert rel_err(curvature_vp(model, "cross_entropy", TensorDataset(x, y), v, kind="hessian"), named.double()) <= F64_TOL


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_weight_decay_and_damping_add_their_sum(kind):
    if kind == "fisher":
        _need_fisher()
    model, x, y = problem("mlp", 8, 3, 3, 1)
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    plain = curvature_vp(model, "cross_entropy", (x, y), v, kind=kind)
    shifted = curvature_vp(model, "cross_entropy", (x, y), v, kind=kind, weight_decay=0.3, damping=0.2)
    torch.testing.assert_close(shifted - plain, 0.5 * v, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_layers_restricts_to_that_modules_block(kind):
    model, x, y = problem("mlp", 7, 4, 3, 2)
    full = ref_matrix(model, "cross_entropy", x, y, kind)
    first = sum(p.numel() for p in model[0].parameters())
    v = {"2.weight": torch.randn(2, 3, 4, dtype=torch.float64), "2.bias": torch.randn(2, 3, dtype=torch.float64)}
    got = curvature_vp(model, "cross_entropy", (x, y), v, kind=kind, layers=["2"])
    assert set(got) == {"2.weight", "2.bias"}
    flat = torch.cat([got["2.weight"].reshape(2, -1), got["2.bias"]], dim=1)
    vflat = torch.cat([v["2.weight"].reshape(2, -1), v["2.bias"]], dim=1)
    assert rel_err(flat, vflat @ full[first:, first:].T) <= F64_TOL


@pytest.mark.parametrize("arch", ["mlp", "cnn", "text"])
def test_hessian_symmetric_ggn_symmetric_and_psd(arch):
    model, x, y = problem(arch, 10, 3, 3, 3)
    size = sum(p.numel() for p in model.parameters())
    u = torch.randn(8, size, dtype=torch.float64)
    for kind in ["hessian", "ggn"]:
        op = CurvatureOperator(model, "cross_entropy", (x, y), kind=kind, batch_size=4)
        au = op(u)
        gram = u @ au.T  # gram[i, j] = u_iᵀ A u_j
        torch.testing.assert_close(gram, gram.T, rtol=1e-10, atol=1e-12)
        if kind == "ggn":
            assert (torch.diagonal(gram) >= -1e-12 * u.norm(dim=1) ** 2).all()


def test_model_untouched_eval_mode_used_and_modes_restored():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)).double()
    model.train()
    model[3].eval()  # mixed modes must come back as they were
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    before = copy.deepcopy(model.state_dict())
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    got = curvature_vp(model, "cross_entropy", (x, y), v, kind="hessian")
    assert model.training and model[1].training and not model[3].training
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert rel_err(got, v @ ref_matrix(model, "cross_entropy", x, y, "hessian").T) <= F64_TOL  # dropout off


def test_hessian_loop_fallback_matches_batched_double_backward():
    model, x, y = problem("cnn", 5, 2, 3, 7)
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="hessian", batch_size=2)
    batched = op(v)
    op._batched_double_backward = False  # as after vmap failed to batch some backward op
    assert rel_err(op(v), batched.double()) <= F64_TOL


def test_operator_follows_in_place_parameter_updates():
    model, x, y = problem("mlp", 6, 3, 2, 5)
    op = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    op(v)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert rel_err(op(v), ref_matrix(model, "cross_entropy", x, y, "ggn") @ v) <= F64_TOL


def _need_fisher():
    try:
        from unlearn_fast.influence.per_sample import fisher_vp  # noqa: F401
    except ImportError:
        pytest.skip("unlearn_fast.influence.per_sample.fisher_vp is not available yet")


@pytest.mark.parametrize("arch", ["mlp", "cnn", "text"])
def test_fisher_matches_materialised_per_sample_gradients(arch):
    _need_fisher()
    model, x, y = problem(arch, 9, 3, 3, 6)
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(3, size, dtype=torch.float64)
    got = curvature_vp(model, "cross_entropy", (x, y), as_dict(v, trainable(model)), kind="fisher", batch_size=4)
    ref = v @ ref_matrix(model, "cross_entropy", x, y, "fisher").T
    assert rel_err(as_flat(got, trainable(model)), ref) <= F64_TOL


def test_callable_loss_with_ggn_is_refused():
    model, x, y = problem("mlp", 4, 2, 2, 0)
    with pytest.raises(ValueError, match="ggn.*named loss.*fisher.*hessian"):
        CurvatureOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (x, y), kind="ggn")


def test_bad_kind_and_loss_list_the_choices():
    model, x, y = problem("mlp", 4, 2, 2, 0)
    with pytest.raises(ValueError, match="'ggn', 'hessian', 'fisher'"):
        CurvatureOperator(model, "cross_entropy", (x, y), kind="kfac")
    with pytest.raises(ValueError, match="cross_entropy, mse"):
        CurvatureOperator(model, "hinge", (x, y))
    with pytest.raises(ValueError, match="Dataset"):
        CurvatureOperator(model, "cross_entropy", [x])


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_non_finite_product_names_the_parameters(kind):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # the first layer's output overflows to inf → NaN loss and products
    x, y = torch.ones(4, 2), torch.zeros(4, dtype=torch.long)
    v = torch.ones(sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match=r"non-finite in parameter\(s\) \[.*'0\.weight'"):
        curvature_vp(model, "cross_entropy", (x, y), v, kind=kind)
    with pytest.raises(ValueError, match="vector has non-finite"):
        curvature_vp(model, "cross_entropy", (x, y), torch.full_like(v, float("nan")), kind=kind)


@pytest.mark.parametrize("kind, cache", [("fisher", "_factor_cache"), ("ggn", "_ggn_cache")])
def test_product_caches_follow_parameter_changes(kind, cache):
    from unlearn_fast.influence.curvature import CurvatureOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = (torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,)))
    op = CurvatureOperator(model, "cross_entropy", data, kind=kind, batch_size=8)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    first = op(v)
    assert len(getattr(op, cache)) == 3  # the three batches' factors / graphs are kept for the next product
    torch.testing.assert_close(op(v), first)
    torch.testing.assert_close(op(v[:1]), first[:1])  # K = 1 takes the path without vmap
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    fresh = CurvatureOperator(model, "cross_entropy", data, kind=kind, batch_size=8)(v)
    torch.testing.assert_close(op(v), fresh)  # stale factors were dropped
    assert not torch.allclose(fresh, first)
    # Through .data the version counter stays put (torch does not track .data); the content stamp sees it.
    version = model[2].weight._version
    model[2].weight.data.mul_(0.5)
    model[0].bias.data.add_(0.25)
    assert model[2].weight._version == version
    fresh = CurvatureOperator(model, "cross_entropy", data, kind=kind, batch_size=8)(v)
    torch.testing.assert_close(op(v), fresh)


def test_batch_size_none_sizes_batches_by_activation_memory(monkeypatch):
    """The default batch holds about BATCH_BYTES of forward activations: all of a small data set, and
    proportionally fewer samples when the budget shrinks; the products do not depend on the batching."""
    from unlearn_fast.influence import curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    x, y = torch.randn(300, 10, dtype=torch.float64), torch.randint(0, 4, (300,))
    whole = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")
    assert whole.batch_size == 300
    per_sample = (32 + 32 + 4 + 4) * 8  # the two Linears, the ReLU and the Sequential itself, float64
    monkeypatch.setattr(curvature, "BATCH_BYTES", 50 * per_sample)
    small = CurvatureOperator(model, "cross_entropy", (x, y), kind="ggn")
    assert small.batch_size == 50
    v = torch.randn(whole.num_params, dtype=torch.float64)
    torch.testing.assert_close(small(v), whole(v), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1; or None"):
        CurvatureOperator(model, "cross_entropy", (x, y), batch_size=0)


class _MaskedModel(nn.Module):
    """forward(x, mask): a model that a callable loss must feed more than the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x * mask)


def test_memory_probe_runs_through_a_callable_loss_and_caps_the_batch():
    """The probe calls the model the way the products do (through the loss), counts tuple outputs,
    and never takes more than MAX_MEMORY_BATCH samples at once."""
    from unlearn_fast.influence.curvature import MAX_MEMORY_BATCH
    from unlearn_fast.influence.model_state import counting_activations

    torch.manual_seed(0)
    packed = torch.stack([torch.randn(3000, 5), (torch.rand(3000, 5) > 0.2).float()], dim=1)  # [N, 2, 5]
    labels = torch.randint(0, 3, (3000,))

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x[:, 0], x[:, 1]), y, reduction="none")

    op = CurvatureOperator(_MaskedModel(), loss, (packed, labels), kind="fisher")
    assert op.batch_size == MAX_MEMORY_BATCH < 3000
    lstm = nn.LSTM(4, 6, batch_first=True)
    with counting_activations(lstm) as sizes:
        lstm(torch.randn(2, 7, 4))
    assert sum(sizes) == (2 * 7 * 6 + 2 * (1 * 2 * 6)) * 4  # output [2, 7, 6] and (h, c) [1, 2, 6] each, float32


def test_content_stamp_sees_any_change_and_only_changes():
    from unlearn_fast.influence.model_state import content_stamp

    torch.manual_seed(0)
    tensors = {"w": torch.randn(300, 200), "h": torch.randn(5000).half(), "b": torch.randn(64).bfloat16(),
               "d": torch.randn(7, dtype=torch.float64), "c": torch.randn(3, dtype=torch.complex64),
               "n": torch.full((4,), float("nan")), "i": torch.arange(5, dtype=torch.int8),
               "flag": torch.ones(3, dtype=torch.bool), "t": torch.randn(6, 5).T, "empty": torch.zeros(0)}
    before = content_stamp(tensors)
    assert content_stamp({k: v.clone() for k, v in tensors.items()}) == before  # same content, NaNs included
    changes = [("w", lambda t: t[17, 3].add_(1e-6)),  # below a float32 sum's rounding of 60,000 elements
               ("h", lambda t: t[4999].mul_(-1)), ("b", lambda t: t.mul_(1.01)), ("d", lambda t: t[6].add_(1e-13)),
               ("c", lambda t: t[1].mul_(1j)), ("i", lambda t: t[0].fill_(9)), ("flag", lambda t: t[2].fill_(False)),
               ("t", lambda t: t[4, 5].add_(1.0)), ("n", lambda t: t[0].fill_(0.0))]
    for name, change in changes:
        copy = {k: v.clone() for k, v in tensors.items()}
        change(copy[name])
        assert content_stamp(copy) != before, name
