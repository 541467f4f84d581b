"""Relearn time: how quickly fine-tuning on the forget targets brings back what the original knew.

A method that only hides the targets (suppressing their outputs while their influence stays in the
weights) regains them in a few steps; a model that never learned them, like the oracle, needs about
as many as learning them afresh (Golatkar et al. 2020 and Tarun et al. 2023 use this "relearn time";
compare a method's value with the oracle's and the original's rows, not with a fixed number).
"""

from __future__ import annotations

import copy
import math

import torch

from ..losses import per_sample_loss
from ..modes import eval_mode
from .evaluation import Evaluation
from .registry import CLOSEST_TO_ORACLE, METRICS

RELEARN_LR = 0.01      # plain SGD, full batch of the targets, no momentum or weight decay
RELEARN_MAX_STEPS = 200  # a model still short of the goal after this many steps scores max + 1 (censored)


def relearn_steps_to(model: torch.nn.Module, loss, inputs: torch.Tensor, labels: torch.Tensor, goal: float,
                     device: torch.device, lr: float = RELEARN_LR, max_steps: int = RELEARN_MAX_STEPS) -> int:
    """Full-batch SGD steps on (inputs [n, ...], labels [n]) until a copy of ``model`` has top-1 accuracy
    ≥ ``goal`` on them; 0 if it already has, ``max_steps + 1`` if it never gets there. ``model`` is
    left untouched; the copy runs in eval mode (frozen normalisation statistics), so only the weights move."""
    work = copy.deepcopy(model).to(device)
    if not any(p.requires_grad for p in work.parameters()):
        raise ValueError("relearn_steps needs a model with trainable parameters (none requires grad)")
    x, y = inputs.to(device), labels.to(device)
    opt = torch.optim.SGD(work.parameters(), lr=lr)
    with eval_mode(work):
        for step in range(max_steps + 1):
            with torch.no_grad():
                accuracy = float((work(x).argmax(1) == y).double().mean())
            if accuracy >= goal:
                return step
            if step == max_steps:
                break
            opt.zero_grad(set_to_none=True)
            per_sample_loss(work, loss, (x, y)).mean().backward()
            opt.step()
    return max_steps + 1


# Relearning optimises a copy of every model: too slow for --quick (2.4 s of a 36 s default study).
@METRICS.register("relearn_steps", meta={"default": True, "quick": False, "best": CLOSEST_TO_ORACLE}, description=(
    f"SGD steps (full batch of the targets, lr {RELEARN_LR:g}) for a copy of the model to regain the original's "
    f"accuracy on the targets; {RELEARN_MAX_STEPS + 1} when it does not within {RELEARN_MAX_STEPS}."))
def relearn_steps(ev: Evaluation) -> float:
    """SGD steps (full batch of the targets, lr RELEARN_LR) for a copy of the model to regain the
    original's accuracy on the targets; RELEARN_MAX_STEPS + 1 when it does not within RELEARN_MAX_STEPS."""
    goal = float(ev.reference("original", "relearn_steps").outputs("targets").correct.mean())
    inputs, labels = ev.split_tensors("targets")
    if inputs.shape[0] == 0 or math.isnan(goal):
        return math.nan
    return float(relearn_steps_to(ev.model, ev.loss, inputs, labels, goal, ev.device))
