"""Safe loading: model files load without unpickling code; a changed, foreign or booby-trapped file is
refused with a message naming it, and its code never runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.checkpoint import ModelFileError
from age_detect_resnet.modeling.model import WeightsError, create_model, load_state_dict_file
from age_detect_resnet.training import state as training_state
from conftest import WEIGHTS, require


class CodeOnLoad:
    """Unpickling this creates the directory `marker`: a stand-in for any code hidden in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def saved_model(tmp_path) -> Path:
    model = create_model("mobilenet_v2", "regression", pretrained=False, init_age=30.0)
    path = tmp_path / "run" / "best.safetensors"
    checkpoint.save_model(model, path, {"image_size": 40, "age_range": [10, 75]})
    return path


def test_saved_model_loads_without_any_unpickling(saved_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model = checkpoint.load_model(saved_model.parent)
    assert model.metadata["image_size"] == 40 and not model.training


def test_a_changed_byte_is_refused_by_the_checksum(saved_model):
    data = bytearray(saved_model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    saved_model.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(saved_model)
    assert str(saved_model) in str(caught.value) and "checksum in best.json" in str(caught.value)


def test_a_model_without_its_metadata_is_refused(saved_model):
    saved_model.with_suffix(".json").unlink()
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(saved_model)
    assert str(saved_model) in str(caught.value) and "no metadata file best.json" in str(caught.value)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [("{not json", "is not valid JSON"), ('{"format": "someone-else/3"}', "not metadata of this project")],
    ids=["broken json", "foreign json"],
)
def test_metadata_that_this_project_did_not_write_is_refused(saved_model, metadata, message):
    saved_model.with_suffix(".json").write_text(metadata)
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(saved_model)
    assert "best.json" in str(caught.value) and message in str(caught.value)


def test_foreign_weights_are_refused_even_with_forged_metadata(saved_model):
    """Torchvision's ImageNet classifier dropped in as best.safetensors, with the checksum forged to match."""
    foreign = require(WEIGHTS / "mobilenet_v2_imagenet_fp16.safetensors")
    metadata = json.loads(saved_model.with_suffix(".json").read_text())
    shutil.copy(foreign, saved_model)
    with pytest.raises(ModelFileError, match="checksum"):
        checkpoint.load_model(saved_model)

    metadata["sha256"] = hashlib.sha256(saved_model.read_bytes()).hexdigest()
    saved_model.with_suffix(".json").write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(saved_model)
    assert str(saved_model) in str(caught.value) and "does not fit the architecture" in str(caught.value)


def test_a_corrupt_file_with_a_forged_checksum_is_refused(saved_model):
    saved_model.write_bytes(saved_model.read_bytes()[:5000])
    metadata = json.loads(saved_model.with_suffix(".json").read_text())
    metadata["sha256"] = hashlib.sha256(saved_model.read_bytes()).hexdigest()
    saved_model.with_suffix(".json").write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(saved_model)
    assert "is not a readable safetensors file" in str(caught.value)


def test_a_pickle_only_model_file_is_refused(tmp_path):
    model_file = tmp_path / "model.pth"
    torch.save(create_model("mobilenet_v2", pretrained=False), model_file)
    with pytest.raises(ModelFileError) as caught:
        checkpoint.load_model(model_file)
    assert "is not a .safetensors model" in str(caught.value)


def test_a_training_state_given_as_a_model_names_the_run_folder_to_pass(tmp_path):
    last = tmp_path / "last.pt"
    torch.save({"epoch": 1}, last)
    with pytest.raises(ModelFileError) as caught:  # was: "run it with --backend torchscript"
        checkpoint.load_model(last)
    assert "is a training state" in str(caught.value) and f"its run folder {tmp_path}" in str(caught.value)
    assert "torchscript" not in str(caught.value)


def test_training_state_with_code_is_refused_and_the_code_never_runs(tmp_path):
    marker, last = tmp_path / "code-ran", tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}, "extra": CodeOnLoad(marker)}, last)

    with pytest.raises(ModelFileError) as caught:
        training_state.read_state(last)
    assert str(last) in str(caught.value) and "not a training state this project wrote" in str(caught.value)
    assert not marker.exists()

    torch.load(last, weights_only=False)  # the file really carries code: unsafe loading runs it
    assert marker.exists()


def test_resume_from_a_booby_trapped_checkpoint_stops_without_running_it(utkface_sample, tmp_path, caplog):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    torch.save({"epoch": 1, "extra": CodeOnLoad(marker)}, out / "last.pt")
    args = shlex.split(
        "--dataset utkface --backbone mobilenet_v2 --no-pretrained --image-size 32 --epochs 2 --batch-size 8 "
        "--num-workers 0 --no-progress --grid-size 0 --no-tensorboard --resume"
    )
    args += ["--data-root", str(utkface_sample), "--out", str(out)]
    with caplog.at_level(logging.ERROR):
        assert train_main(args) == 2
    assert str(out / "last.pt") in caplog.text and "not a training state" in caplog.text
    assert not marker.exists()
    assert not (out / "metrics.csv").exists(), "no epoch ran on top of a refused checkpoint"


def test_backbone_weights_with_code_are_refused_and_the_code_never_runs(tmp_path):
    marker, weights = tmp_path / "code-ran", tmp_path / "resnet.pth"
    torch.save({"conv.weight": torch.zeros(1), "hook": CodeOnLoad(marker)}, weights)
    with pytest.raises(WeightsError) as caught:
        create_model("mobilenet_v2", weights=weights)
    assert str(weights) in str(caught.value) and "not a readable state dict" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("weights.safetensors", b"\x10\0\0\0\0\0\0\0{broken header}", "not a readable state dict"),
        ("weights.pth", b"PK\x03\x04 not really a zip", "not a readable state dict"),
        ("weights.pth", pickle.dumps([1, 2, 3], protocol=2), "not a readable state dict"),
    ],
    ids=["corrupt safetensors", "corrupt zip", "list pickle"],
)
def test_unusable_weights_files_raise_weights_error_naming_them(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError) as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_plain_state_dict_file_still_loads(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.arange(3.0))
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_state_dict_file(path)
