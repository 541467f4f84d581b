"""Block-masked near-duplicates: copies of an image with a random fraction of its b×b blocks zeroed.

Construction (per target): split the image into b×b-pixel blocks (partial blocks at the right and
bottom edges when b does not divide the size), choose ``n_masked = floor(r·n_blocks + 0.5)`` of them
at random, and set those pixels to 0 in every channel. The C copies of one target use C distinct
block subsets, so no two copies are identical.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..validation import check_int_in, check_number, check_positive_int
from .similar_dataset import SimilarDataset


def block_grid(height: int, width: int, block: int) -> tuple[int, int]:
    """Number of block rows and columns covering a height×width image."""
    return math.ceil(height / block), math.ceil(width / block)


def masked_block_count(n_blocks: int, fraction: float) -> int:
    """round(fraction · n_blocks), rounding halves up."""
    return int(math.floor(fraction * n_blocks + 0.5))


def sample_block_masks(n_copies: int, grid: tuple[int, int], n_masked: int, generator: torch.Generator) -> torch.Tensor:
    """``n_copies`` distinct boolean masks [n_copies, rows, cols], each with ``n_masked`` True blocks."""
    n_blocks = grid[0] * grid[1]
    n_subsets = math.comb(n_blocks, n_masked)
    if n_copies > n_subsets:
        raise ValueError(
            f"copies={n_copies} exceeds the {n_subsets} distinct ways to mask {n_masked} of {n_blocks} blocks; "
            "lower copies or change block/fraction"
        )
    if n_subsets <= 4 * n_copies:
        # Few subsets: enumerate them and draw without replacement.
        subsets = list(itertools.combinations(range(n_blocks), n_masked))
        picks = torch.randperm(len(subsets), generator=generator)[:n_copies].tolist()
        chosen = [subsets[p] for p in picks]
    else:
        seen: set[tuple[int, ...]] = set()
        chosen = []
        while len(chosen) < n_copies:
            subset = tuple(sorted(torch.randperm(n_blocks, generator=generator)[:n_masked].tolist()))
            if subset not in seen:
                seen.add(subset)
                chosen.append(subset)
    masks = torch.zeros(n_copies, n_blocks, dtype=torch.bool)
    for row, subset in enumerate(chosen):
        masks[row, list(subset)] = True
    return masks.view(n_copies, *grid)


def expand_block_masks(masks: torch.Tensor, height: int, width: int, block: int) -> torch.Tensor:
    """Block masks [n, rows, cols] → pixel masks [n, height, width]."""
    pixels = masks.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return pixels[:, :height, :width]


def block_mask_copies(
    image: torch.Tensor, n_copies: int, block: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked copies of ``image`` [C, H, W].

    Returns:
        copies [n_copies, C, H, W] (same dtype as ``image``) and their block masks
        [n_copies, rows, cols] (True = zeroed).
    """
    _, height, width = image.shape
    grid = block_grid(height, width, block)
    masks = sample_block_masks(n_copies, grid, masked_block_count(grid[0] * grid[1], fraction), generator)
    pixel_masks = expand_block_masks(masks, height, width, block)
    copies = image.unsqueeze(0).repeat(n_copies, 1, 1, 1)
    copies.masked_fill_(pixel_masks.unsqueeze(1), 0)
    return copies, masks


def _check_options(n_train: int, image_shape: tuple[int, ...], targets: int, copies: int, block: int, fraction: float,
                   seed: int) -> None:
    check_positive_int(seed, "seed", minimum=0)
    check_int_in(targets, "targets", 1, n_train - 1, hint=f"the train split has {n_train} samples")
    check_positive_int(copies, "copies", minimum=0, hint="0 gives the no-near-duplicate control")
    height, width = image_shape[-2:]
    check_int_in(block, "block", 1, min(height, width), hint=f"images are {height}x{width}")
    check_number(fraction, "fraction", high=1.0, high_open=True)


def make_blockmask_dataset(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    targets: int,
    copies: int,
    block: int,
    fraction: float,
    seed: int,
    num_classes: int,
    extra_info: dict[str, Any] | None = None,
) -> SimilarDataset:
    """Pick ``targets`` train images (seeded) and append ``copies`` block-masked copies of each.

    Args:
        train_x: [N, C, H, W] float images; train_y: [N] int64 labels. Likewise test_x, test_y.

    The copies get ids N + k·copies + j (target k, copy j) and the target's label.
    """
    n_train = train_x.shape[0]
    _check_options(n_train, tuple(train_x.shape[1:]), targets, copies, block, fraction, seed)
    generator = torch.Generator().manual_seed(int(seed))
    forget_ids = torch.randperm(n_train, generator=generator)[:targets].tolist()

    copy_images, copy_labels, copy_masks = [], [], []
    similar: dict[int, list[int]] = {}
    next_id = n_train
    for target in forget_ids:
        if copies:
            imgs, masks = block_mask_copies(train_x[target], copies, block, fraction, generator)
            copy_images.append(imgs)
            copy_masks.append(masks)
            copy_labels.append(train_y[target].repeat(copies))
        similar[target] = list(range(next_id, next_id + copies))
        next_id += copies

    if copies:
        train_x = torch.cat([train_x, *copy_images])
        train_y = torch.cat([train_y, *copy_labels])
    grid = block_grid(train_x.shape[-2], train_x.shape[-1], block)
    info = {
        "name": name,
        "construction": "blockmask",
        "targets": targets,
        "copies": copies,
        "block": block,
        "fraction": float(fraction),
        "masked_blocks": masked_block_count(grid[0] * grid[1], fraction),
        "blocks": grid[0] * grid[1],
        "seed": int(seed),
        "num_classes": int(num_classes),
        "input_shape": list(train_x.shape[1:]),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        **(extra_info or {}),
    }
    provenance = {"block_masks": torch.cat(copy_masks) if copy_masks else torch.zeros(0, *grid, dtype=torch.bool)}
    return SimilarDataset(
        name=name,
        train=torch.utils.data.TensorDataset(train_x, train_y),
        test=torch.utils.data.TensorDataset(test_x, test_y),
        forget_ids=forget_ids,
        similar=similar,
        info=info,
        provenance=provenance,
    )
