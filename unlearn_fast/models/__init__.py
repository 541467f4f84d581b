"""Small model zoo, built for a dataset's input shape and number of classes.

``build_model(name, input_shape, num_classes, **options)`` records what it built on the model
(``model.unlearn_fast_spec``), so checkpoints can rebuild it and ``retrain`` can re-create it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import nn

from ..registry import Registry
from ..validation import as_list, check_positive_int
from .cnn import SmallCNN
from .mlp import MLP
from .resnet import resnet18_cifar

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

MODELS.register("mlp", description="flatten → Linear-ReLU stack → Linear", hidden=(128, 64))(MLP)
MODELS.register("cnn", description="two conv-ReLU-maxpool stages → Linear-ReLU → Linear", channels=(16, 32), hidden=64)(SmallCNN)
MODELS.register("resnet18", description="ResNet-18, CIFAR variant (3×3 stem, no max-pool)", width=64)(resnet18_cifar)


def build_model(name: str, input_shape: tuple[int, ...] | list[int], num_classes: int, **options: Any) -> nn.Module:
    """A fresh ``name`` model for inputs [B, *input_shape] and ``num_classes`` logits."""
    shape = as_list(input_shape, "input_shape", (int, np.integer)) if not isinstance(input_shape, (int, np.integer)) else []
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape={input_shape!r} must be (channels, height, width) with positive int sizes")
    shape = tuple(int(s) for s in shape)
    num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
    hyper = MODELS.resolve_hyper(name, options)
    for key, value in hyper.items():  # every zoo option is a width or a tuple of widths
        widths = as_list(value, key, (int, np.integer))
        if not widths or min(widths) < 1:
            raise ValueError(f"{key}={value!r} must be a positive int or a non-empty tuple of positive ints")
    model = MODELS.get(name).fn(shape, num_classes, **hyper)
    model.unlearn_fast_spec = {"name": name, "input_shape": list(shape), "num_classes": num_classes, "options": hyper}
    return model


__all__ = ["MODELS", "build_model", "MLP", "SmallCNN", "resnet18_cifar"]
