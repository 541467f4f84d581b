"""A generated 50k-image dataset for benchmarks where retraining is expensive (no download).

Each of the 1,347 train images of sklearn's digits (the stratified split of
:func:`unlearn_fast.data.digits.load_digits_tensors`) is upsampled to 16×16 and drawn ``copies`` times under a
random affine warp (rotation, scale, shift) plus pixel noise. The forget request is every copy of
``bases`` base images, so no near-duplicate of a target stays in the retain set: retraining without
the targets IS the oracle here, the setting of ``--similar 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from unlearn_fast.data import SimilarDataset
from unlearn_fast.data.digits import load_digits_tensors

SIDE = 16


def _warp(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine warp + noise of [N, 1, 8, 8] images → [N, 1, 16, 16] in [0, 1]."""
    n = images.shape[0]
    big = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    angle = (torch.rand(n, generator=gen) - 0.5) * (2 * math.radians(15))
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * (2 * 2 / SIDE)  # ±2 pixels in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    warped = F.grid_sample(big, grid, align_corners=False, padding_mode="zeros")
    return (warped + 0.05 * torch.randn(warped.shape, generator=gen)).clamp(0, 1)


def augmented_digits(*, copies: int = 38, test_copies: int = 4, bases: int = 10, seed: int = 0) -> SimilarDataset:
    """``copies`` warped copies of each digits train image (38 → 51,186 samples), test likewise.

    forget_ids: all copies of ``bases`` randomly chosen base images (``bases·copies`` samples);
    ``similar`` is empty because none of their copies remains.
    """
    tr_x, tr_y, te_x, te_y = load_digits_tensors(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x = _warp(tr_x.repeat(copies, 1, 1, 1), gen)  # sample j is a copy of base j mod N
    train_y = tr_y.repeat(copies)
    test_x = _warp(te_x.repeat(test_copies, 1, 1, 1), gen)
    test_y = te_y.repeat(test_copies)
    n_base = tr_x.shape[0]
    chosen = torch.randperm(n_base, generator=gen)[:bases]
    forget = sorted((chosen.unsqueeze(1) + n_base * torch.arange(copies).unsqueeze(0)).reshape(-1).tolist())
    info = {"num_classes": 10, "input_shape": [1, SIDE, SIDE], "copies": copies, "test_copies": test_copies,
            "bases": bases, "base_ids": sorted(chosen.tolist()), "seed": seed}
    return SimilarDataset("augmented-digits", TensorDataset(train_x, train_y), TensorDataset(test_x, test_y),
                          forget, {t: [] for t in forget}, info)
