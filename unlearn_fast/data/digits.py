"""digits-blockmask: scikit-learn's bundled 8×8 digits (no download) with block-masked copies."""

from __future__ import annotations

import numpy as np
import torch

from .blockmask import make_blockmask_dataset
from .similar_dataset import SimilarDataset

TEST_FRACTION = 0.25


def load_digits_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, seeded train/test split of sklearn's digits as [N, 1, 8, 8] float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    return torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x), torch.from_numpy(te_y)


def digits_blockmask(*, targets: int, copies: int, block: int, fraction: float, seed: int) -> SimilarDataset:
    """Build digits-blockmask; the seed drives the split, the target draw and the masks."""
    tr_x, tr_y, te_x, te_y = load_digits_tensors(seed)
    return make_blockmask_dataset(
        "digits-blockmask", tr_x, tr_y, te_x, te_y,
        targets=targets, copies=copies, block=block, fraction=fraction, seed=seed, num_classes=10,
        extra_info={"source": "sklearn.datasets.load_digits", "test_fraction": TEST_FRACTION},
    )
