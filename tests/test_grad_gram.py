"""Sample-to-sample gradient dots (grad_gram, the rules' cross_dots) against the materialised
reference: per_sample_grads flattened to R [B, P], then R1 R2ᵀ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import SequenceModel, TextModel, cnn_with_batchnorm, gpt2_ids, padded_ids, tiny_gpt2
from unlearn_fast.influence import grad_gram, grad_norms, layers, per_sample_grads
from unlearn_fast.kernels import torch_path
from unlearn_fast.influence.vectors import trainable

# relative to each entry, plus an absolute floor relative to the largest entry (cancellation in a sum over P)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)}
DTYPES = st.sampled_from([torch.float32, torch.float64])
FEW = settings(max_examples=3, deadline=None)


def _rows(model: nn.Module, batch) -> torch.Tensor:
    grads = per_sample_grads(model, "cross_entropy", batch)
    return torch.cat([grads[n].reshape(batch[0].shape[0], -1) for n in trainable(model)], 1)


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, floor = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=floor * (1 + float(ref.abs().max())))


def _check(model: nn.Module, batch, other, dtype: torch.dtype) -> None:
    """grad_gram of ``batch`` with itself and with ``other`` against R1 R1ᵀ and R1 R2ᵀ."""
    model = model.to(dtype)
    batch, other = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in (batch, other)]
    r1, r2 = _rows(model, batch), _rows(model, other)
    gram = grad_gram(model, "cross_entropy", batch)
    assert gram.shape == (r1.shape[0],) * 2 and gram.dtype == dtype
    _close(gram, r1 @ r1.T, dtype)
    cross = grad_gram(model, "cross_entropy", batch, other)
    assert cross.shape == (r1.shape[0], r2.shape[0])
    _close(cross, r1 @ r2.T, dtype)


def _labels(b: int, classes: int = 3) -> torch.Tensor:
    return torch.randint(0, classes, (b,))


@FEW
@given(b1=st.integers(1, 6), b2=st.integers(1, 6), d_in=st.integers(1, 7), hidden=st.integers(1, 7),
       classes=st.integers(2, 4), dtype=DTYPES, seed=st.integers(0, 1000))
def test_mlp(b1, b2, d_in, hidden, classes, dtype, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    _check(model, (torch.randn(b1, d_in), _labels(b1, classes)), (torch.randn(b2, d_in), _labels(b2, classes)), dtype)


@FEW
@given(b1=st.integers(1, 4), b2=st.integers(1, 4), c_in=st.integers(1, 2), c_out=st.integers(1, 3), h=st.integers(3, 6),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), dtype=DTYPES, seed=st.integers(0, 1000))
def test_cnn_with_batchnorm(b1, b2, c_in, c_out, h, kernel, stride, padding, dtype, seed):
    torch.manual_seed(seed)
    model = cnn_with_batchnorm(c_in, c_out, h, h + 1, kernel, stride, padding, 3)
    _check(model, (torch.randn(b1, c_in, h, h + 1), _labels(b1)), (torch.randn(b2, c_in, h, h + 1), _labels(b2)), dtype)


@FEW
@given(b1=st.integers(1, 4), b2=st.integers(1, 4), t1=st.integers(1, 6), t2=st.integers(1, 6), vocab=st.integers(3, 9),
       d=st.integers(2, 5), dtype=DTYPES, seed=st.integers(0, 1000))
def test_embedding_layernorm_padded_sequences_of_two_lengths(b1, b2, t1, t2, vocab, d, dtype, seed):
    torch.manual_seed(seed)  # TextModel's bare scalar Parameter goes through the torch.func fallback
    _check(TextModel(vocab, d, 3), (padded_ids(b1, t1, vocab), _labels(b1)), (padded_ids(b2, t2, vocab), _labels(b2)), dtype)


@pytest.mark.parametrize("opposite", [False, True])  # the form the costs pick, then the other one forced
@pytest.mark.parametrize("t, d_in, d_hidden, ghost", [(2, 16, 16, True), (20, 2, 3, False)])
def test_sequence_linear_ghost_and_built_forms(monkeypatch, t, d_in, d_hidden, ghost, opposite):
    b = 5
    assert layers._ghost_cheaper(b, b, t, t, d_in, d_hidden) is ghost  # the shapes pick the intended form
    if opposite:
        monkeypatch.setattr(layers, "_ghost_cheaper", lambda *shape: not ghost)
    torch.manual_seed(0)
    model = SequenceModel(d_in, d_hidden, 4)
    dtype = torch.float64 if opposite else torch.float32
    _check(model, (torch.randn(b, t, d_in), _labels(b, 4)), (torch.randn(b - 2, t, d_in), _labels(b - 2, 4)), dtype)


def test_tiles_and_chunks_cover_every_pair(monkeypatch):
    """Tiny caps split every rule's work into one-sample tiles and chunks."""
    monkeypatch.setattr(torch_path, "MAX_INTERMEDIATE", 5)
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 5)
    torch.manual_seed(0)
    _check(TextModel(7, 2, 3), (padded_ids(3, 3, 7), _labels(3)), (padded_ids(2, 4, 7), _labels(2)), torch.float64)
    _check(cnn_with_batchnorm(1, 2, 3, 3, 2, 1, 0, 3), (torch.randn(3, 1, 3, 3), _labels(3)),
           (torch.randn(2, 1, 3, 3), _labels(2)), torch.float64)
    for ghost in (True, False):
        monkeypatch.setattr(layers, "_ghost_cheaper", lambda *shape, ghost=ghost: ghost)
        _check(SequenceModel(2, 3, 2), (torch.randn(3, 3, 2), _labels(3, 2)), (torch.randn(2, 2, 2), _labels(2, 2)), torch.float64)


def test_gpt2_block_conv1d():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ids, other = tiny_gpt2(), gpt2_ids(), gpt2_ids()[:3, :5]
    assert any(type(m).__name__ == "Conv1D" for m in model.modules())
    _check(model, (ids, _labels(4)), (other, _labels(3)), torch.float64)  # float32 Conv1D: the sequence tests


def test_diagonal_is_the_squared_norms_and_layers_restrict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64), _labels(6, 2))
    gram = grad_gram(model, "cross_entropy", batch)
    torch.testing.assert_close(gram, gram.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gram.diagonal(), grad_norms(model, "cross_entropy", batch).pow(2))
    last = grad_gram(model, "cross_entropy", batch, layers=["2"])
    ref = per_sample_grads(model, "cross_entropy", batch, layers=["2"])
    rows = torch.cat([ref["2.weight"].flatten(1), ref["2.bias"]], 1)
    torch.testing.assert_close(last, rows @ rows.T)


def test_empty_batches_and_bad_input():
    model = nn.Sequential(nn.Linear(3, 2))
    batch = (torch.randn(4, 3), _labels(4, 2))
    empty = (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert grad_gram(model, "cross_entropy", empty).shape == (0, 0)
    assert grad_gram(model, "cross_entropy", batch, empty).shape == (4, 0)
    with pytest.raises(ValueError, match="other must be a pair"):
        grad_gram(model, "cross_entropy", batch, torch.randn(2, 3))
    with pytest.raises(ValueError, match="same B"):
        grad_gram(model, "cross_entropy", (torch.randn(4, 3), _labels(3, 2)))
    with pytest.raises(ValueError, match="unknown loss"):
        grad_gram(model, "hinge", batch)
