"""A small convolutional network for 8×8 to 32×32 images."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Sequential):
    """Two (Conv3×3 → ReLU → MaxPool2) stages, then Linear → ReLU → Linear: [B, C, H, W] → [B, classes]."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (16, 32), hidden: int = 64) -> None:
        c_in, height, width = input_shape
        if len(channels) != 2:
            raise ValueError(f"cnn channels={channels!r} must be two widths, one per conv stage")
        c1, c2 = channels
        flat = c2 * (height // 4) * (width // 4)
        if flat == 0:
            raise ValueError(f"cnn needs images of at least 4x4, got {height}x{width}")
        super().__init__(
            nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )
