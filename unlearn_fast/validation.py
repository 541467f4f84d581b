"""Input checks shared by the public entry points; each error names the bad value and the valid choices."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .modes import eval_mode


def check_ids(ids: Any, n: int, what: str = "forget_ids") -> list[int]:
    """Validate sample ids into a dataset of ``n`` samples and return them as a list of ints.

    Accepts a sequence, numpy array or 1-D integer tensor. Rejects empty input, non-integers
    (bools and floats included), out-of-range values and duplicates, naming the offenders.
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, torch.Tensor, set, frozenset, range)):
        raise ValueError(f"{what} must be a sequence of int sample ids, got {type(ids).__name__}: {ids!r}")
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        if ids.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(ids.shape)}")
        is_int = (ids.dtype.kind in "iu") if isinstance(ids, np.ndarray) else not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool)
        if not is_int:
            raise ValueError(f"{what} must hold integers, got dtype {ids.dtype}")
        values = [int(v) for v in ids.tolist()]
    else:
        values = list(ids)
        bad_type = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
        if bad_type:
            raise ValueError(f"{what} must hold ints; these are not: {bad_type[:10]!r}")
        values = [int(v) for v in values]
    if not values:
        raise ValueError(f"{what} is empty; give at least one sample id in [0, {n - 1}]")
    out_of_range = sorted({v for v in values if not 0 <= v < n})
    if out_of_range:
        raise ValueError(f"{what} has ids outside [0, {n - 1}]: {out_of_range[:10]}{' ...' if len(out_of_range) > 10 else ''}")
    seen: set[int] = set()
    duplicated = sorted({v for v in values if v in seen or seen.add(v)})  # type: ignore[func-returns-value]
    if duplicated:
        raise ValueError(f"{what} has duplicated ids: {duplicated[:10]}{' ...' if len(duplicated) > 10 else ''}")
    return values


def check_choice(value: Any, choices: Iterable[Any], what: str) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not valid; valid choices: {', '.join(map(repr, choices))}")
    return value


def check_positive_int(value: Any, what: str, minimum: int = 1, hint: str = "") -> int:
    """An int (Python or numpy, not bool) >= ``minimum``; ``hint`` is appended to the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what}={value!r} must be an int >= {minimum}{'; ' + hint if hint else ''}")
    return int(value)


def check_int_in(value: Any, what: str, low: int, high: int, hint: str = "") -> int:
    """An int (Python or numpy, not bool) in [low, high]; ``hint`` is appended to the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{what}={value!r} must be an int in [{low}, {high}]{'; ' + hint if hint else ''}")
    return int(value)


def check_number(value: Any, what: str, *, low: float = 0.0, high: float = float("inf"),
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the given interval (closed unless ``low_open``/``high_open``)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{what}={value!r} must be a finite number in {interval}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def as_list(value: Any, what: str, item_type: type | tuple[type, ...]) -> list[Any]:
    """A single item or an iterable of items → list; a ValueError if any item has the wrong type.

    Keeps a lone string from being split into characters where a list of names is expected.
    """
    items = [value] if isinstance(value, item_type) or isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"{what} must be one value or a list of them, got {value!r}") from None
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, item_type)]
    if bad:
        raise ValueError(f"{what} holds values of the wrong type: {bad[:5]!r}")
    return items


def check_batch(batch: Any, what: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """A pair (inputs [B, ...], targets [B, ...]) of tensors with the same B."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch)):
        raise ValueError(f"{what} must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
    inputs, targets = batch
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{what} needs inputs [B, ...] and targets [B, ...] with the same B, got shapes "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    return inputs, targets


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → CUDA when present, else CPU; otherwise a device torch knows and can use."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not valid; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but none is available; use 'auto' or 'cpu'")
    return dev


def check_finite(values: torch.Tensor, what: str, where: str, *, error: type[Exception] = ValueError,
                 first_sample: int | None = None, hint: str = "") -> torch.Tensor:
    """``values`` unchanged when every entry is finite; otherwise ``error`` saying "non-finite {what}
    {where}". With ``first_sample`` (the index of row 0 in a larger run), ``values`` is [B, ...] and
    the message names the first row with NaN or inf and how many of the B have one; ``hint`` ends it."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    detail = ""
    if first_sample is not None:
        bad = ~finite.reshape(values.shape[0], -1).all(dim=1)
        detail = f" (sample {first_sample + int(bad.nonzero()[0])}, {int(bad.sum())} of {values.shape[0]} in its batch)"
    raise error(f"non-finite {what} {where}{detail}{': ' + hint if hint else ''}")


def check_finite_parameters(model: nn.Module, what: str, hint: str = "", error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first parameter of ``model`` with a NaN or inf entry, if any.

    The message is ``what``, the parameter's name and count of bad entries, then ``; hint``
    (e.g. what="the input model's parameter"). Buffers are not checked: some models keep -inf
    attention masks in them, and a broken buffer shows in the outputs, which the metrics check.
    """
    named = list(model.named_parameters())
    finite = [torch.isfinite(p).all() for _, p in named]
    # Read back at once where the model sits on one device: one GPU sync, not one per parameter.
    flags = torch.stack(finite).tolist() if len({f.device for f in finite}) == 1 else [bool(f) for f in finite]
    bad = [(name, p) for (name, p), ok in zip(named, flags) if not ok]
    if not bad:
        return
    name, p = bad[0]
    count = int((~torch.isfinite(p)).sum())
    others = f" (and {len(bad) - 1} other parameter{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    raise error(f"{what} {name!r} has {count} non-finite {'entry' if count == 1 else 'entries'} "
                f"(NaN or inf) of {p.numel()}{others}{'; ' + hint if hint else ''}")


def check_labels_fit(num_scores: int, labels: torch.Tensor, what: str) -> None:
    """Class labels [N] must index ``num_scores`` class scores under cross-entropy.

    Otherwise torch fails deep inside the loss with "Target 3 is out of bounds". Labels equal to
    -100 are cross-entropy's ignored ones. Non-class labels (float, not 1-D) are left alone.
    """
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        return
    used = labels[labels != -100]
    if used.numel() == 0:
        return
    low, high = int(used.min()), int(used.max())
    if low < 0:
        raise ValueError(f"{what} has the negative class label {low}; class labels must be in [0, classes) "
                         f"(or -100, which cross_entropy ignores)")
    if high >= num_scores:
        raise ValueError(f"the model outputs {num_scores} class scores, but {what} has labels up to {high} "
                         f"({high + 1} classes): build the model with {high + 1} outputs, or give data whose labels "
                         f"are in [0, {num_scores - 1}]")


def check_class_scores(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """:func:`check_labels_fit` for ``model``'s class scores, found by running it on ``inputs[:1]``
    (on its own device, without gradients, in eval mode). Outputs not shaped [B, classes] are left
    to the loss's own error."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
        return
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        with torch.no_grad(), eval_mode(model):
            scores = model(inputs[:1].to(device))
    except (RuntimeError, TypeError):
        # A model that needs the training loop's casting (autocast) to run: its loop reports its own errors.
        return
    if torch.is_tensor(scores) and scores.dim() == 2:
        check_labels_fit(scores.shape[1], labels, what)
