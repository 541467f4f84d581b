"""Relearn time on cases with a known answer."""

from __future__ import annotations

import torch
from torch import nn

import unlearn_fast as uf
from unlearn_fast.evaluate import Evaluation, compute_metrics
from unlearn_fast.evaluate.relearn import RELEARN_MAX_STEPS, relearn_steps_to


def test_zero_steps_when_already_there_and_censored_when_never():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    right = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        right.weight.copy_(torch.eye(2))
    assert relearn_steps_to(right, "cross_entropy", x, y, goal=1.0, device=torch.device("cpu")) == 0
    wrong = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        wrong.weight.copy_(-torch.eye(2))
    # lr 0 cannot learn: never reaches the goal, so the count is censored at max_steps + 1
    assert relearn_steps_to(wrong, "cross_entropy", x, y, goal=1.0, device=torch.device("cpu"), lr=0.0, max_steps=5) == 6
    assert torch.equal(right.weight, torch.eye(2))  # the model itself is untouched


def test_a_larger_step_relearns_faster():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    wrong = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        wrong.weight.copy_(-torch.eye(2))
    slow = relearn_steps_to(wrong, "cross_entropy", x, y, 1.0, torch.device("cpu"), lr=0.5)
    fast = relearn_steps_to(wrong, "cross_entropy", x, y, 1.0, torch.device("cpu"), lr=2.0)
    assert 0 < fast < slow <= RELEARN_MAX_STEPS


def test_original_relearns_at_once_and_the_oracle_takes_longer(quick_task):
    refs = {"original": Evaluation(quick_task.original, quick_task.data),
            "oracle": Evaluation(quick_task.oracle, quick_task.data)}
    steps = {name: compute_metrics(Evaluation(model, quick_task.data, references=refs), ["relearn_steps"])["relearn_steps"]
             for name, model in (("original", quick_task.original), ("oracle", quick_task.oracle))}
    assert steps["original"] == 0
    assert steps["oracle"] > 0, steps  # the oracle misses some targets (accuracy 0.90 against 1.0)
    assert uf.METRICS.get("relearn_steps").description
