"""Block-mask construction: invariants, ground-truth groups, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unlearn_fast as uf
from unlearn_fast.data.blockmask import (
    block_grid, block_mask_copies, expand_block_masks, make_blockmask_dataset, masked_block_count,
)


def _check_copies(image: torch.Tensor, copies: torch.Tensor, masks: torch.Tensor, block: int, fraction: float) -> None:
    _, h, w = image.shape
    rows, cols = block_grid(h, w, block)
    assert masks.shape == (copies.shape[0], rows, cols)
    expected = math.floor(fraction * rows * cols + 0.5)
    assert (masks.flatten(1).sum(1) == expected).all()
    pixel = expand_block_masks(masks, h, w, block).unsqueeze(1).expand_as(copies)
    target = image.unsqueeze(0).expand_as(copies)
    # Outside the masked blocks a copy equals the target exactly; inside it is zero.
    assert torch.equal(copies[~pixel], target[~pixel])
    assert (copies[pixel] == 0).all()
    # Distinct block subsets per copy.
    assert len({tuple(m.flatten().tolist()) for m in masks}) == masks.shape[0]


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 3), height=st.integers(2, 13), width=st.integers(2, 13),
    block=st.integers(1, 4), fraction=st.floats(0.0, 0.95), n_copies=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
)
def test_copies_match_target_outside_masked_blocks(channels, height, width, block, fraction, n_copies, seed):
    block = min(block, height, width)
    rows, cols = block_grid(height, width, block)
    n_masked = masked_block_count(rows * cols, fraction)
    if n_copies > math.comb(rows * cols, n_masked):
        with pytest.raises(ValueError, match="distinct ways"):
            block_mask_copies(torch.rand(channels, height, width), n_copies, block, fraction, torch.Generator().manual_seed(seed))
        return
    image = torch.rand(channels, height, width) + 0.1  # strictly positive, so zeros mark masking only
    copies, masks = block_mask_copies(image, n_copies, block, fraction, torch.Generator().manual_seed(seed))
    _check_copies(image, copies, masks, block, fraction)


def test_masked_block_count_rounds_half_up():
    assert masked_block_count(16, 0.25) == 4
    assert masked_block_count(10, 0.25) == 3  # 2.5 → 3
    assert masked_block_count(6, 0.25) == 2  # 1.5 → 2
    assert masked_block_count(49, 0.25) == 12  # 12.25 → 12


def test_digits_groups_and_labels():
    ds = uf.load_dataset("digits-blockmask", targets=7, copies=4, seed=3)
    x, y = ds.train.tensors
    n_base = len(ds.train) - 7 * 4
    assert ds.info["n_train"] == len(ds.train) and ds.info["masked_blocks"] == 4 and ds.info["blocks"] == 16
    assert len(ds.forget_ids) == 7 and len(set(ds.forget_ids)) == 7 and max(ds.forget_ids) < n_base
    all_copies = sorted(j for t in ds.forget_ids for j in ds.similar[t])
    assert all_copies == list(range(n_base, len(ds.train)))
    for k, target in enumerate(ds.forget_ids):
        ids = ds.similar[target]
        assert ids == list(range(n_base + 4 * k, n_base + 4 * (k + 1)))
        assert (y[ids] == y[target]).all()
        masks = ds.provenance["block_masks"][4 * k: 4 * (k + 1)]
        pixel = expand_block_masks(masks, 8, 8, 2).unsqueeze(1)
        assert torch.equal(x[ids], torch.where(pixel, torch.zeros(()), x[target].unsqueeze(0)))
    assert ds.similar_ids() == all_copies


def test_construction_is_deterministic_per_seed():
    a = uf.load_dataset("digits-blockmask", targets=5, copies=3, seed=11)
    b = uf.load_dataset("digits-blockmask", targets=5, copies=3, seed=11)
    c = uf.load_dataset("digits-blockmask", targets=5, copies=3, seed=12)
    assert a.forget_ids == b.forget_ids and a.similar == b.similar
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert a.forget_ids != c.forget_ids


def test_zero_copies_is_the_control():
    ds = uf.load_dataset("digits-blockmask", targets=5, copies=0, seed=0)
    assert ds.similar_ids() == [] and all(v == [] for v in ds.similar.values())
    assert len(ds.train) == ds.info["n_train"] == 1347


@pytest.mark.parametrize("options, message", [
    ({"targets": 0}, "targets=0"),
    ({"targets": 100000}, "targets=100000"),
    ({"targets": 2.5}, "targets=2.5"),
    ({"copies": -1}, "copies=-1"),
    ({"copies": 1821}, "exceeds the 1820 distinct ways"),
    ({"fraction": 1.0}, "fraction=1.0"),
    ({"block": 9}, "block=9"),
    ({"color": 3}, "valid options"),
])
def test_bad_construction_options(options, message):
    with pytest.raises(ValueError, match=message):
        uf.load_dataset("digits-blockmask", **options)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid datasets: digits-blockmask, mnist-blockmask"):
        uf.load_dataset("imagenet-blockmask")


def test_make_blockmask_dataset_on_rgb_tensors():
    gen = torch.Generator().manual_seed(0)
    tr_x, te_x = torch.rand(20, 3, 6, 6, generator=gen), torch.rand(5, 3, 6, 6, generator=gen)
    ds = make_blockmask_dataset("toy", tr_x, torch.arange(20) % 3, te_x, torch.arange(5) % 3,
                                targets=2, copies=2, block=4, fraction=0.5, seed=0, num_classes=3)
    assert ds.info["blocks"] == 4 and ds.info["masked_blocks"] == 2 and len(ds.train) == 24
    for k, target in enumerate(ds.forget_ids):
        copies = ds.train.tensors[0][ds.similar[target]]
        _check_copies(tr_x[target], copies, ds.provenance["block_masks"][2 * k: 2 * k + 2], 4, 0.5)


@pytest.mark.parametrize("seed", ["x", -1, 1.5, None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed="):
        uf.load_dataset("digits-blockmask", seed=seed)


def test_numpy_ints_are_accepted():
    import numpy as np

    ds = uf.load_dataset("digits-blockmask", targets=np.int64(3), copies=np.int32(2), seed=np.int64(4))
    assert len(ds.forget_ids) == 3 and len(ds.similar_ids()) == 6
