"""Training: determinism, recorded context, attach, checkpoints, the model zoo."""

from __future__ import annotations

import json

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.context import get_context


def _fresh(ds, seed=0, name="mlp", **options):
    torch.manual_seed(seed)
    return uf.build_model(name, ds.input_shape, ds.num_classes, **options)


def _train(ds, seed=0):
    return uf.train(_fresh(ds), ds, epochs=2, lr=0.1, batch_size=32, weight_decay=1e-3, seed=seed, device="cpu", progress=False)


def _same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_is_deterministic_per_seed(small_digits):
    a, b, c = _train(small_digits, 0), _train(small_digits, 0), _train(small_digits, 1)
    assert _same_params(a, b)
    assert not _same_params(a, c)


def test_training_learns(small_digits):
    model = uf.train(_fresh(small_digits), small_digits, epochs=10, lr=0.1, batch_size=64, seed=0, device="cpu", progress=False)
    x, y = small_digits.test.tensors
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_context_is_recorded(trained_mlp, small_digits):
    ctx = get_context(trained_mlp)
    assert ctx.data is small_digits.train and ctx.similar == small_digits.similar
    assert ctx.loss == "cross_entropy" and ctx.weight_decay == 5e-4 and ctx.removed_ids == ()
    assert ctx.recipe["epochs"] == 3 and ctx.recipe["seed"] == 0 and ctx.recipe["optimizer"] == "sgd"
    assert set(ctx.initial_state) == set(trained_mlp.state_dict())


def test_copying_a_model_shares_the_data(trained_mlp):
    import copy

    clone = copy.deepcopy(trained_mlp)
    assert get_context(clone).data is get_context(trained_mlp).data


def test_attach(small_digits):
    model = uf.attach(_fresh(small_digits), small_digits.train, "mse", weight_decay=0.1, similar={1: [2]})
    ctx = get_context(model)
    assert ctx.loss == "mse" and ctx.weight_decay == 0.1 and ctx.similar == {1: [2]} and ctx.recipe == {}
    assert get_context(uf.attach(_fresh(small_digits), small_digits)).similar == small_digits.similar


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"lr": -1.0}, "lr must be a number"),
    ({"batch_size": 2.5}, "batch_size must be an int"),
    ({"weight_decay": -0.1}, "weight_decay must be a number"),
    ({"schedule": "step"}, "valid choices: 'constant', 'cosine'"),
    ({"loss": "hinge"}, "valid losses: cross_entropy, mse"),
    ({"device": "tpu"}, "device='tpu' is not valid"),
])
def test_train_bad_input(small_digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        uf.train(_fresh(small_digits), small_digits, **{"progress": False, "epochs": 1, **kwargs})


def test_model_without_context_errors(small_digits):
    with pytest.raises(ValueError, match="unlearn_fast.attach"):
        get_context(_fresh(small_digits))


def test_checkpoint_roundtrip(trained_mlp, small_digits, tmp_path):
    tensors, meta = uf.save_checkpoint(trained_mlp, tmp_path / "ckpt" / "model")
    assert tensors.name == "model.safetensors" and meta.name == "model.json"
    recorded = json.loads(meta.read_text())
    assert recorded["model"]["name"] == "mlp" and recorded["recipe"]["epochs"] == 3 and recorded["loss"] == "cross_entropy"
    loaded = uf.load_checkpoint(tmp_path / "ckpt" / "model.safetensors", data=small_digits)
    assert _same_params(loaded, trained_mlp)
    assert get_context(loaded).recipe == get_context(trained_mlp).recipe
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]


def test_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uf.load_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_model_zoo_shapes(name, shape):
    options = {"width": 8} if name == "resnet18" else {}
    model = uf.build_model(name, shape, 10, **options).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    assert model.unlearn_fast_spec["name"] == name


def test_model_zoo_bad_input():
    with pytest.raises(ValueError, match="valid models: mlp, cnn, resnet18"):
        uf.build_model("vit", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        uf.build_model("mlp", (1, 8, 8), 1)
    with pytest.raises(ValueError, match="input_shape"):
        uf.build_model("mlp", (8, 8), 10)
