"""model_features (forward-hook features at a layer) and input_features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unlearn_fast.similarity.embeddings import input_features, model_features


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_default_is_the_input_of_the_last_linear(mlp):
    x = torch.randn(23, 8)
    mlp.train()
    feats = model_features(mlp, x, batch_size=5, device="cpu", progress=False)  # 5 batches, the last partial
    torch.testing.assert_close(feats, torch.relu(mlp[0](x)))  # dropout off: eval mode during the call
    assert mlp.training and all(m.training for m in mlp.modules())  # and each mode back afterwards


def test_named_layer_output_and_module_object(mlp):
    x = torch.randn(10, 8)
    torch.testing.assert_close(model_features(mlp, x, "0", at="output", device="cpu", progress=False), mlp[0](x))
    torch.testing.assert_close(model_features(mlp, x.numpy(), mlp[3], at="output", device="cpu", progress=False),
                               mlp.eval()(x))


def test_conv_features_are_flattened_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    x = torch.randn(6, 1, 8, 8)
    feats = model_features(model, x, "0", at="output", device="cpu", progress=False)
    torch.testing.assert_close(feats, model[0](x).reshape(6, -1))


def test_float64_model_keeps_its_dtype(mlp):
    x = torch.randn(4, 8, dtype=torch.float64)
    assert model_features(mlp.double(), x, device="cpu", progress=False).dtype == torch.float64


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


@pytest.mark.parametrize("call, match", [
    (lambda m, x: model_features(m, x, "nope", progress=False), r"layer='nope'.*'0', '1'"),
    (lambda m, x: model_features(m, x, nn.Linear(2, 2), progress=False), "not a submodule"),
    (lambda m, x: model_features(m, x, at="middle", progress=False), "at='middle'"),
    (lambda m, x: model_features(m, x, batch_size=0, progress=False), "batch_size=0"),
    (lambda m, x: model_features(m, x[:0], progress=False), "non-empty"),
    (lambda m, x: model_features(m, x.tolist(), progress=False), "tensor or numpy"),
    (lambda m, x: model_features(nn.Sequential(nn.ReLU()), x, progress=False), "no nn.Linear"),
    (lambda m, x: model_features(Twice(), torch.randn(3, 4), progress=False), "ran 2 times"),
])
def test_bad_input_is_named(mlp, call, match):
    with pytest.raises(ValueError, match=match):
        call(mlp, torch.randn(5, 8))


def test_input_features():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    feats = input_features(images)
    assert feats.shape == (2, 12) and feats.dtype == torch.float32
    assert input_features(torch.ones(5, dtype=torch.float64)).shape == (5, 1)
    with pytest.raises(ValueError, match="non-empty"):
        input_features(torch.zeros(0, 3))
