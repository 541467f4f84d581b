"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Sequential):
    """[B, *input_shape] → flatten → (Linear → ReLU) per hidden width → Linear → logits [B, num_classes]."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128, 64)) -> None:
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*layers)
