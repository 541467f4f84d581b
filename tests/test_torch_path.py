"""The factored torch path (unlearn_fast.kernels.torch_path, the CPU backend) against per-sample
gradients materialised in float64, whole and in chunks.

The reference builds every g_i = G_iᵀA_i [B, d_out, d_in] with a float64 einsum, so it shares no code
with the path under test. Tiny CHUNK_ELEMENTS and MIN_CHUNK_ROWS force every chunked form: several
samples per chunk, one sample's positions a block at a time, vectors split over K, built g_i in row
blocks. Inputs are rounded to their dtype first, so only the path's own arithmetic is measured:
float32 accumulation of half inputs keeps float32-level error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import rel_error
from unlearn_fast.kernels import torch_path

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
DTYPES = st.sampled_from(list(TOLERANCE))


def reference_gradients(a, g, mask):
    """g_i [B, d_out, d_in] in float64, masked positions left out."""
    g = g.double() if mask is None else g.double() * mask.double().unsqueeze(-1)
    return torch.einsum("bto,bti->boi", g, a.double())


def make(b, t, d_in, d_out, k, dtype, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, d_in, generator=gen).to(dtype)
    g = torch.randn(b, t, d_out, generator=gen).to(dtype)
    v = torch.randn(k, d_out, d_in, generator=gen).to(dtype)
    c = torch.randn(b, k, generator=gen).to(dtype)
    mask = None
    if mask_kind != "none":
        keep = torch.rand(b, t, generator=gen) > 0.3
        mask = keep if mask_kind == "bool" else keep * torch.rand(b, t, generator=gen)
    return a, g, v, c, mask


@settings(max_examples=40, deadline=None)
@example(b=3, t=1, d_in=4, d_out=3, k=2, dtype=torch.float32, mask_kind="float", chunk=None, seed=0)  # T = 1 weights
@example(b=3, t=4, d_in=7, d_out=6, k=1, dtype=torch.bfloat16, mask_kind="float", chunk=1, seed=1)  # ghost, split rows
@example(b=4, t=3, d_in=6, d_out=5, k=3, dtype=torch.float16, mask_kind="bool", chunk=30, seed=2)  # built blocks
@given(b=st.integers(1, 5), t=st.integers(1, 9), d_in=st.integers(1, 7), d_out=st.integers(1, 7),
       k=st.integers(1, 4), dtype=DTYPES, mask_kind=st.sampled_from(["none", "bool", "float"]),
       chunk=st.sampled_from([None, 1, 7, 30, 200]), seed=st.integers(0, 10_000))
def test_every_operation_matches_materialised_gradients(b, t, d_in, d_out, k, dtype, mask_kind, chunk, seed):
    a, g, v, c, mask = make(b, t, d_in, d_out, k, dtype, mask_kind, seed)
    grads = reference_gradients(a, g, mask)
    want = {
        "dots": torch.einsum("boi,koi->bk", grads, v.double()),
        "norms": grads.pow(2).sum((1, 2)),
        "cross": torch.einsum("boi,coi->bc", grads, grads[:2]),
        "weighted_sum": torch.einsum("bk,boi->koi", c.double(), grads),
    }
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            patch.setattr(torch_path, "CHUNK_ELEMENTS", chunk)
            patch.setattr(torch_path, "MIN_CHUNK_ROWS", 2)
            patch.setattr(torch_path, "BUILT_TILE_ROWS", 2)
        m2 = None if mask is None else mask[:2]
        got = {
            "dots": torch_path.linear_dots(a, g, v, mask),
            "norms": torch_path.linear_sq_norms(a, g, mask),
            "cross": torch_path.linear_cross_dots(a, g, a[:2], g[:2], mask, m2),
            "weighted_sum": torch_path.linear_weighted_sum(a, g, c, mask),
        }
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in want:
        assert got[name].dtype == expected_dtype, (name, got[name].dtype)
        # the weighted sum's C is rounded to the input dtype like the other inputs; its error is
        # float32-level in every dtype since the path accumulates half inputs in float32
        assert rel_error(got[name], want[name]) < TOLERANCE[dtype], (name, rel_error(got[name], want[name]))


# factored dots at T = 1 and K = 1, built at T·K > T + K; norms: T = 1, ghost (t = 2), built (t = 6)
@pytest.mark.parametrize("t, k", [(1, 3), (6, 1), (6, 3), (2, 3)])
def test_chunks_are_really_used(monkeypatch, t, k):
    """With a small cap, the operations run in several chunks (a spy counts them) and agree with the
    whole-batch result: the chunking is exercised, not bypassed."""
    a, g, v, c, mask = make(6, t, 5, 4, k, torch.float32, "bool", 3)
    whole = (torch_path.linear_dots(a, g, v, mask), torch_path.linear_sq_norms(a, g, mask),
             torch_path.linear_weighted_sum(a, g, c, mask))
    chunks = []
    real = torch_path.chunk_rows

    def counted(x, samples, positions, mask=None):
        chunks.append((samples, positions))
        return real(x, samples, positions, mask)

    monkeypatch.setattr(torch_path, "chunk_rows", counted)
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 24)
    monkeypatch.setattr(torch_path, "MIN_CHUNK_ROWS", 1)
    chunked = (torch_path.linear_dots(a, g, v, mask), torch_path.linear_sq_norms(a, g, mask),
               torch_path.linear_weighted_sum(a, g, c, mask))
    assert len({(s.start, s.stop, p.start, p.stop) for s, p in chunks}) > 2
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_position_chunks_cover_every_position_once():
    for b, t, per in [(5, 7, 3), (5, 7, 1000), (3, 50, 1 << 20), (1, 1, 1), (4, 9, 0)]:
        for cap in (1, 10, 64, 1 << 22):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch_path, "CHUNK_ELEMENTS", cap)
                seen = torch.zeros(b, t, dtype=torch.int64)
                for samples, positions in torch_path.position_chunks(b, t, per):
                    seen[samples, positions] += 1
                    rows = seen[samples, positions].numel()
                    assert rows <= max(1, cap // max(1, per)), (b, t, per, cap, rows)
                assert (seen == 1).all(), (b, t, per, cap)


@pytest.mark.parametrize("t, k, d_in, d_out", [(3, 1, 4, 5), (3, 1, 5, 4), (1, 3, 4, 5), (3, 3, 4, 5)])
def test_differentiable_through_every_order(monkeypatch, t, k, d_in, d_out):
    """The torch path serves inputs that need gradients (the Triton kernels build no graph): first and
    second derivatives through both dot orders, the norms, the weighted sum and cross dots, in chunks
    (in-place accumulation included)."""
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 12)
    monkeypatch.setattr(torch_path, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(torch_path, "BUILT_TILE_ROWS", 2)
    gen = torch.Generator().manual_seed(t * 10 + k)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    a, g, v, c = leaf(3, t, d_in), leaf(3, t, d_out), leaf(k, d_out, d_in), leaf(3, 2)
    mask = torch.rand(3, t, generator=gen, dtype=torch.float64)
    checks = [(lambda a, g, v: torch_path.linear_dots(a, g, v, mask), (a, g, v)),
              (lambda a, g: torch_path.linear_sq_norms(a, g, mask), (a, g)),
              (lambda a, g, c: torch_path.linear_weighted_sum(a, g, c, mask), (a, g, c)),
              (lambda a, g: torch_path.linear_cross_dots(a, g, a[:2], g[:2], mask, mask[:2]), (a, g))]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_second_derivatives_at_a_zero_row():
    """T = 1 norms under autodiff avoid vector_norm, whose square has no second derivative at 0 (found in
    review: NaN on the Hessian's diagonal where a sample's G row is zero)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 1, 4, generator=gen, dtype=torch.float64)
    g[0] = 0
    hessian = torch.autograd.functional.hessian(lambda g: torch_path.linear_sq_norms(a, g).sum(), g)
    diagonal = hessian[0, 0, :, 0, 0, :].diagonal()
    torch.testing.assert_close(diagonal, torch.full_like(diagonal, 2 * a[0].pow(2).sum().item()))


@pytest.mark.parametrize("t", [1, 3])  # row norms; ghost norms (2T² < d_in·d_out), in chunks
def test_vmap_over_the_accumulating_operations(monkeypatch, t):
    """torch.func.vmap over the weighted sum and the norms matches a loop (found in review: in-place
    accumulation broke vmap, which the whole-batch forms supported)."""
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(torch_path, "MIN_CHUNK_ROWS", 1)
    gen = torch.Generator().manual_seed(t)
    a, g = torch.randn(4, 5, t, 6, generator=gen), torch.randn(4, 5, t, 7, generator=gen)
    c = torch.randn(5, 2, generator=gen)
    for fn in (lambda a, g: torch_path.linear_weighted_sum(a, g, c), torch_path.linear_sq_norms):
        batched = torch.func.vmap(fn)(a, g)
        torch.testing.assert_close(batched, torch.stack([fn(x, y) for x, y in zip(a, g)]))


class _LargestIntermediate(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest new tensor any op returns while active (views of an
    argument, which allocate nothing, are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)}
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("dtype, mask_kind", [(torch.float32, "none"), (torch.bfloat16, "float")])
@pytest.mark.parametrize("op", ["dots_factored", "dots_built", "ghost_norms", "built_norms", "cross", "weighted_sum"])
def test_intermediates_do_not_grow_with_the_batch(monkeypatch, op, dtype, mask_kind):
    """With a fixed cap, no intermediate (outputs aside) exceeds it, for a small batch, a 16× larger B
    and (but for cross dots, which take one pair's [T1, T2] Gram at a time) a 16× longer T. Half and
    masked inputs are copied a chunk at a time (found in review: whole-sample copies grew with B)."""
    # ghost norms need 2T² < d_in·d_out at T = 128, so wider layers there, and a cap that fits a few rows
    cap, (d_in, d_out) = {"ghost_norms": (4096, (200, 200)), "dots_built": (256, (3, 4)),
                          "built_norms": (256, (3, 4))}.get(op, (256, (6, 7)))
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", cap)
    monkeypatch.setattr(torch_path, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(torch_path, "BUILT_TILE_ROWS", 2)
    calls = {
        "dots_factored": lambda a, g, v, c, m: torch_path.linear_dots(a, g, v[:1], m),
        "dots_built": lambda a, g, v, c, m: torch_path.linear_dots(a, g, v, m),
        "ghost_norms": lambda a, g, v, c, m: torch_path.linear_sq_norms(a, g, m),
        "built_norms": lambda a, g, v, c, m: torch_path.linear_sq_norms(a, g, m),
        "cross": lambda a, g, v, c, m: torch_path.linear_cross_dots(a, g, a[:1], g[:1], m, None if m is None else m[:1]),
        "weighted_sum": lambda a, g, v, c, m: torch_path.linear_weighted_sum(a, g, c, m),
    }
    sizes = [(4, 8), (64, 8)] + ([(4, 128)] if op != "cross" else [])
    for b, t in sizes:
        assert torch_path.ghost_norms_cheaper(t, d_in, d_out) == (op == "ghost_norms") or "norms" not in op
        a, g, v, c, mask = make(b, t, d_in, d_out, 2, dtype, mask_kind, 0)
        with _LargestIntermediate() as spy:
            out = calls[op](a, g, v, c, mask)
        if spy.largest > out.numel():  # the output itself scales with B, and is allowed to
            assert spy.largest <= cap, (b, t, spy.largest)
