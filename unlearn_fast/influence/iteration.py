"""The loop shared by the iterative solvers (``cg``, ``lissa``): the K columns of B [K, P] iterate
together, only the active ones are multiplied, and each stops on its own (converged, or a problem
recorded as an event: column → (iteration, value))."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

Events = dict[int, tuple[int, float]]


def column_steps(active: torch.Tensor, max_iter: int, desc: str, progress: bool,
                 residuals: Callable[[], torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (iteration 1, 2, ..., indices [k] of the active columns) while a column of the bool mask
    ``active`` [K] is set (the caller clears them) and fewer than ``max_iter`` iterations were made.
    A tqdm bar (``progress``) shows the worst of ``residuals()`` [K] after each iteration."""
    bar = tqdm(total=max_iter, desc=desc, disable=not progress, leave=False)
    it = 0
    try:
        while bool(active.any()) and it < max_iter:
            it += 1
            yield it, active.nonzero().squeeze(1)
            bar.update(1)
            if progress:
                bar.set_postfix(residual=f"{float(residuals().max()):.2e}")
    finally:
        bar.close()


def stop_columns(active: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, events: Events, it: int,
                 values: torch.Tensor) -> None:
    """Clears the columns idx[mask] of ``active``, recording (it, value) for each in ``events``
    (``values`` [k] aligned with ``idx``)."""
    for j, value in zip(idx[mask].tolist(), values[mask].tolist()):
        events[j] = (it, value)
    active[idx[mask]] = False


def describe(events: Events, quantity: str) -> str:
    """'rhs j at iteration i (quantity = value), ...' for the recorded events, by column."""
    return ", ".join(f"rhs {j} at iteration {i} ({quantity} = {v:.3g})" for j, (i, v) in sorted(events.items()))


__all__ = ["Events", "column_steps", "describe", "stop_columns"]
