"""Factored per-sample gradient operations against the torch.func materialised reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from helpers import SequenceModel, SharedWeight, TextModel, cnn_with_batchnorm, gpt2_ids, padded_ids, tiny_gpt2
from unlearn_fast.influence.per_sample import fisher_vp, grad_dots, grad_norms, loss_gradient, per_sample_grads
from unlearn_fast.influence.vectors import as_flat, trainable
from unlearn_fast.kernels import torch_path

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _check(model: nn.Module, batch, dtype: torch.dtype, k: int, seed: int = 0) -> None:
    model = model.to(dtype)
    x, y = batch
    batch = (x.to(dtype) if x.is_floating_point() else x, y)
    params = trainable(model)
    gen = torch.Generator().manual_seed(seed)
    vectors = {n: torch.randn(k, *p.shape, generator=gen, dtype=dtype) for n, p in params.items()}
    ref = per_sample_grads(model, "cross_entropy", batch)
    ref_flat = torch.cat([ref[n].reshape(x.shape[0], -1) for n in params], 1)  # [B, P]
    v_flat = as_flat(vectors, params)  # [K, P]

    dots = grad_dots(model, "cross_entropy", batch, vectors)
    torch.testing.assert_close(dots, ref_flat @ v_flat.T, **TOL[dtype])
    torch.testing.assert_close(grad_dots(model, "cross_entropy", batch, v_flat), dots, **TOL[dtype])  # flat form
    torch.testing.assert_close(grad_norms(model, "cross_entropy", batch), ref_flat.norm(dim=1), **TOL[dtype])
    fisher = as_flat(fisher_vp(model, "cross_entropy", batch, vectors, params), params)
    torch.testing.assert_close(fisher, (ref_flat @ v_flat.T).T @ ref_flat, **TOL[dtype])
    total = as_flat({n: g.unsqueeze(0) for n, g in loss_gradient(model, "cross_entropy", batch, params).items()}, params)
    torch.testing.assert_close(total[0], ref_flat.sum(0), **TOL[dtype])


DTYPES = st.sampled_from([torch.float32, torch.float64])


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 6), d_in=st.integers(1, 9), hidden=st.integers(1, 9), classes=st.integers(2, 5),
       k=st.integers(1, 4), dtype=DTYPES, seed=st.integers(0, 1000))
def test_mlp(b, d_in, hidden, classes, k, dtype, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    _check(model, (torch.randn(b, d_in), torch.randint(0, classes, (b,))), dtype, k, seed)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 4), c_in=st.integers(1, 3), c_out=st.integers(1, 4), h=st.integers(3, 8), w=st.integers(3, 8),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), k=st.integers(1, 3), dtype=DTYPES,
       seed=st.integers(0, 1000))
def test_cnn_with_batchnorm(b, c_in, c_out, h, w, kernel, stride, padding, k, dtype, seed):
    torch.manual_seed(seed)
    model = cnn_with_batchnorm(c_in, c_out, h, w, kernel, stride, padding, 3)
    _check(model, (torch.randn(b, c_in, h, w), torch.randint(0, 3, (b,))), dtype, k, seed)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 7), vocab=st.integers(3, 12), d=st.integers(1, 6), k=st.integers(1, 3),
       dtype=DTYPES, seed=st.integers(0, 1000))
def test_embedding_layernorm_with_padding(b, t, vocab, d, k, dtype, seed):
    torch.manual_seed(seed)
    _check(TextModel(vocab, d, 3), (padded_ids(b, t, vocab), torch.randint(0, 3, (b,))), dtype, k, seed)


@pytest.mark.parametrize("k", [1, 3])  # K=1: factored dots over T positions; K=3: chunked per-sample dots
@pytest.mark.parametrize("t, d_in, d_hidden", [(3, 8, 8), (9, 2, 3), (4, 9, 2)])  # ghost norms, then materialised
def test_sequence_linear_both_forms(t, d_in, d_hidden, k):
    torch.manual_seed(0)
    model = SequenceModel(d_in, d_hidden, 4)
    _check(model, (torch.randn(5, t, d_in), torch.randint(0, 4, (5,))), torch.float64, k)


@pytest.mark.parametrize("t, d_in, d_hidden", [(4, 9, 7), (9, 2, 7)])  # built dots; built norms too
@pytest.mark.parametrize("tile_rows, max_elements", [(2, 40), (3, 54)])  # row blocks; and 2-sample chunks
def test_sequence_linear_gradients_built_in_blocks(monkeypatch, t, d_in, d_hidden, tile_rows, max_elements):
    """Per-sample gradients built a few rows (and samples) at a time, with a short last block, still
    cover every row and sample exactly once."""
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", max_elements)  # below every batch's B·d_out·d_in: blocks
    monkeypatch.setattr(torch_path, "BUILT_TILE_ROWS", tile_rows)
    blocks = []
    real = torch_path.built_blocks

    def counted(a, g, mask=None):
        for item in real(a, g, mask):
            blocks.append(item[1])
            yield item
    monkeypatch.setattr(torch_path, "built_blocks", counted)
    torch.manual_seed(1)
    model = SequenceModel(d_in, d_hidden, 4)
    _check(model, (torch.randn(5, t, d_in), torch.randint(0, 4, (5,))), torch.float64, 3)
    assert len({(r.start, r.stop) for r in blocks}) > 1  # the rows really came in blocks


def test_gpt2_block_conv1d_with_padded_sequences():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = gpt2_ids()
    model = tiny_gpt2()
    assert any(type(m).__name__ == "Conv1D" for m in model.modules())
    _check(model, (ids, torch.randint(0, 3, (4,))), torch.float64, 2)
    _check(model, (ids, torch.randint(0, 3, (4,))), torch.float32, 2)


def test_layers_restricts_the_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    batch = (torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1]))
    ref = per_sample_grads(model, "cross_entropy", batch)
    norms = grad_norms(model, "cross_entropy", batch, layers=["2"])
    torch.testing.assert_close(norms, torch.cat([ref["2.weight"].flatten(1), ref["2.bias"]], 1).norm(dim=1))
    with pytest.raises(ValueError, match="unknown layer"):
        grad_norms(model, "cross_entropy", batch, layers=["9"])


def test_bad_vectors_and_non_finite():
    model = nn.Sequential(nn.Linear(3, 2))
    batch = (torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected \[8\] or \[K, 8\]"):
        grad_dots(model, "cross_entropy", batch, torch.zeros(7))
    with pytest.raises(ValueError, match="missing"):
        grad_dots(model, "cross_entropy", batch, {"0.weight": torch.zeros(2, 3)})
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite .* layer '0'"):
        grad_norms(model, "cross_entropy", batch)


def test_empty_batch_and_model_mode_restored():
    model = nn.Sequential(nn.Linear(3, 2)).train()
    out = grad_norms(model, "cross_entropy", (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    assert out.shape == (0,) and model.training


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2),
       st.integers(1, 2), st.integers(1, 2), st.integers(1, 12), st.integers(1, 12), st.integers(1, 3))
def test_conv_patches_equal_unfold(kh, kw, sh, sw, ph, pw, dh, dw, h, w, c):
    from unlearn_fast.influence.layers import conv_patches

    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # the kernel does not fit: no output positions
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    reference = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw)).transpose(1, 2)
    assert torch.equal(conv_patches(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw)), reference)


def test_factors_of_a_tied_weight_are_refused_and_good_models_are_checked_once():
    """A weight also used outside its module's call (here F.linear on another layer's weight) makes the
    per-layer factors wrong: the first capture compares Σ_i g_i with autograd and refuses."""
    from unlearn_fast.influence import per_sample

    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    shared = SharedWeight(2).double()
    v = torch.randn(2, sum(p.numel() for p in shared.parameters()), dtype=torch.float64)
    with pytest.raises(ValueError, match="do not reproduce autograd's gradient.*F.linear"):
        grad_dots(shared, "cross_entropy", (x, y), v)
    head = {"b.weight": torch.ones(1, 2, 3, dtype=torch.float64), "b.bias": torch.ones(1, 2, dtype=torch.float64)}
    assert grad_dots(shared, "cross_entropy", (x, y), head, layers=["b"]).shape == (5, 1)  # 'b' owns its weight
    plain = nn.Sequential(nn.Linear(3, 2)).double()
    grad_dots(plain, "cross_entropy", (x, y), torch.randn(1, 8, dtype=torch.float64))
    assert per_sample._VERIFIED[plain] == {("0.weight", "0.bias")}
