"""SSIM on hand-computed cases and the reconstruction (model-inversion) metrics."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import unlearn_fast as uf
from unlearn_fast.data import SimilarDataset
from unlearn_fast.evaluate import Evaluation, compute_metrics
from unlearn_fast.evaluate import reconstruction as rec
from unlearn_fast.evaluate.reconstruction import invert, total_variation
from unlearn_fast.evaluate.ssim import K1, K2, ssim, window_size


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in these tests: an inversion is hundreds of tiny ops, which a second
    thread only synchronises (on a busy 2-core machine its spinning made this file 10-20× slower).
    Function scope, so the session fixtures (trained_mlp) are built before it, with the suite's threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(3, 10), st.integers(3, 10))


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ SSIM


@settings(max_examples=15, deadline=None)
@given(shape=image_shapes, seed=st.integers(0, 2**16))
def test_ssim_of_an_image_with_itself_is_one_and_symmetric(shape, seed):
    a, b = _images(shape, seed), _images(shape, seed + 1)
    assert torch.allclose(ssim(a, a), torch.ones(shape[0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(a, b), ssim(b, a), atol=1e-12)
    assert ssim(a, b).shape == (shape[0],) and (ssim(a, b) <= 1 + 1e-12).all()


def test_ssim_of_constant_images_is_the_luminance_term():
    # σ = 0 everywhere: the contrast-structure factor is C2/C2 = 1, leaving (2ab + C1)/(a² + b² + C1).
    a, b = torch.full((1, 1, 8, 8), 0.2, dtype=torch.float64), torch.full((1, 1, 8, 8), 0.6, dtype=torch.float64)
    c1 = (K1 * 1.0) ** 2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-12)
    # Scaling the pixels and the data range together leaves the index unchanged.
    assert ssim(255 * a, 255 * b, data_range=255.0).item() == pytest.approx(ssim(a, b).item(), rel=1e-12)


def test_ssim_hand_case_with_one_uniform_window():
    # A 3×3 "plus" against a flat 0.5 image: one 3×3 window. μa = 5/9, μb = 1/2; sample variance
    # σa² = (Σa² − 9μa²)/8 = (5 − 25/9)/8 = 5/18; σb² = 0 and σab = 0.
    plus = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
    flat = torch.full((3, 3), 0.5)
    c1, c2 = K1**2, K2**2
    mu_a, mu_b, var_a = 5 / 9, 0.5, 5 / 18
    expected = (2 * mu_a * mu_b + c1) * c2 / ((mu_a**2 + mu_b**2 + c1) * (var_a + c2))
    assert ssim(plus[None], flat[None]).item() == pytest.approx(expected, rel=1e-12)
    # Negated structure: b = 1 − a has σab = −σa², so the structure term is (−2σa² + C2)/(2σa² + C2).
    expected_neg = (2 * mu_a * (1 - mu_a) + c1) * (-2 * var_a + c2) / ((mu_a**2 + (1 - mu_a) ** 2 + c1) * (2 * var_a + c2))
    assert ssim(plus[None], 1 - plus[None]).item() == pytest.approx(expected_neg, rel=1e-12)


def test_ssim_window_fits_the_images_and_three_dim_input_is_one_channel():
    assert window_size(7, 8, 8) == 7 and window_size(11, 8, 8) == 7 and window_size(7, 4, 9) == 3 and window_size(8, 28, 28) == 7
    a, b = _images((4, 5, 6), 0), _images((4, 5, 6), 1)
    assert torch.equal(ssim(a, b), ssim(a[:, None], b[:, None]))
    with pytest.raises(ValueError, match=r"at least 3 × 3.*2 × 5"):
        ssim(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="window=2"):
        ssim(a, b, window=2)


def test_ssim_input_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\) and \(2, 1, 8, 7\)"):
        ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 7))
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), data_range=0)


def test_ssim_decreases_as_noise_grows(small_digits):
    clean = small_digits.train.tensors[0][:20].double()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = [ssim(clean, (clean + level * noise).clamp(0, 1)).mean().item() for level in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert values[0] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values


@settings(max_examples=10, deadline=None)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(7, 12), st.integers(7, 12)), seed=st.integers(0, 2**16))
def test_ssim_agrees_with_scikit_image(shape, seed):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _images(shape, seed), _images(shape, seed + 1)
    b = (a + 0.3 * b).clamp(0, 1)  # related images, so the index is far from 0
    ours = ssim(a, b)
    for i in range(shape[0]):
        theirs = metrics.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, channel_axis=0)
        assert ours[i].item() == pytest.approx(float(theirs), abs=1e-10)


def test_ssim_matches_values_recorded_from_scikit_image():
    # scikit-image 0.26.0, structural_similarity(a, b, data_range=1.0, channel_axis=0) on these seeded
    # images (numpy's PCG64 stream is stable across versions): the check runs where scikit-image is absent.
    import numpy as np

    recorded = {(1, 8, 8): 0.89455666914469, (3, 9, 13): 0.9174897366180983, (2, 28, 28): 0.9300892184021269}
    rng = np.random.default_rng(2026)
    for shape, theirs in recorded.items():
        a = rng.random(shape)
        b = np.clip(a + 0.3 * rng.random(shape), 0, 1)
        ours = ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None])
        assert ours.item() == pytest.approx(theirs, abs=1e-10)


# ------------------------------------------------------------------------------------------------ invert


def test_total_variation_hand_case():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # |Δh| sum 1, |Δw| sum 1, 4 pixels
    assert total_variation(x).tolist() == [pytest.approx(0.5)]


def test_invert_is_deterministic_and_starts_from_the_seed_alone(trained_mlp):
    labels = torch.tensor([0, 3, 3, 7])
    one = invert(trained_mlp, labels, (1, 8, 8), steps=20, seed=5)
    assert torch.equal(one, invert(trained_mlp, labels, (1, 8, 8), steps=20, seed=5))
    assert not torch.equal(one, invert(trained_mlp, labels, (1, 8, 8), steps=20, seed=6))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert torch.equal(invert(trained_mlp, labels, (1, 8, 8), steps=0, seed=5), invert(other, labels, (1, 8, 8), steps=0, seed=5))
    # Each image's objective is its own: a label's reconstruction does not depend on the batch.
    assert torch.allclose(invert(trained_mlp, labels[:2], (1, 8, 8), steps=20, seed=5), one[:2], atol=1e-6)


def test_invert_stays_in_range_and_raises_the_label_probability(trained_mlp):
    labels = torch.arange(10)
    start = invert(trained_mlp, labels, (1, 8, 8), steps=0, value_range=(0.2, 0.7))
    out = invert(trained_mlp, labels, (1, 8, 8), value_range=(0.2, 0.7))
    assert out.shape == (10, 1, 8, 8) and out.min() >= 0.2 and out.max() <= 0.7
    with torch.no_grad():
        before = torch.softmax(trained_mlp(start), 1)[labels, labels]
        after = torch.softmax(trained_mlp(out), 1)[labels, labels]
    assert (after > before).all() and after.min() > 0.5, (before, after)  # 3 epochs, a narrowed range: not saturated


def test_invert_recovers_an_image_that_a_class_holds_alone(small_digits):
    # Positive control: ten classes of one image each (20 noisy copies). The inversion for a class
    # should recover its image, far more like it than like the other classes' images.
    x_all, y_all = small_digits.train.tensors
    images = torch.stack([x_all[(y_all == c).nonzero()[0, 0]] for c in range(10)])
    x = (images.repeat(20, 1, 1, 1) + 0.05 * torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    y = torch.arange(10).repeat(20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out = invert(model, torch.arange(10), (1, 8, 8))
    table = torch.stack([ssim(out, images[[j] * 10]) for j in range(10)], 1)  # [reconstruction i, image j]
    assert (table.argmax(1) == torch.arange(10)).all(), table
    assert table.diag().mean() > 0.4 and table.diag().mean() > (table.sum() - table.diag().sum()) / 90 + 0.3


def test_invert_leaves_the_model_untouched(trained_mlp):
    model = copy.deepcopy(trained_mlp)
    model.train()
    model[0].eval()  # mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    invert(model, torch.tensor([1, 2]), (1, 8, 8), steps=5)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


def test_invert_input_errors(trained_mlp):
    with pytest.raises(ValueError, match="integer class ids"):
        invert(trained_mlp, torch.tensor([0.5]), (1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 9\].*got 12"):
        invert(trained_mlp, torch.tensor([1, 12]), (1, 8, 8), steps=1)
    with pytest.raises(ValueError, match="image_shape"):
        invert(trained_mlp, torch.tensor([1]), (8, 8))
    with pytest.raises(ValueError, match="value_range"):
        invert(trained_mlp, torch.tensor([1]), (1, 8, 8), value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="steps"):
        invert(trained_mlp, torch.tensor([1]), (1, 8, 8), steps=-1)
    assert invert(trained_mlp, torch.zeros(0, dtype=torch.long), (1, 8, 8)).shape == (0, 1, 8, 8)


# ------------------------------------------------------------------------------------------------ metrics


def _untrained(data: SimilarDataset) -> nn.Module:
    torch.manual_seed(1)
    return uf.build_model("mlp", data.input_shape, data.num_classes, hidden=(32,))


def test_reconstruction_metrics_are_registered_and_consistent(small_digits, trained_mlp, monkeypatch):
    names = ["reconstruction_ssim_targets", "reconstruction_ssim_gap_to_oracle"]
    assert all(name in uf.METRICS and uf.METRICS.get(name).description for name in names)
    calls = []
    real_invert = rec.invert
    monkeypatch.setattr(rec, "invert", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    oracle = Evaluation(_untrained(small_digits), small_digits)
    ev = Evaluation(trained_mlp, small_digits, references={"oracle": oracle})
    out = compute_metrics(ev, names)
    assert -1 <= out["reconstruction_ssim_targets"] <= 1
    oracle_value = compute_metrics(oracle, ["reconstruction_ssim_targets"])["reconstruction_ssim_targets"]
    assert out["reconstruction_ssim_gap_to_oracle"] == pytest.approx(out["reconstruction_ssim_targets"] - oracle_value)
    assert len(calls) == 2  # one inversion per evaluation, however many metrics read it
    # The oracle against itself: no gap.
    assert compute_metrics(Evaluation(trained_mlp, small_digits, references={"oracle": Evaluation(trained_mlp, small_digits)}),
                           ["reconstruction_ssim_gap_to_oracle"])["reconstruction_ssim_gap_to_oracle"] == 0.0


def test_reconstruction_gap_needs_the_oracle(small_digits, trained_mlp):
    with pytest.raises(ValueError, match="'oracle' reference"):
        compute_metrics(Evaluation(trained_mlp, small_digits), ["reconstruction_ssim_gap_to_oracle"])


def _flat_dataset(labels: torch.Tensor) -> SimilarDataset:
    x = torch.rand(12, 64, generator=torch.Generator().manual_seed(0))
    return SimilarDataset("flat", TensorDataset(x, labels), TensorDataset(x[:4], labels[:4]), forget_ids=[0, 1],
                          similar={0: [5], 1: []}, info={"num_classes": 10, "input_shape": [64]})


def test_reconstruction_metrics_need_images_and_class_labels():
    model = nn.Linear(64, 10)
    with pytest.raises(ValueError, match=r"image inputs \[N, C, H, W\].*\(64,\)"):
        compute_metrics(Evaluation(model, _flat_dataset(torch.arange(12) % 10)), ["reconstruction_ssim_targets"])
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    regression = SimilarDataset("regression", TensorDataset(images, torch.rand(12)), TensorDataset(images[:4], torch.rand(4)),
                                forget_ids=[0], similar={0: []}, info={"num_classes": 1, "input_shape": [1, 8, 8]})
    with pytest.raises(ValueError, match="class-id labels.*float32"):
        compute_metrics(Evaluation(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), regression, loss="mse"),
                        ["reconstruction_ssim_targets"])
