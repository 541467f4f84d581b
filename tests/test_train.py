"""Training: determinism, recorded context, attach, checkpoints, the model zoo."""

from __future__ import annotations

import json

import pytest
import torch

import unlearn_fast as uf
from helpers import same_params
from unlearn_fast.context import get_context


def _fresh(ds, seed=0, name="mlp", **options):
    torch.manual_seed(seed)
    return uf.build_model(name, ds.input_shape, ds.num_classes, **options)


def _train(ds, seed=0):
    return uf.train(_fresh(ds), ds, epochs=2, lr=0.1, batch_size=32, weight_decay=1e-3, seed=seed, device="cpu", progress=False)



def test_training_is_deterministic_per_seed(small_digits):
    a, b, c = _train(small_digits, 0), _train(small_digits, 0), _train(small_digits, 1)
    assert same_params(a, b)
    assert not same_params(a, c)


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
    ({"epochs": 0}, "epochs=0 must be an int >= 1"),
    ({"lr": -1.0}, "lr=-1.0 must be a finite number"),
    ({"batch_size": 2.5}, "batch_size=2.5 must be an int"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number"),
    ({"schedule": "step"}, "valid choices: 'constant', 'cosine'"),
    ({"loss": "hinge"}, "valid losses: cross_entropy, mse"),
    ({"device": "tpu"}, "device='tpu' is not valid"),
])
def test_train_bad_input(small_digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        uf.train(_fresh(small_digits), small_digits, **{"progress": False, "epochs": 1, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"similar": [1, 2]}, "similar must be a dict"),
    ({"similar": {0: [10**6]}}, r"similar\[0\] has ids outside"),
    ({"recipe": {"foo": 1}}, r"unknown key\(s\) \['foo'\]; valid keys: optimizer, epochs"),
    ({"weight_decay": float("inf")}, "weight_decay=inf must be a finite number"),
])
def test_attach_bad_input(small_digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        uf.attach(_fresh(small_digits), small_digits.train, **kwargs)


def test_attach_and_train_reject_non_models_and_non_data(small_digits):
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        uf.attach("x", small_digits)
    with pytest.raises(ValueError, match="data must be a map-style torch Dataset or a SimilarDataset, got int"):
        uf.train(_fresh(small_digits), 5, progress=False)
    with pytest.raises(ValueError, match="momentum=1.0 must be a finite number in"):
        uf.train(_fresh(small_digits), small_digits, momentum=1.0, progress=False)


def test_train_on_a_plain_dataset_with_mse(small_digits):
    x = small_digits.train.tensors[0][:64]
    targets = torch.nn.functional.one_hot(small_digits.train.tensors[1][:64], 10).float()
    plain = [(x[i], targets[i]) for i in range(64)]  # a list is a map-style dataset
    model = uf.train(_fresh(small_digits), plain, loss="mse", epochs=2, device="cpu", progress=False)
    assert get_context(model).loss == "mse"
    with pytest.raises(ValueError, match="for class labels use loss='cross_entropy'"):
        uf.train(_fresh(small_digits), small_digits, loss="mse", epochs=1, progress=False)


def test_model_without_context_errors(small_digits):
    with pytest.raises(ValueError, match="unlearn_fast.attach"):
        get_context(_fresh(small_digits))


def test_checkpoint_roundtrip(trained_mlp, small_digits, tmp_path):
    tensors, meta = uf.save_checkpoint(trained_mlp, tmp_path / "ckpt" / "model")
    assert tensors.name == "model.safetensors" and meta.name == "model.json"
    recorded = json.loads(meta.read_text())
    assert recorded["model"]["name"] == "mlp" and recorded["recipe"]["epochs"] == 3 and recorded["loss"] == "cross_entropy"
    loaded = uf.load_checkpoint(tmp_path / "ckpt" / "model.safetensors", data=small_digits)
    assert same_params(loaded, trained_mlp)
    assert get_context(loaded).recipe == get_context(trained_mlp).recipe
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]


def test_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uf.load_checkpoint(tmp_path / "nothing")


def test_checkpoint_names_with_dots_do_not_collide(trained_mlp, tmp_path):
    a = uf.save_checkpoint(trained_mlp, tmp_path / "lr0.1")
    b = uf.save_checkpoint(trained_mlp, tmp_path / "lr0.2")
    assert [p.name for p in a] == ["lr0.1.safetensors", "lr0.1.json"] and a != b
    assert len(list(tmp_path.iterdir())) == 4


def test_checkpoint_keeps_initial_weights_for_retrain(small_digits, tmp_path):
    torch.manual_seed(5)  # init seed differs from the recipe seed on purpose
    model = uf.build_model("mlp", small_digits.input_shape, 10, hidden=(16,))
    model = uf.train(model, small_digits, epochs=1, seed=0, device="cpu", progress=False)
    uf.save_checkpoint(model, tmp_path / "m")
    loaded = uf.load_checkpoint(tmp_path / "m", data=small_digits)
    before = uf.unlearn(model, [0], "retrain", progress=False)
    after = uf.unlearn(loaded, [0], "retrain", progress=False)
    assert same_params(before, after)


def test_checkpoint_mismatch_and_corruption(trained_mlp, tmp_path):
    uf.save_checkpoint(trained_mlp, tmp_path / "a")
    other = uf.build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    uf.save_checkpoint(other, tmp_path / "b")
    (tmp_path / "b.json").replace(tmp_path / "a.json")
    with pytest.raises(ValueError, match="truncated or replaced after the save"):
        uf.load_checkpoint(tmp_path / "a")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="a.json is not valid JSON"):
        uf.load_checkpoint(tmp_path / "a")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        uf.save_checkpoint("model", tmp_path / "c")


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_model_zoo_shapes(name, shape):
    options = {"width": 8} if name == "resnet18" else {}
    model = uf.build_model(name, shape, 10, **options).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    assert model.unlearn_fast_spec["name"] == name


def test_model_zoo_bad_input():
    with pytest.raises(ValueError, match="valid models: mlp, cnn, resnet18"):
        uf.build_model("vit", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="num_classes=1 must be an int >= 2"):
        uf.build_model("mlp", (1, 8, 8), 1)
    for shape in [(8, 8), "abc", 5, (1, 0, 8)]:
        with pytest.raises(ValueError, match="input_shape"):
            uf.build_model("mlp", shape, 10)
    with pytest.raises(ValueError, match=r"hidden=\(0,\) must be a positive int"):
        uf.build_model("mlp", (1, 8, 8), 10, hidden=(0,))
    with pytest.raises(ValueError, match="channels=.* must be two widths"):
        uf.build_model("cnn", (1, 8, 8), 10, channels=(16,))
