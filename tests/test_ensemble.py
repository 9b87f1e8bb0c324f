"""Ensembles (`age-detect ensemble`): models of any backbones on one face crop, their predicted
distributions mixed by weight, saved and loaded as one model, refused where they do not fit together,
a run folder calibrated on validation faces that none of its members trained on, and `--init` from an
ensemble fine-tuning its main member."""

from __future__ import annotations

import logging
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from age_detect_resnet.cli.ensemble import main as ensemble_main
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.inference.backends import load_runner
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.ensemble import AgeEnsemble, EnsembleError
from age_detect_resnet.modeling.model import create_model
from conftest import assert_combined_run, train_tiny


def _model(seed: int, backbone: str = "mobilenet_v2", head: str = "distribution", image_size: int = 40):
    torch.manual_seed(seed)
    model = create_model(backbone, head, pretrained=False).eval()
    with torch.no_grad():  # a head whose outputs differ clearly from model to model
        model.head.layers[-1].weight.normal_(0, 0.5)
        model.head.layers[-1].bias.normal_(0, 2.0)
    model.metadata = {"image_size": image_size, "seed": seed}
    return model


def _images(count: int = 4, size: int = 40) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)


def test_the_ensemble_mixes_its_members_distributions_by_weight():
    first, second = _model(0), _model(1, backbone="resnet18")
    ensemble = AgeEnsemble([first, second], [1, 3]).eval()
    images = _images()
    with torch.no_grad():
        a, b, mixed = first(images), second(images), ensemble(images)
        expected = 0.25 * first.head.probabilities(a) + 0.75 * second.head.probabilities(b)
        torch.testing.assert_close(ensemble.head.probabilities(mixed), expected)
        ages = ensemble.predict(images)
        torch.testing.assert_close(
            ages["age"], 0.25 * first.predict_ages(images) + 0.75 * second.predict_ages(images)
        )
    assert not torch.allclose(first.predict_ages(images), second.predict_ages(images), atol=1.0)
    assert (ages["lower"] <= ages["age"]).all() and (ages["age"] <= ages["upper"]).all()
    assert ensemble.describe()["backbone"] == "mobilenet_v2 + resnet18"


def test_regression_members_give_the_weighted_mean_age():
    first, second = _model(0, head="regression"), _model(1, head="regression")
    ensemble = AgeEnsemble([first, second], [3, 1]).eval()
    images = _images()
    with torch.no_grad():
        got = ensemble.predict_ages(images)
        expected = 0.75 * first.predict_ages(images) + 0.25 * second.predict_ages(images)
    torch.testing.assert_close(got, expected)


def test_an_ensemble_saves_and_loads_as_one_model_with_fp16_backbones(tmp_path):
    ensemble = AgeEnsemble([_model(0), _model(1, backbone="resnet18")], [1, 1]).eval()
    path = tmp_path / "best.safetensors"
    checkpoint.save_model(ensemble, path, {"image_size": 40}, dtype=torch.float16)
    stored = load_file(str(path))
    convolutions = [k for k, v in stored.items() if ".backbone." in k and v.ndim >= 2]
    assert convolutions and all(stored[k].dtype == torch.float16 for k in convolutions)
    assert all(k.startswith(("members.0.", "members.1.", "head.")) for k in stored)
    readout = sum(v.numel() for k, v in stored.items() if k.startswith("head."))
    assert readout < 500  # the readout head's own layers are 1 feature wide: no copied weights

    loaded = checkpoint.load_model(path)
    assert isinstance(loaded, AgeEnsemble) and loaded.metadata["image_size"] == 40
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict_ages(images), ensemble.predict_ages(images), atol=0.05, rtol=0
        )
    runner, metadata = load_runner(path)
    assert metadata["model"]["weights"] == [0.5, 0.5]
    assert runner(images)["age"].shape == (4,)


def test_models_that_do_not_fit_together_are_refused():
    with pytest.raises(EnsembleError, match="at least two"):
        AgeEnsemble([_model(0)])
    with pytest.raises(EnsembleError, match="same outputs"):
        AgeEnsemble([_model(0), _model(1, head="regression")], names=["a", "b"])
    with pytest.raises(EnsembleError, match="size or framing"):
        AgeEnsemble([_model(0), _model(1, image_size=64)])
    with pytest.raises(EnsembleError, match="one weight per model"):
        AgeEnsemble([_model(0), _model(1)], [1.0])
    with pytest.raises(EnsembleError, match="zero or more"):
        AgeEnsemble([_model(0), _model(1)], [1.0, -1.0])


def test_ensemble_writes_a_calibrated_run_folder_and_refuses_a_member_that_saw_its_test_faces(
    utkface_sample, tmp_path, caplog
):
    first = train_tiny(utkface_sample, tmp_path / "first", "--head", "distribution")
    # Another model on the same split: another seed for its weights and batches, the split's seed kept.
    second = train_tiny(
        utkface_sample, tmp_path / "second", "--head", "distribution", "--seed", "1", "--split-seed", "0"
    )
    out = tmp_path / "ensemble"
    args = [str(first), str(second), "--weights", "1,3", "--out", str(out), "--num-workers", "0"]
    assert ensemble_main(args) == 0
    model = checkpoint.load_model(out)
    assert isinstance(model, AgeEnsemble)
    assert_combined_run(out, model, "ensemble_of", [first, second], [0.25, 0.75])

    # A member whose split is another one has seen some of the calibration run's held-out faces.
    other = tmp_path / "other"
    shutil.copytree(second, other)
    split = pd.read_csv(other / "split.csv")
    split.loc[split.index[split["split"] == "test"][:1], "split"] = "train"
    split.to_csv(other / "split.csv", index=False)
    refused = tmp_path / "refused"
    assert ensemble_main([str(first), str(other), "--out", str(refused), "--calibrate-on", str(first)]) == 2
    assert "trained on 1 of the validation and test images" in caplog.text and not refused.exists()
    # An existing model is never overwritten.
    before = (out / "best.safetensors").read_bytes()
    assert ensemble_main(args) == 2
    assert "already exists" in caplog.text and (out / "best.safetensors").read_bytes() == before

    # Training from an ensemble fine-tunes its member of the largest weight (here the second, 3 of 4).
    caplog.set_level(logging.INFO)
    tuned = tmp_path / "tuned"
    source = ["--dataset", "utkface", "--data-root", str(utkface_sample), "--out", str(tuned)]
    settings = ["--image-size", "40", "--batch-size", "8", "--num-workers", "0", "--no-progress"]
    assert train_main([*source, *settings, "--init", str(out), "--epochs", "1", "--lr", "0"]) == 0
    assert "fine-tuning its member 2, mobilenet_v2" in caplog.text
    started, member = load_file(str(tuned / "best.safetensors")), load_file(str(second / "best.safetensors"))
    convolution = next(k for k, v in member.items() if k.startswith("backbone.") and v.ndim == 4)
    torch.testing.assert_close(started[convolution], member[convolution])  # lr 0: the member's weights
