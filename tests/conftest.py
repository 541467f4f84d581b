"""Shared fixtures: small, fast datasets and trained models for the tests."""

from __future__ import annotations

import pytest
import torch

import unlearn_fast as uf

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_digits() -> uf.SimilarDataset:
    """digits-blockmask with 6 targets × 3 copies (seed 0)."""
    return uf.load_dataset("digits-blockmask", targets=6, copies=3, seed=0)


@pytest.fixture(scope="session")
def trained_mlp(small_digits: uf.SimilarDataset) -> torch.nn.Module:
    """A small MLP trained for 3 epochs on ``small_digits``, with its training context."""
    torch.manual_seed(0)
    model = uf.build_model("mlp", small_digits.input_shape, small_digits.num_classes, hidden=(32,))
    return uf.train(model, small_digits, epochs=3, lr=0.1, batch_size=64, weight_decay=5e-4, seed=0, device="cpu", progress=False)
