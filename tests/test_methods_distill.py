"""Distillation-based unlearning methods: bad_teacher (Chundawat et al. 2023) and scrub (Kurmanji et al. 2023)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import forget_report, same_params
from torch import nn

import unlearn_fast as uf
from unlearn_fast.evaluate import Evaluation
from unlearn_fast.methods import (
    METHODS,
    distill,  # registers bad_teacher and scrub
)

METHOD_NAMES = ("bad_teacher", "scrub")
# Test accuracy may fall at most this far below the original's. With their defaults both methods
# stayed within 0.025 of it on the quick task at seeds 0-2 (bad_teacher's seed 2 was the lowest).
TEST_ACC_DROP = 0.03


def _run(task, method: str, **hyper) -> nn.Module:
    return uf.unlearn(task.original, task.forget_all, method, device="cpu", progress=False, **hyper)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_moves_forget_set_toward_the_oracle(quick_task, method):
    before = copy.deepcopy(quick_task.original.state_dict())
    out = _run(quick_task, method)
    r = forget_report(quick_task, out)
    orig, oracle, got = r["original"], r["oracle"], r["method"]
    for key in ("target_loss", "similar_loss"):
        assert abs(got[key] - oracle[key]) < abs(orig[key] - oracle[key]), (key, r)
    assert got["test_acc"] >= orig["test_acc"] - TEST_ACC_DROP, r
    # The input model is untouched; the returned one records the removal.
    after = quick_task.original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(out.unlearn_fast_context.removed_ids) == set(quick_task.forget_all)
    assert out is not quick_task.original and not out.training
    assert METHODS.get(method).description


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_deterministic_on_cpu(quick_task, method):
    assert same_params(_run(quick_task, method), _run(quick_task, method))


@pytest.mark.parametrize("method, option, value", [
    ("bad_teacher", "retain_fraction", 0.0),
    ("bad_teacher", "retain_fraction", 1.5),
    ("bad_teacher", "temperature", 0.0),
    ("bad_teacher", "teacher_seed", -1),
    ("bad_teacher", "epochs", 0),
    ("bad_teacher", "lr", -0.1),
    ("scrub", "max_epochs", 0),
    ("scrub", "max_epochs", 13),  # more than the 12 default epochs
    ("scrub", "epochs", 0),
    ("scrub", "forget_batch_size", 0),
    ("scrub", "kl_weight", -1.0),
    ("scrub", "ce_weight", float("nan")),
    ("scrub", "temperature", -2.0),
    ("scrub", "max_grad_norm", 0.0),
    ("scrub", "lr", 0.0),
])
def test_bad_hyperparameters_raise(quick_task, method, option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        _run(quick_task, method, **{option: value})


def test_incompetent_teacher_is_a_seeded_fresh_init(quick_task):
    original = quick_task.original
    rng = torch.random.get_rng_state()
    t3, t3_again, t4 = (distill.incompetent_teacher(original, s) for s in (3, 3, 4))
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is left alone
    assert same_params(t3, t3_again) and not same_params(t3, t4)
    assert not same_params(t3, original)
    # It is the zoo's own initialisation drawn with that seed, and it is incompetent.
    spec = original.unlearn_fast_spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = uf.build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec["options"])
    assert same_params(t3, reference)
    assert float(Evaluation(t3, quick_task.data, device="cpu").outputs("test").correct.mean()) < 0.3
    # The same teacher seed gives the same unlearned model; another seed, another one.
    a, b, c = (_run(quick_task, "bad_teacher", teacher_seed=s) for s in (3, 3, 4))
    assert same_params(a, b) and not same_params(a, c)


def test_incompetent_teacher_without_a_zoo_spec():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    t1, t1_again, t2 = (distill.incompetent_teacher(model, s) for s in (1, 1, 2))
    assert same_params(t1, t1_again) and not same_params(t1, t2) and not same_params(t1, model)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(()))  # no reset_parameters covers it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    with pytest.raises(ValueError, match="scale"):
        distill.incompetent_teacher(Scaled(), 0)


def test_scrub_unclipped_and_all_max_epochs_run(quick_task):
    out = _run(quick_task, "scrub", epochs=2, max_epochs=2, lr=0.005, max_grad_norm=None)
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_distill_kl_is_zero_for_equal_logits_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    assert torch.allclose(distill.distill_kl(t, t, 2.0), torch.zeros(5), atol=1e-6)
    kl = distill.distill_kl(s, t, 1.0)
    manual = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1)
    assert kl.shape == (5,) and torch.allclose(kl, manual, atol=1e-6) and (kl > 0).all()
