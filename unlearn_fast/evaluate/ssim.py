"""The structural similarity index (SSIM) of Wang, Bovik, Sheikh & Simoncelli (2004), per image.

Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE Transactions on Image Processing 13(4), 600-612, 2004.

For two images x, y and each window position, with local means μ, variances σ² and covariance σ_xy,

    SSIM = (2 μ_x μ_y + C1)(2 σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)),
    C1 = (K1 L)², C2 = (K2 L)², K1 = 0.01, K2 = 0.03, L = the data range,

and the image's index is the mean of this map over the window positions that lie wholly inside the
image, and over the channels. The window is uniform (w × w), and the local (co)variances are the
unbiased sample ones (divided by w² − 1): the choices of scikit-image's ``structural_similarity`` at
its defaults, so the values agree with that widely used implementation. (Wang et al. use an 11 × 11
Gaussian window, which does not fit the 8 × 8 digits.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K1 = 0.01
K2 = 0.03
DEFAULT_WINDOW = 7  # scikit-image's default; it fits the smallest built-in images (8 × 8 digits)


def window_size(window: int, height: int, width: int) -> int:
    """The window side actually used: min(window, height, width), rounded down to odd; at least 3."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window={window!r} must be an int >= 3")  # noqa: TRY004
    side = min(window, height, width)
    side -= 1 - side % 2  # round down to odd
    if side < 3:
        raise ValueError(f"SSIM needs a window of at least 3 × 3 pixels; window={window} on {height} × {width} images "
                         f"leaves {max(side, 0)} (images must be at least 3 × 3 and window >= 3)")
    return side


def _as_images(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images [n, C, H, W] or [n, H, W], got {type(t).__name__}")  # noqa: TRY004
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must be images [n, C, H, W] or [n, H, W]; got shape {tuple(t.shape)} ({t.dim()}-D)")
    if t.is_complex():
        raise ValueError(f"{name} must hold real values, got dtype {t.dtype}")
    return (t if t.dim() == 4 else t.unsqueeze(1)).to(torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each image pair: a, b [n, C, H, W] (or [n, H, W]) → [n], float64.

    1 means identical; lower values mean less alike (the index can be negative). The map uses a
    uniform window of side ``min(window, H, W)`` rounded down to odd (an error if that is below
    3), the sample (co)variances, and is averaged over the valid window positions and the channels.

    Args:
        a, b: images of one shape; any real dtype (computed in float64).
        data_range: L, the span of possible pixel values (1 for images in [0, 1], 255 for bytes).
        window: the window side before fitting it to the images.
    """
    x, y = _as_images("a", a), _as_images("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range={data_range!r} must be a finite number > 0 (the span of pixel values)")
    n, channels, height, width = x.shape
    side = window_size(window, height, width)
    if n == 0 or channels == 0:
        return torch.zeros(n, dtype=torch.float64, device=x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    # One pooling pass over the five local moments, each [n·C, 1, H', W'] after the valid-only window.
    stack = torch.stack([x, y, x * x, y * y, x * y], 2).reshape(n * channels * 5, 1, height, width)
    mu_x, mu_y, xx, yy, xy = F.avg_pool2d(stack, side, stride=1).reshape(n, channels, 5, -1).unbind(2)
    unbiased = side * side / (side * side - 1)
    var_x = unbiased * (xx - mu_x * mu_x)
    var_y = unbiased * (yy - mu_y * mu_y)
    cov = unbiased * (xy - mu_x * mu_y)
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2))


__all__ = ["DEFAULT_WINDOW", "K1", "K2", "ssim", "window_size"]
