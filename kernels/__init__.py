"""Kernels behind one dispatch point: Triton on CUDA, torch (or C++) on CPU.

Installed as ``unlearn_fast.kernels`` (the build maps this top-level folder there). The kernels
themselves arrive with the fused-kernels issue; the backend choice lives here from the start so
that every caller asks one place.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")
BACKEND_ENV = "UNLEARN_FAST_BACKEND"


def select_backend(device: torch.device | str) -> str:
    """"triton" for CUDA tensors when Triton imports, else "torch"; ``UNLEARN_FAST_BACKEND`` overrides."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not valid; valid choices: {', '.join(BACKENDS)}")
        return forced
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"
