"""Search spaces for ``unlearn-fast tune``: one table, kept apart from the tuning code.

``SEARCH_SPACES[method][option]`` is the :class:`Space` that a trial draws that option from; options
left out keep their registered default (``METHODS.get(method).defaults``). Every space holds its
method's numeric defaults, so that the defaults (trial 0) are one point of the space searched
(``influence``'s damping "auto" is the trust region's choice, which the drawn first dampings bracket).

The ranges were chosen for the task ``tune`` runs by default: the quick digits-blockmask study
(MLP, 10 epochs at lr 0.1, batch 64) with its 50 targets as the forget set. Most defaults were
measured with a forget set of 550 samples (targets + near-duplicates, see each method's
docstring); on the 50 targets alone some over-unlearn, so each range reaches well below the
default's strength, and about as far above it as the docstrings found still useful. Learning
rates stay under the training lr (0.1): above it, "unlearning" is retraining with another recipe.
Options that change what the method is (``boundary_shrink``'s ``retain``, ``influence``'s solver)
or only the randomness (seeds) are not searched: 12 trials cannot cover many dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("log", "linear", "int", "choice")


@dataclass(frozen=True)
class Space:
    """The values one option may take: ``log``/``linear`` floats or ``int`` in [low, high], or ``choices``."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Space kind {self.kind!r} is not valid; valid kinds: {', '.join(KINDS)}")
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("a choice Space needs at least one choice")
            return
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"Space needs finite low < high, got [{self.low}, {self.high}]")
        if self.kind == "log" and self.low <= 0:
            raise ValueError(f"a log Space needs low > 0, got {self.low}")
        if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int Space needs integer bounds, got [{self.low}, {self.high}]")

    def draw(self, rng: np.random.Generator) -> Any:
        """One value from ``rng``: floats rounded to 3 significant digits, ints and choices as plain Python values."""
        if self.kind == "choice":
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "log":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        # Rounding keeps the written values readable; it can only land on the bounds, never past them.
        return min(max(float(f"{value:.3g}"), self.low), self.high)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the space (a choice, or a number within [low, high])."""
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


def log(low: float, high: float) -> Space:
    """Log-uniform float in [low, high] (for scales: learning rates, weights, damping)."""
    return Space("log", low, high)


def linear(low: float, high: float) -> Space:
    """Uniform float in [low, high] (for fractions)."""
    return Space("linear", low, high)


def integer(low: int, high: int) -> Space:
    """Uniform int in [low, high], both included (for epoch counts)."""
    return Space("int", low, high)


def choice(*options: Any) -> Space:
    """One of ``options``, uniformly."""
    return Space("choice", choices=tuple(options))


# The fine-tuning family: epochs from 1 to twice the default; lr a decade either side, under 0.1.
_FINETUNE = {"epochs": integer(1, 10), "lr": log(0.002, 0.1)}
# random_label/salun/bad_teacher default to 2 epochs at lr 0.005 and over-shot at lr 0.0075 on 550
# forget samples; 50 targets are fewer relabelled samples per epoch, so up to 4 epochs and lr 0.02.
_RELABEL = {"epochs": integer(1, 4), "lr": log(0.0005, 0.02)}

SEARCH_SPACES: dict[str, dict[str, Space]] = {
    "finetune": dict(_FINETUNE),
    # lr 0.01 left the targets untouched and 0.1 over-shot (550 forget samples); 50 targets take
    # fewer ascent steps per epoch, so up to 0.2.
    "gradient_ascent": {"epochs": integer(1, 10), "lr": log(0.005, 0.2)},
    # Over-unlearns at its defaults on 50 targets: the forget term's weight and cap reach far below
    # 1 (w → 0 is finetune; c below 0.1 nats barely moves a target), and up to the over-shooting c = 3.
    "graddiff": {**_FINETUNE, "forget_weight": log(0.03, 3.0), "forget_cap": log(0.05, 3.0)},
    "random_label": dict(_RELABEL),
    # SalUn's mask: 10 % moved the targets less, 100 % is random_label itself.
    "salun": {**_RELABEL, "salient_fraction": linear(0.1, 1.0)},
    # epsilon in input units (inputs in [0, 1]): 0.03 crossed 19 % of the boundary, 0.3 all of it.
    "boundary_shrink": {"epochs": integer(1, 4), "lr": log(0.001, 0.05), "epsilon": log(0.03, 0.3)},
    # gamma 0.1 collapsed the model to chance and 1e-3 was finetune; the range stops at half of 0.1.
    "l1_sparse": {**_FINETUNE, "gamma": log(1e-4, 0.05)},
    # temperature: the paper's 1, softer (2-4) and sharper (0.5) teachers.
    "bad_teacher": {**_RELABEL, "temperature": log(0.5, 4.0)},
    # epochs stays 12 so every max_epochs in 1..8 is valid (scrub needs max_epochs <= epochs); the
    # amount of forgetting follows lr × max_epochs; the clip bounds each max-step.
    "scrub": {"lr": log(0.005, 0.1), "max_epochs": integer(1, 8), "temperature": log(1.0, 8.0),
              "max_grad_norm": log(0.1, 2.0)},
    # alpha ≤ 3e-3 changed nothing and 0.02 already cost up to 15 points of test accuracy; max_std
    # around the trained weights' median |θ| (0.05-0.14).
    "fisher_forgetting": {"alpha": log(1e-3, 0.05), "max_std": log(0.01, 0.5)},
    # alpha selects parameters with I_forget > α I_full; with 50 of ~1350 samples forgotten the ratio
    # can reach ~27, so alpha spans 1 to the paper's 10 and beyond (α near 27 selects nothing); lam
    # from 10× gentler than the default to 2× stronger than the paper's 1.
    "ssd": {"alpha": log(1.0, 20.0), "lam": log(0.1, 3.0)},
    # The damping is the first one the trust region tries; it raises any whose step does not decrease
    # the retain objective (on the digits MLP it settled at 5e-4 to 5e-3), so the draws that matter are
    # those above that: up to 0.1, which shrinks the step for the directions of small curvature.
    # ggn and fisher are both PSD.
    "influence": {"damping": log(1e-5, 0.1), "curvature": choice("ggn", "fisher")},
}
