"""Checkpoint integrity: damaged or edited files get errors that say what happened; the training data
is checked against the fingerprint the checkpoint records."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.context import data_fingerprint, get_context


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    data = uf.load_dataset("digits-blockmask", targets=5, copies=2, seed=0)
    torch.manual_seed(0)
    model = uf.build_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    model = uf.train(model, data, epochs=1, seed=0, device="cpu", progress=False)
    folder = tmp_path_factory.mktemp("ckpt")
    uf.save_checkpoint(model, folder / "m")
    return folder, data, model


def _copy(saved, tmp_path):
    folder, _, _ = saved
    for name in ("m.json", "m.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return tmp_path / "m"


def test_metadata_missing_a_key_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    meta = json.loads((tmp_path / "m.json").read_text())
    del meta["tensors_sha256"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['tensors_sha256'\]"):
        uf.load_checkpoint(path)


def test_truncated_tensors_are_called_truncated(saved, tmp_path):
    path = _copy(saved, tmp_path)
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"holds {len(blob) // 2} bytes where .*m.json records {len(blob)}: the file was truncated"):
        uf.load_checkpoint(path)


def test_a_damaged_file_whose_hash_matches_is_a_clear_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    blob = (tmp_path / "m.safetensors").read_bytes()[:100]
    (tmp_path / "m.safetensors").write_bytes(blob)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta.update(tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not a readable safetensors file .* saved damaged"):
        uf.load_checkpoint(path)


def test_the_training_data_is_checked(saved):
    folder, data, model = saved
    loaded = uf.load_checkpoint(folder / "m", data=data)
    assert get_context(loaded).fingerprint() == data_fingerprint(data) == get_context(model).fingerprint()
    other = uf.load_dataset("digits-blockmask", targets=5, copies=2, seed=1)
    with pytest.raises(ValueError, match="does not match the training data recorded in .*allow_other_data=True"):
        uf.load_checkpoint(folder / "m", data=other)
    with pytest.warns(UserWarning, match="will treat it as the training set"):
        attached = uf.load_checkpoint(folder / "m", data=other, allow_other_data=True)
    assert get_context(attached).fingerprint() == data_fingerprint(other)


def test_one_changed_label_changes_the_fingerprint(saved):
    _, data, _ = saved
    inputs, labels = get_context(saved[2]).tensors()
    changed = labels.clone()
    changed[3] = (changed[3] + 1) % 10
    same = torch.utils.data.TensorDataset(inputs, labels.clone())
    assert data_fingerprint(same) == data_fingerprint(data)
    assert data_fingerprint(torch.utils.data.TensorDataset(inputs, changed)) != data_fingerprint(data)


def test_format_2_still_loads_and_says_the_data_is_unchecked(saved, tmp_path):
    path = _copy(saved, tmp_path)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["format_version"] = 2
    for key in ("data_sha256", "tensors_bytes"):
        del meta[key]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no fingerprint of its training data"):
        uf.load_checkpoint(path, data=saved[1])
    meta["format_version"] = 7
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"format_version 7; readable: 2, 3"):
        uf.load_checkpoint(path)
