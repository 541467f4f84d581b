"""Input checks shared by every backend: shapes, dtypes and devices of the per-layer factors.

Every kernel works on one layer's cached factors: A [B, T, d_in] (what the weight multiplies),
G [B, T, d_out] (the output gradient), an optional mask [B, T] over positions, and, depending on
the operation, K weight-shaped vectors V [K, d_out, d_in] or weights C [B, K]. An error names the
tensors and their shapes, so a caller sees which factor is wrong.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype results are accumulated and returned in: float32 for half inputs, else the input's."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def check_factors(a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None,
                  names: tuple[str, str] = ("A", "G")) -> None:
    """A [B, T, d_in] and G [B, T, d_out] of one floating dtype and device; mask [B, T] if given."""
    if (mask is None and isinstance(a, torch.Tensor) and isinstance(g, torch.Tensor) and a.dim() == 3
            and g.dim() == 3 and a.dtype == g.dtype and a.dtype in FLOAT_DTYPES and a.shape[:2] == g.shape[:2]
            and a.device == g.device):
        return  # the common case, checked in a few hundred nanoseconds; the rest names what is wrong
    for name, t in zip(names, (a, g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [B, T, d], got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; valid choices: {', '.join(map(str, FLOAT_DTYPES))}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"{names[0]} {_shape(a)} and {names[1]} {_shape(g)} must agree on [B, T]")
    if a.dtype != g.dtype:
        raise ValueError(f"{names[0]} ({a.dtype}) and {names[1]} ({g.dtype}) must have one dtype")
    if a.device != g.device:
        raise ValueError(f"{names[0]} is on {a.device} and {names[1]} on {g.device}; put them on one device")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != a.shape[:2]:
            shape = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be [B, T] = [{a.shape[0]}, {a.shape[1]}] like {names[0]}, got {shape}")
        if mask.device != a.device:
            raise ValueError(f"mask is on {mask.device} and {names[0]} on {a.device}; put them on one device")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask has dtype {mask.dtype}; valid choices: torch.bool or a floating dtype")


def check_multi_factors(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A [B, T, d_in] and G [B, R, T, d_out]: R output gradients per sample that share its A. Returns a
    [B, T, d_out] stand-in for G (one of its R slices) for the checks of the single-gradient form."""
    if not isinstance(g, torch.Tensor) or g.dim() != 4:
        shape = _shape(g) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"G must be [B, R, T, d_out] (R output gradients per sample), got {shape}")
    single = g[:, 0] if g.shape[1] else g.sum(1)  # R = 0: the [B, T, d_out] of an empty sum
    check_factors(a, single)
    return single


def check_vectors(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
    """V [K, d_out, d_in] matching A [B, T, d_in] and G [B, T, d_out]."""
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[1:] != (g.shape[2], a.shape[2]):
        shape = _shape(w) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"V must be [K, d_out, d_in] = [K, {g.shape[2]}, {a.shape[2]}] for G {_shape(g)} "
                         f"and A {_shape(a)}, got {shape}")
    check_partner_dtype("V", w, a)
    if w.device != a.device:
        raise ValueError(f"V is on {w.device} and A on {a.device}; put them on one device")


def check_weights(a: torch.Tensor, c: torch.Tensor, rows: tuple[int, ...] = ()) -> None:
    """C [B, K] matching A [B, T, d_in]; C [B, *rows, K] when ``rows`` (R gradients per sample: C [B, R, K])."""
    want = (a.shape[0], *rows)
    if not isinstance(c, torch.Tensor) or c.dim() != len(want) + 1 or tuple(c.shape[:-1]) != want:
        shape = _shape(c) if isinstance(c, torch.Tensor) else type(c).__name__
        axes = "[B, R, K]" if rows else "[B, K]"
        sizes = ", ".join([f"B = {a.shape[0]}"] + [f"R = {r}" for r in rows])
        raise ValueError(f"C must be {axes} with {sizes} like A {_shape(a)}, got {shape}")
    check_partner_dtype("C", c, a)
    if c.device != a.device:
        raise ValueError(f"C is on {c.device} and A on {a.device}; put them on one device")


def check_partner_dtype(name: str, t: torch.Tensor, a: torch.Tensor) -> None:
    """V or C in A's dtype, or in float32 beside half A (what results accumulate in): any other dtype
    would be silently rounded to A's (float64 V beside float32 A) or mixed into it."""
    valid = (a.dtype, accumulate_dtype(a.dtype))
    if t.dtype not in valid:
        choices = " or ".join(dict.fromkeys(map(str, valid)))
        raise ValueError(f"{name} has dtype {t.dtype} beside A {_shape(a)} of {a.dtype}; valid choices: {choices}")


def float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as 0/1 (or its weights) in ``dtype``, or None."""
    return None if mask is None else mask.to(dtype)
