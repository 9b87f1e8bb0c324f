"""Weight averaging (`age-detect average`): the weighted mean of every weight, refused where the weights
do not correspond, and a run folder whose interval is calibrated on the run's validation split."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from age_detect_resnet.cli.average import main as average_main
from age_detect_resnet.cli.evaluate import main as evaluate_main
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling import model as model_module
from age_detect_resnet.modeling.averaging import AveragingError, average_models, mixture_weights
from age_detect_resnet.modeling.ensemble import AgeEnsemble
from age_detect_resnet.modeling.model import create_model
from conftest import MOBILENET, assert_combined_run, load_script, require, train_tiny


def _model(seed: int, head: str = "distribution", image_size: int = 40):
    torch.manual_seed(seed)
    model = create_model("mobilenet_v2", head, pretrained=False).eval()
    model.metadata = {"image_size": image_size, "seed": seed}
    return model


def test_the_average_is_the_weighted_mean_of_every_weight_and_statistic():
    first, second = _model(0), _model(1)
    with torch.no_grad():  # batch-norm statistics that differ, so that they are checked too
        for module in second.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.add_(1.0)
                module.num_batches_tracked.fill_(7)
    averaged = average_models([first, second], [1, 3])
    a, b, mean = first.state_dict(), second.state_dict(), averaged.state_dict()
    for key, value in mean.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * a[key] + 0.75 * b[key])
        else:
            assert torch.equal(value, b[key]), key  # counters: the last model's
    assert averaged.metadata == second.metadata and averaged is not second
    key = next(k for k, v in a.items() if v.is_floating_point())
    assert not torch.equal(mean[key], a[key]) and not torch.equal(mean[key], b[key])


def test_a_model_averaged_with_itself_gives_its_own_ages():
    model = _model(0)
    images = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        expected = model.head.decode(model(images))
        got = average_models([model, model]).head.decode(average_models([model, model])(images))
    torch.testing.assert_close(got, expected)


def test_models_whose_weights_do_not_correspond_are_refused():
    with pytest.raises(AveragingError, match="same architecture"):
        average_models([_model(0), _model(1, head="regression")], names=["a", "b"])
    with pytest.raises(AveragingError, match="size or framing"):
        average_models([_model(0), _model(1, image_size=64)])


def _framed(seed: int, **crop_or_alignment) -> torch.nn.Module:
    model = _model(seed)
    model.metadata.update(crop_or_alignment)
    return model


MARGINS = {"left": 0.4, "top": 0.4, "right": 0.4, "bottom": 0.4}
ALIGNMENT = {"version": 1, "template": [[0.3, 0.4], [0.7, 0.4]], "box_landmarks": [[0.3, 0.4], [0.7, 0.4]]}


def test_box_framed_runs_of_one_recipe_average_though_their_measured_margins_differ_slightly():
    near = {**MARGINS, "left": 0.404, "bottom": 0.3965}  # a second run's own measurement
    first, second = _framed(0, crop={"margins": MARGINS}), _framed(1, crop={"margins": near})
    assert average_models([first, second]).metadata["crop"]["margins"] == near  # one set: the last model's
    AgeEnsemble([first, second])  # the ensemble's check is the same one
    far = {**MARGINS, "top": 0.25, "left": 0.405}  # left within the tolerance: not named
    # The message names what differs: the margins beyond the tolerance with their values, or the framing.
    for other, difference in (
        (
            _framed(1, crop={"margins": far}),
            "b's crop margins top 0.2500 against a's 0.4000 (fractions of the "
            "detector box) are more than the tolerance of 0.01 apart",
        ),
        (
            _framed(1, alignment=ALIGNMENT),
            "b's faces are aligned by five landmarks and a's cut from the detector box",
        ),
        (_model(1, image_size=64), "b takes 64 px faces and a 40 px"),
    ):
        with pytest.raises(AveragingError, match="size or framing") as refused:
            average_models([first, other], names=["a", "b"])
        assert difference in str(refused.value)
    moved = {**ALIGNMENT, "template": [[0.3, 0.41], [0.7, 0.4]]}
    with pytest.raises(AveragingError, match="aligned onto other landmark templates"):
        average_models([_framed(0, alignment=ALIGNMENT), _framed(1, alignment=moved)])
    with pytest.raises(AveragingError, match="b is aligned by version 2 and a by version 1"):
        average_models(
            [_framed(0, alignment=ALIGNMENT), _framed(1, alignment={**ALIGNMENT, "version": 2})],
            names=["a", "b"],
        )


def test_an_ensemble_is_refused_with_how_to_write_out_a_member():
    ensemble = AgeEnsemble([_model(0), _model(1)])
    for models in ([ensemble], [_model(2), ensemble]):
        with pytest.raises(AveragingError, match=r"experiments/ensemble_member\.py default MEMBER OUT"):
            average_models(models, names=["default"] * len(models))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--weights", "inf,1"], "'inf,1' holds a weight that is not a finite number"),
        (["--norm-batches", "-3"], "must be at least 0, got -3"),
    ],
)
def test_average_refuses_bad_arguments(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        average_main(["default", "--out", str(tmp_path / "out"), *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_average_refuses_an_out_that_cannot_be_a_folder_before_any_work(tmp_path, caplog):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "run"):
        assert average_main(["default", "--out", str(out)]) == 2
        assert f"{taken} is a file, not a folder" in caplog.text


@pytest.mark.parametrize(
    ("weights", "count", "message"),
    [
        (None, 0, "at least one"),
        ([1.0], 2, "one weight per model"),
        ([1.0, -1.0], 2, "zero or more"),
        ([float("inf"), 1.0], 2, r"weights \[inf, 1.0\] must be finite"),
        ([float("nan"), 1.0], 2, "must be finite"),
    ],
)
def test_weights_must_be_a_mixture(weights, count, message):
    with pytest.raises(AveragingError, match=message):
        mixture_weights(weights, count)
    assert mixture_weights([1, 3], 2) == [0.25, 0.75]


def test_average_writes_a_calibrated_run_folder_that_evaluates_like_any_run(utkface_sample, tmp_path, caplog):
    first = train_tiny(utkface_sample, tmp_path / "first", "--head", "distribution")
    second = train_tiny(utkface_sample, tmp_path / "second", "--init", str(first), "--epochs", "1")
    out = tmp_path / "averaged"
    assert (
        average_main([str(first), str(second / "best.safetensors"), "--out", str(out), "--num-workers", "0"])
        == 0
    )

    model = checkpoint.load_model(out)
    # Its batch-norm statistics come from the calibration run's training faces (all of them here: the
    # tiny run has fewer than the default 40 batches), not from the two models' averaged statistics.
    train_faces = (pd.read_csv(second / "split.csv")["split"] == "train").sum()
    recomputed = model.metadata["norm_statistics"]["recomputed_on_training_images"]
    assert 0 < recomputed <= train_faces and train_faces - recomputed < 8  # whole batches of 8
    plain = average_models([checkpoint.load_model(first), checkpoint.load_model(second)])
    norm = next(name for name in plain.state_dict() if name.endswith("running_mean"))
    assert not torch.equal(model.state_dict()[norm], plain.state_dict()[norm])
    # The sources, the calibration run's split (the last one given), the validation MAE and interval.
    assert_combined_run(out, model, "averaged_from", [first, second], [0.5, 0.5])
    # Each source recorded by its absolute path: its lineage is found from any working folder.
    recorded = [source["model"] for source in model.metadata["averaged_from"]]
    assert recorded == [str(first.resolve()), str((second / "best.safetensors").resolve())]
    assert evaluate_main(["--model", str(out), "--out", str(tmp_path / "test"), "--num-workers", "0"]) == 0

    # An existing model is never overwritten; loose files need --calibrate-on.
    before = (out / "best.safetensors").read_bytes()
    assert average_main([str(first), str(second), "--out", str(out)]) == 2
    assert "already exists" in caplog.text and (out / "best.safetensors").read_bytes() == before
    loose = tmp_path / "loose"
    loose.mkdir()
    for run in (first, second):
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(run / f"best{suffix}", loose / f"{run.name}{suffix}")
    files = [str(loose / "first.safetensors"), str(loose / "second.safetensors")]
    no_val = tmp_path / "no-val"
    shutil.copytree(second, no_val)
    split = pd.read_csv(no_val / "split.csv")
    split[split["split"] != "val"].to_csv(no_val / "split.csv", index=False)
    assert average_main([*files, "--out", str(tmp_path / "other"), "--calibrate-on", str(no_val)]) == 2
    assert "no validation images" in caplog.text
    assert average_main([*files, "--out", str(tmp_path / "other")]) == 2
    assert "--calibrate-on" in caplog.text and not (tmp_path / "other").exists()
    # Calibrated on faces a model trained on: refused, as ensemble refuses it.
    shifted = shutil.copytree(second, tmp_path / "shifted")
    split = pd.read_csv(shifted / "split.csv")
    split.loc[split.index[split["split"] == "train"][:1], "split"] = "val"
    split.to_csv(shifted / "split.csv", index=False)
    seen = tmp_path / "seen"
    assert average_main([str(first), "--out", str(seen), "--calibrate-on", str(shifted)]) == 2
    assert f"{first} trained on 1 of the validation and test images" in caplog.text and not seen.exists()
    other = tmp_path / "other"
    assert (
        average_main(
            [
                *files,
                "--out",
                str(other),
                "--calibrate-on",
                str(second),
                "--num-workers",
                "0",
                "--norm-batches",
                "0",
            ]
        )
        == 0
    )
    kept = checkpoint.load_model(other)  # --norm-batches 0: the averaged statistics
    assert kept.metadata["norm_statistics"]["recomputed_on_training_images"] == 0
    torch.testing.assert_close(kept.state_dict()[norm], plain.state_dict()[norm])

    # One model is its own average: only its batch-norm statistics are recomputed.
    single = tmp_path / "single"
    assert average_main([str(first), "--out", str(single), "--num-workers", "0"]) == 0
    alone = checkpoint.load_model(single)
    assert [s["weight"] for s in alone.metadata["averaged_from"]] == [1.0]
    assert alone.metadata["norm_statistics"]["recomputed_on_training_images"] > 0
    original = checkpoint.load_model(first).state_dict()
    weight = next(name for name in original if name.endswith("conv.weight") or name.endswith(".0.weight"))
    assert torch.equal(alone.state_dict()[weight], original[weight])
    assert not torch.equal(alone.state_dict()[norm], original[norm])


def test_a_pretrained_start_is_imagenet_under_the_runs_head_and_averages_with_the_run(
    tiny_run, tmp_path, capsys
):
    tool = load_script("experiments/pretrained_start.py")
    weights = require(MOBILENET)
    start = tmp_path / "start"
    assert tool.main([str(tiny_run), str(weights), str(start)]) == 0
    stored, imagenet, run = (
        load_file(str(p)) for p in (start / "best.safetensors", weights, tiny_run / "best.safetensors")
    )
    backbone = [k for k in stored if k.startswith("backbone.") and stored[k].is_floating_point()]
    assert backbone and all(
        torch.equal(stored[k].float(), imagenet[k.removeprefix("backbone.")].float()) for k in backbone
    )
    head = [k for k in stored if k.startswith("head.")]
    assert head and all(torch.equal(stored[k], run[k]) for k in head)
    assert any(not torch.equal(stored[k].float(), run[k].float()) for k in backbone)  # not the run's
    for name in ("config.json", "split.csv"):
        assert (start / name).read_bytes() == (tiny_run / name).read_bytes()
    assert checkpoint.load_model(start).metadata["pretrained_start_of"]["model"] == str(tiny_run)

    # It is averageable with the run: weight 0 gives the run's own weights back.
    mixed = tmp_path / "mixed"
    args = [str(tiny_run), str(start), "--weights", "1,0", "--norm-batches", "0", "--num-workers", "0"]
    assert average_main([*args, "--out", str(mixed)]) == 0
    averaged = load_file(str(mixed / "best.safetensors"))
    assert all(torch.allclose(averaged[k].float(), run[k].float(), atol=1e-3) for k in backbone)

    assert tool.main([str(tiny_run), str(weights), str(start)]) == 2
    assert "exists" in capsys.readouterr().err
    assert tool.main([str(tmp_path), str(weights), str(tmp_path / "other")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert tool.main([str(tiny_run), str(tmp_path / "no.safetensors"), str(tmp_path / "third")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "third").exists()


def test_test_time_views_record_their_views_beside_the_report(tiny_run, tmp_path, monkeypatch, capsys):
    views = load_script("experiments/test_time_views.py")
    script = "test_time_views.py"
    monkeypatch.setattr(sys, "argv", [script, "--views", "0:1,6:1.06", "--", "--model", str(tiny_run)])
    with pytest.raises(SystemExit):  # no --out: the views could not be recorded
        views.main()
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "views"
    options = ["--model", str(tiny_run), "--out", str(out), "--num-workers", "0"]
    monkeypatch.setattr(sys, "argv", [script, "--views", "0:1,6:1.06", "--", *options])
    assert views.main() == 0
    record = json.loads((out / "views.json").read_text())
    assert record["views"] == [{"degrees": 0.0, "zoom": 1.0}, {"degrees": 6.0, "zoom": 1.06}]
    assert record["evaluate"] == options
    assert (out / "evaluation.json").is_file()
    assert model_module.raw_outputs is views._one_view  # the project's path is given back


def test_test_time_views_turn_and_zoom_the_crop_about_its_centre():
    views = load_script("experiments/test_time_views.py")
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert views.warp(images, 0, 1) is images
    turned = views.warp(images, 90, 1)  # a quarter turn of a square crop moves pixels onto pixels
    assert turned.dtype == torch.uint8 and turned.shape == images.shape
    assert torch.equal(turned, images.rot90(1, (2, 3))) or torch.equal(turned, images.rot90(-1, (2, 3)))
    centre = torch.zeros(1, 1, 8, 8)
    centre[..., 3:5, 3:5] = 1.0
    zoomed = views.warp(centre, 0, 2.0)  # twice as large about the centre: the bright square grows
    assert zoomed[..., 2:6, 2:6].mean() > 0.5 and zoomed[..., 0, 0].item() == 0.0
    assert views.parse_views("0:1,6:1,-6:1.06") == [(0.0, 1.0), (6.0, 1.0), (-6.0, 1.06)]
    for bad in ("6", "a:1", "0:0"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"DEGREES:ZOOM|above 0"):
            views.parse_views(bad)


def test_a_calibration_run_on_other_faces_than_the_models_is_refused(tiny_run, tmp_path, caplog):
    """Its training faces would recompute the average's batch-norm statistics on crops it never takes,
    and its config.json, the result's, would describe other faces than best.json."""
    from age_detect_resnet.cli.ensemble import main as ensemble_main

    larger = shutil.copytree(tiny_run, tmp_path / "larger")
    for name in ("config.json", "best.json"):
        settings = json.loads((larger / name).read_text())
        (settings["data"] if name == "config.json" else settings)["image_size"] = 48
        (larger / name).write_text(json.dumps(settings))
    out = tmp_path / "out"
    assert average_main([str(tiny_run), "--calibrate-on", str(larger), "--out", str(out)]) == 2
    assert f"--calibrate-on {larger} was trained on other faces than the models" in caplog.text
    assert f"the combined model takes 40 px faces and {larger} 48 px" in caplog.text and not out.exists()
    reframed = shutil.copytree(tiny_run, tmp_path / "reframed")
    metadata = json.loads((reframed / "best.json").read_text())
    margins = metadata["crop"]["margins"]
    metadata["crop"]["margins"] = {**margins, "top": margins["top"] + 0.05}
    (reframed / "best.json").write_text(json.dumps(metadata))
    models = [str(tiny_run), str(tiny_run), "--calibrate-on", str(reframed), "--out", str(out)]
    assert ensemble_main(models) == 2
    assert f"the combined model's crop margins top {margins['top']:.4f} against {reframed}'s" in caplog.text
    assert not out.exists()
    # A calibration folder of config.json and split.csv only: its settings say its faces.
    from age_detect_resnet.run_folder import RunFolder
    from age_detect_resnet.training.combined_run import check_calibration_faces
    from age_detect_resnet.training.config import ConfigError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "split.csv"):
        shutil.copyfile(tiny_run / name, bare / name)
    metadata = checkpoint.read_metadata(tiny_run)
    check_calibration_faces(metadata, RunFolder(bare))
    settings = json.loads((bare / "config.json").read_text())
    settings["data"]["align"] = True
    (bare / "config.json").write_text(json.dumps(settings))
    with pytest.raises(
        ConfigError, match=f"cut from the detector box and {bare}'s aligned by five landmarks"
    ):
        check_calibration_faces(metadata, RunFolder(bare))
