"""The study's ``original`` model: one recipe per dataset, shared by the study and ``unlearn-fast tune``.

Tuning must train exactly the model the study later unlearns from (same architecture, recipe,
epochs and initialisation seed), or the chosen hyperparameters would be fitted to another model.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .data import SimilarDataset, default_recipe
from .models import build_model
from .train import train

# ``--quick`` trains a third of the recipe's epochs (at least one).
QUICK_EPOCH_DIVISOR = 3


def study_recipe(dataset: str, quick: bool) -> tuple[str, dict[str, Any]]:
    """(model name, training recipe) the study uses for ``dataset``; ``quick`` divides the epochs by
    :data:`QUICK_EPOCH_DIVISOR`. Unknown datasets raise, listing the valid ones."""
    recipe = default_recipe(dataset)
    model_name = recipe.pop("model")
    if quick:
        recipe["epochs"] = max(1, recipe["epochs"] // QUICK_EPOCH_DIVISOR)
    return model_name, recipe


def train_original(data: SimilarDataset, dataset: str, seed: int, quick: bool, device: torch.device,
                   progress: bool = False) -> tuple[nn.Module, float]:
    """Train ``original`` on all of ``data`` as the study does: the model initialised under
    ``torch.manual_seed(seed)``, the recipe of :func:`study_recipe` with ``seed``.

    Returns (model with its training context, seconds spent in training alone).
    """
    model_name, recipe = study_recipe(dataset, quick)
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    started = time.perf_counter()
    original = train(model, data, seed=seed, device=device, progress=progress, **recipe)
    return original, time.perf_counter() - started
