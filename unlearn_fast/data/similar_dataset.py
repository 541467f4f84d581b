"""SimilarDataset: a train/test pair with forget targets and their planted near-duplicates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class SimilarDataset:
    """Train/test data whose near-duplicate ground truth is known.

    Attributes:
        name: dataset name, as given to :func:`unlearn_fast.load_dataset`.
        train: torch Dataset of (input, label); for built-in data a TensorDataset with
            inputs [N, C, H, W] float32 in [0, 1] and labels [N] int64.
        test: held-out torch Dataset of the same form.
        forget_ids: indices into ``train`` of the forget targets.
        similar: target id → train ids of its planted near-duplicates ([] when none).
        info: every construction parameter and the seed.
        provenance: optional per-sample construction records (e.g. the block masks of each copy).
    """

    name: str
    train: Dataset
    test: Dataset
    forget_ids: list[int]
    similar: dict[int, list[int]]
    info: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def similar_ids(self, targets: list[int] | None = None) -> list[int]:
        """Sorted union of the near-duplicates of ``targets`` (default: all forget targets)."""
        targets = self.forget_ids if targets is None else targets
        return sorted({j for t in targets for j in self.similar.get(t, [])})

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.info["input_shape"])


def as_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, ...], labels [N]) of a map-style Dataset; a TensorDataset is returned as is."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, torch.utils.data.Subset):
        inputs, labels = as_tensors(data.dataset)
        idx = torch.as_tensor(list(data.indices), dtype=torch.long)
        return inputs[idx], labels[idx]
    items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
    if not items:
        raise ValueError("dataset is empty")
    inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.stack([torch.as_tensor(y) for _, y in items])
    return inputs, labels
