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
from age_detect_resnet.modeling import ensemble as ensemble_module
from age_detect_resnet.modeling.ensemble import AgeEnsemble, EnsembleError
from age_detect_resnet.modeling.model import create_model
from conftest import assert_combined_run, load_script, train_tiny


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


def test_a_mirrored_ensemble_mixes_each_face_with_its_mirror_image_and_is_saved_so(tmp_path):
    first, second = _model(0), _model(1, backbone="resnet18")
    images = _images()
    alone = AgeEnsemble([first], mirror=True).eval()  # one model is enough with its mirror image
    both = AgeEnsemble([first, second], [1, 3], mirror=True).eval()
    with torch.no_grad():
        p = [
            model.head.probabilities(model(view))
            for view in (images, images.flip(-1))
            for model in (first, second)
        ]
        torch.testing.assert_close(alone.head.probabilities(alone(images)), 0.5 * p[0] + 0.5 * p[2])
        expected = 0.125 * p[0] + 0.375 * p[1] + 0.125 * p[2] + 0.375 * p[3]
        torch.testing.assert_close(both.head.probabilities(both(images)), expected)
        # a face and its mirror image get the same age
        torch.testing.assert_close(both.predict_ages(images), both.predict_ages(images.flip(-1)))
        # a batch too large for the two views to share one batch per member gives the same outputs
        many = torch.cat([images, _images(count=2 * ensemble_module.SHARED_VIEWS_MAX_BATCH)])
        torch.testing.assert_close(both(many)[: len(images)], both(images), atol=1e-4, rtol=1e-4)
    assert both.describe()["mirror"] is True and "mirror" not in AgeEnsemble([first, second]).describe()

    path = tmp_path / "best.safetensors"
    checkpoint.save_model(both, path, {"image_size": 40})
    loaded = checkpoint.load_model(path)
    assert isinstance(loaded, AgeEnsemble) and loaded.mirror
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_ages(images), both.predict_ages(images), atol=0.05, rtol=0)


def test_flip_averaging_a_mirrored_ensemble_does_not_run_it_twice():
    from age_detect_resnet.modeling.model import raw_outputs

    model = _model(0)
    seen = []  # images the member ran on, call by call
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    mirrored = AgeEnsemble([model], mirror=True).eval()
    with torch.no_grad():
        once = mirrored(_images())
        assert sum(seen) == 8  # the 4 faces and their mirror images
        torch.testing.assert_close(raw_outputs(mirrored, _images(), tta_flip=True), once)
    assert sum(seen) == 16  # --tta adds nothing to a model that mirrors already


def test_an_ensemble_among_the_members_is_taken_apart():
    first, second, third = _model(0), _model(1, backbone="resnet18"), _model(2)
    inner = AgeEnsemble([first, second], [1, 3]).eval()
    outer = AgeEnsemble([inner, third], [1, 1]).eval()
    assert list(outer.members) == [first, second, third] and not outer.mirror
    torch.testing.assert_close(outer.weights, torch.tensor([0.125, 0.375, 0.5]))
    assert all(
        name.startswith(("members.0.", "members.1.", "members.2.", "head.")) for name in outer.state_dict()
    )
    # a mirrored ensemble stays mirrored inside another one, unless mirror=False says otherwise
    mirrored = AgeEnsemble([first, second], mirror=True)
    assert AgeEnsemble([mirrored, third]).mirror
    plain = AgeEnsemble([mirrored], mirror=False)
    assert not plain.mirror and list(plain.members) == [first, second] and "mirror" not in plain.describe()


def test_models_that_do_not_fit_together_are_refused():
    with pytest.raises(EnsembleError, match="at least two models, or one with its mirror image"):
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

    # The ensemble with each face's mirror image: its members taken apart, calibrated on its split.
    mirrored = tmp_path / "mirrored"
    assert ensemble_main([str(out), "--mirror", "--out", str(mirrored), "--num-workers", "0"]) == 0
    model = checkpoint.load_model(mirrored)
    assert isinstance(model, AgeEnsemble) and model.mirror and len(model.members) == 2
    torch.testing.assert_close(model.weights, torch.tensor([0.25, 0.75]))
    assert [s["weight"] for s in model.metadata["ensemble_of"]] == [1.0]
    assert (mirrored / "split.csv").read_bytes() == (out / "split.csv").read_bytes()
    plain = tmp_path / "plain"  # and without the mirror views again
    assert ensemble_main([str(mirrored), "--no-mirror", "--out", str(plain), "--num-workers", "0"]) == 0
    assert not checkpoint.load_model(plain).mirror

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


def test_a_member_of_an_ensemble_is_written_as_a_model_of_its_own(tmp_path, capsys):
    tool = load_script("experiments/ensemble_member.py")
    members = [_model(0), _model(1, backbone="resnet18")]
    path = tmp_path / "ensemble.safetensors"
    checkpoint.save_model(
        AgeEnsemble(members, [3, 1], mirror=True).eval(), path, {"image_size": 40}, dtype=torch.float16
    )
    out = tmp_path / "member" / "best.safetensors"
    assert tool.main([str(path), "2", str(out)]) == 0
    member = checkpoint.load_model(out)
    assert not isinstance(member, AgeEnsemble) and member.backbone_name == "resnet18"
    assert member.metadata["image_size"] == 40 and member.metadata["member_of"]["member"] == 2
    stored = load_file(str(out))
    convolutions = [v for k, v in stored.items() if k.startswith("backbone.") and v.ndim >= 2]
    assert convolutions and all(v.dtype == torch.float16 for v in convolutions)
    images = _images()
    with torch.no_grad():  # the member's own ages, not the ensemble's (fp16 weights: within rounding)
        torch.testing.assert_close(
            member.predict_ages(images), members[1].predict_ages(images), atol=0.05, rtol=0
        )
    assert tool.main([str(out), "1", str(tmp_path / "again.safetensors")]) == 2
    assert "is one model, not an ensemble" in capsys.readouterr().err
    assert tool.main([str(path), "3", str(tmp_path / "x.safetensors")]) == 2
    assert "has members 1-2, not 3" in capsys.readouterr().err


def test_ensemble_weights_gives_the_mae_of_each_mix_and_how_alike_the_members_err(tmp_path, capsys):
    tool = load_script("experiments/ensemble_weights.py")
    ages = [10.0, 20.0, 30.0, 40.0]
    # The first member errs by +2, +2, -2, -2, the second by -2, +2, -2, +2: uncorrelated.
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame({"path": list("pqrs"), "age": ages, "predicted": [12.0, 22.0, 28.0, 38.0]}).to_csv(first)
    pd.DataFrame({"path": list("pqrs"), "age": ages, "predicted": [8.0, 22.0, 28.0, 42.0]}).to_csv(second)

    assert tool.main([str(first), str(second), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 images; correlation of the two members' errors 0.000" in out
    assert "| 1.000 | 2.000 |" in out and "| 0.000 | 2.000 |" in out
    assert "| 0.500 | 1.000 |" in out  # mixed half and half, the errors cancel on two faces in four

    assert tool.main([str(first), str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_a_member_made_from_a_model_that_saw_the_held_out_faces_is_refused(tiny_run, tmp_path, caplog):
    """The faces an --init start, or a model averaged into a member, trained on, the member has seen."""
    import json

    from age_detect_resnet.run_folder import RunFolder, lineage
    from age_detect_resnet.training.combined_run import check_held_out
    from age_detect_resnet.training.config import ConfigError

    calibration = shutil.copytree(tiny_run, tmp_path / "calibration")
    split = pd.read_csv(calibration / "split.csv")
    split.loc[split.index[split["split"] == "train"][:2], "split"] = "test"  # tiny_run trained on these
    split.to_csv(calibration / "split.csv", index=False)

    def member(name: str, *, init: str | None = None, averaged_from: str | None = None) -> str:
        folder = shutil.copytree(calibration, tmp_path / name)  # its own split is the calibration's
        config = json.loads((folder / "config.json").read_text())
        config["model"]["init"] = init
        (folder / "config.json").write_text(json.dumps(config))
        metadata = json.loads((folder / "best.json").read_text())
        if averaged_from:
            metadata["averaged_from"] = [{"model": averaged_from, "sha256": None, "weight": 1.0}]
        (folder / "best.json").write_text(json.dumps(metadata))
        return str(folder)

    check_held_out([member("plain")], RunFolder(calibration))  # nothing seen: its own split alone
    started = member("started", init=str(tiny_run))
    with pytest.raises(ConfigError, match=rf"{tiny_run} \(which {started} was made from\) trained on 2 of"):
        check_held_out([started], RunFolder(calibration))
    averaged = member("averaged", averaged_from=str(tiny_run))
    with pytest.raises(ConfigError, match=r"which .*averaged was made from"):
        check_held_out([averaged], RunFolder(calibration))
    # two levels down, and a start that is gone only warns
    grandchild = member("grandchild", init=started)
    assert lineage(grandchild) == [grandchild, started, str(tiny_run)]
    with caplog.at_level(logging.WARNING):
        check_held_out([member("gone", init=str(tmp_path / "deleted"))], RunFolder(calibration))
    assert f"{tmp_path / 'deleted'} (which {tmp_path / 'gone'} was made from) has no split.csv" in caplog.text
    # a loop in the records ends
    looped = member("looped")
    config = json.loads((tmp_path / "looped" / "config.json").read_text())
    config["model"]["init"] = looped
    (tmp_path / "looped" / "config.json").write_text(json.dumps(config))
    assert lineage(looped) == [looped]


def test_ensemble_prints_the_members_it_runs_with_their_real_weights(tiny_run, tmp_path, capsys):
    """An ensemble given as a MODEL is taken apart: the members printed are those run, weights multiplied."""
    first = tmp_path / "first"
    common = ["--num-workers", "0"]
    assert (
        ensemble_main([str(tiny_run), str(tiny_run), "--weights", "3,1", "--out", str(first), *common]) == 0
    )
    capsys.readouterr()
    assert ensemble_main([str(first), "--mirror", "--out", str(tmp_path / "alone"), *common]) == 0
    members = f"{first} member 1 (mobilenet_v2): 0.750; {first} member 2 (mobilenet_v2): 0.250"
    assert f"ensemble of 2 members ({members}; each face and its mirror image) in" in capsys.readouterr().out
    assert ensemble_main([str(first), str(tiny_run), "--out", str(tmp_path / "more"), *common]) == 0
    members = (
        f"{first} member 1 (mobilenet_v2): 0.375; {first} member 2 (mobilenet_v2): 0.125; {tiny_run}: 0.500"
    )
    assert f"ensemble of 3 members ({members}) in" in capsys.readouterr().out
