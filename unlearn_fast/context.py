"""The training context a model carries: its data, loss, weight decay and recipe (docs/architecture.md).

``unlearn_fast.train`` records it; ``attach`` records it for a model trained elsewhere. Unlearning
methods read it, so that ``unlearn(model, forget_ids)`` needs no more arguments, and record the ids
they removed, so that deletion requests compose.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .data.similar_dataset import as_tensors
from .losses import Loss, check_loss
from .validation import check_ids, check_number

CONTEXT_ATTRIBUTE = "unlearn_fast_context"


@dataclass
class TrainingContext:
    """What a model was trained on and how.

    Attributes:
        data: the full training Dataset of (input, label).
        loss: a loss name or callable (see :mod:`unlearn_fast.losses`).
        weight_decay: λ of the objective mean loss + (λ/2)‖θ‖².
        recipe: optimiser settings of :func:`unlearn_fast.train` (epochs, lr, batch_size, seed, ...);
            empty for an attached model.
        similar: target id → ids of its known near-duplicates, when the data has ground truth.
        removed_ids: ids already unlearned; the model's retain set is ``data`` minus these.
        initial_state: parameters before training (CPU), so that retraining repeats the same init.
    """

    data: Dataset
    loss: Loss
    weight_decay: float
    recipe: dict[str, Any] = field(default_factory=dict)
    similar: dict[int, list[int]] | None = None
    removed_ids: tuple[int, ...] = ()
    initial_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> "TrainingContext":
        # The data and initial state are read-only references; copying them with every model copy
        # would multiply memory for nothing.
        return replace(self, recipe=copy.deepcopy(self.recipe, memo), similar=copy.deepcopy(self.similar, memo))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [N, ...], labels [N]) of ``data``, stacked once per context."""
        if self._tensors is None:
            self._tensors = as_tensors(self.data)
        return self._tensors

    def fingerprint(self) -> str:
        """:func:`data_fingerprint` of ``data``, computed once per context."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.data)
        return self._fingerprint

    def retain_ids(self, extra_removed: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Train ids not removed, after also removing ``extra_removed``."""
        gone = set(self.removed_ids) | set(extra_removed)
        return [i for i in range(len(self.data)) if i not in gone]  # type: ignore[arg-type]


def data_fingerprint(data: Any) -> str:
    """SHA-256 (hex) of a training set's inputs and labels, with their dtypes and shapes: the same
    samples in the same order give the same value, anything else (another seed's split, one changed
    label) another. ``data`` is a map-style Dataset of (input, label) or a SimilarDataset (its train split)."""
    dataset, _ = split_data(data)
    digest = hashlib.sha256()
    for tensor in as_tensors(dataset):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def get_context(model: nn.Module) -> TrainingContext:
    """The model's training context; a ValueError explaining how to give one if it has none."""
    ctx = getattr(model, CONTEXT_ATTRIBUTE, None)
    if ctx is None:
        raise ValueError(
            "model has no training context: train it with unlearn_fast.train(...) or call "
            "unlearn_fast.attach(model, data, loss, weight_decay=...) first"
        )
    return ctx


def set_context(model: nn.Module, context: TrainingContext) -> nn.Module:
    # object.__setattr__ keeps nn.Module from treating the context as a submodule or buffer.
    object.__setattr__(model, CONTEXT_ATTRIBUTE, context)
    return model


RECIPE_KEYS = ("optimizer", "epochs", "lr", "batch_size", "weight_decay", "momentum", "schedule", "seed", "amp")


def split_data(data: Any) -> tuple[Dataset, dict[int, list[int]] | None]:
    """(train Dataset, near-duplicate ground truth or None) of a Dataset or SimilarDataset."""
    from .data import SimilarDataset

    if isinstance(data, SimilarDataset):
        return data.train, data.similar
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ValueError(f"data must be a map-style torch Dataset or a SimilarDataset, got {type(data).__name__}")
    return data, None


def _check_similar(similar: Any, n: int) -> dict[int, list[int]] | None:
    """A mapping target id → list of near-duplicate ids, all within [0, n)."""
    if similar is None:
        return None
    if not isinstance(similar, dict):
        raise ValueError(f"similar must be a dict target id -> list of near-duplicate ids, got {type(similar).__name__}")
    checked = {}
    for target, ids in similar.items():
        check_ids([target], n, "similar keys")
        checked[int(target)] = check_ids(ids, n, f"similar[{target}]") if len(ids) else []
    return checked


def attach(
    model: nn.Module,
    data: Any,
    loss: Loss = "cross_entropy",
    *,
    weight_decay: float = 0.0,
    similar: dict[int, list[int]] | None = None,
    removed_ids: list[int] | None = None,
    recipe: dict[str, Any] | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Record the training context of a model trained elsewhere; returns ``model``.

    ``data`` is the training Dataset, or a SimilarDataset whose ``train`` and ``similar`` are used.
    ``recipe`` (keys among ``RECIPE_KEYS``) and ``initial_state`` (the weights before training)
    are needed only by methods that retrain from scratch.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dataset, known_similar = split_data(data)
    removed = tuple(check_ids(removed_ids, len(dataset), "removed_ids")) if removed_ids else ()
    unknown = sorted(set(recipe or {}) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe has unknown key(s) {unknown}; valid keys: {', '.join(RECIPE_KEYS)}")
    if initial_state is not None:
        missing = sorted(set(model.state_dict()) - set(initial_state))
        if missing:
            raise ValueError(f"initial_state lacks the model's entries {missing[:5]}")
        initial_state = {k: v.detach().to("cpu", copy=True) for k, v in initial_state.items()}
    ctx = TrainingContext(
        data=dataset, loss=check_loss(loss), weight_decay=check_number(weight_decay, "weight_decay"),
        recipe=dict(recipe or {}), similar=_check_similar(similar if similar is not None else known_similar, len(dataset)),
        removed_ids=removed, initial_state=initial_state,
    )
    return set_context(model, ctx)


def resolve_context(model: nn.Module, *, data: Any = None, loss: Loss | None = None, weight_decay: float | None = None) -> TrainingContext:
    """The model's context with any given ``data``/``loss``/``weight_decay`` taking precedence.

    The model is not modified. New ``data`` resets the removed ids, which index the old data; a
    SimilarDataset also replaces the near-duplicate ground truth.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = getattr(model, CONTEXT_ATTRIBUTE, None)
    if base is None and data is None:
        get_context(model)  # raises the explanatory error
    changes: dict[str, Any] = {}
    if data is not None:
        dataset, known_similar = split_data(data)
        if base is None or dataset is not base.data:
            changes.update(data=dataset, similar=known_similar, removed_ids=())
        elif known_similar is not None:
            changes["similar"] = known_similar
    if loss is not None:
        changes["loss"] = check_loss(loss)
    if weight_decay is not None:
        changes["weight_decay"] = check_number(weight_decay, "weight_decay")
    if base is None:
        return TrainingContext(**{"loss": "cross_entropy", "weight_decay": 0.0, **changes})
    return replace(base, **changes)
