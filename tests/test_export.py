"""Exported models (ONNX, TorchScript) give PyTorch's ages on real faces; prediction runs on ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from age_detect_resnet import runtime
from age_detect_resnet.cli import export as export_cli
from age_detect_resnet.data.dataset import to_input_tensor
from age_detect_resnet.evaluation.evaluate import evaluate_model
from age_detect_resnet.export.exporter import export_model
from age_detect_resnet.export.quantize import image_convolutions
from age_detect_resnet.export.verify import INT8_TOLERANCE_YEARS, int8_verdict
from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.backends import OnnxRunner, TorchRunner, load_runner, read_export_metadata
from age_detect_resnet.inference.predictor import AgePredictor, load_predictor
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.model import AgeModel, create_backbone
from age_detect_resnet.training.config import ConfigError
from conftest import TEST_IMAGES, UTKFACE, WEIGHTS, YUNET, require, train_tiny

MOBILENET = WEIGHTS / "mobilenet_v2_imagenet_fp16.safetensors"
TOLERANCE = 0.01  # years: the contract


def real_faces(size: int, count: int = 24) -> torch.Tensor:
    """(N, 3, S, S) uint8 UTKFace crops, other ones than `export` checks itself on."""
    files = sorted(require(UTKFACE).glob("*.jpg"))[5::997][:count]
    return torch.stack([to_input_tensor(load_rgb(path), size) for path in files])


def pytorch_fp32(model: AgeModel) -> TorchRunner:
    """The project's own runner in float32: the ages an export must reproduce."""
    return TorchRunner(model, "cpu", precision="fp32")


def assert_same_outputs(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape
        assert np.abs(got[name] - value).max() < TOLERANCE, name


@pytest.fixture(scope="module")
def varied_run(tiny_run: Path, tmp_path_factory) -> Path:
    """`tiny_run` with ImageNet MobileNetV2 features. Trained for 2 epochs from random weights, the tiny
    model predicts one age for every image, which any export would match whatever it did to the pixels;
    with ImageNet features its ages depend on the face."""
    model = checkpoint.load_model(tiny_run)
    backbone, _ = create_backbone("mobilenet_v2", weights=require(MOBILENET))
    model.backbone.load_state_dict(backbone.state_dict())
    folder = tmp_path_factory.mktemp("varied")
    metadata = {k: v for k, v in model.metadata.items() if k not in ("format", "model", "sha256")}
    checkpoint.save_model(model, folder / "best.safetensors", metadata)
    for name in ("config.json", "split.csv"):  # the run's test split: what export checks on by default
        shutil.copy(tiny_run / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def onnx_file(varied_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "age.onnx"
    args = ["--model", str(varied_run), "--format", "onnx", "--out", str(out), "--check-images", str(UTKFACE)]
    assert export_cli.main(args) == 0
    return out


def test_onnx_export_gives_pytorch_ages_on_real_faces(onnx_file: Path, varied_run: Path):
    model = checkpoint.load_model(varied_run)
    images = real_faces(model.metadata["image_size"])
    expected = pytorch_fp32(model)(images)
    assert expected["age"].std() > 0.1  # the ages differ per face, so matching them means something
    runner = OnnxRunner(onnx_file)
    assert_same_outputs(expected, runner(images))
    assert_same_outputs({"age": expected["age"][:1]}, runner(images[:1].numpy()))  # any batch size, numpy too

    metadata = json.loads(onnx_file.with_suffix(".json").read_text(encoding="utf-8"))
    assert metadata["image_size"] == model.metadata["image_size"]
    assert metadata["crop"] == model.metadata["crop"]
    assert (metadata["model_format"], metadata["head"], metadata["outputs"]) == (
        "onnx",
        "regression",
        ["age"],
    )
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["age.json", "age.onnx"]  # no external data


@pytest.mark.filterwarnings(
    "ignore:`torch.jit:FutureWarning"
)  # TorchScript's deprecation, documented in export.py
def test_torchscript_export_gives_pytorch_ages_on_real_faces(varied_run: Path, tmp_path: Path):
    out = tmp_path / "age.torchscript.pt"
    arguments = ["--model", str(varied_run), "--format", "torchscript", "--out", str(out)]
    with warnings.catch_warnings():  # PyTorch's torch.jit deprecation, once per call: said once, by us
        warnings.simplefilter("error", FutureWarning)
        assert export_cli.main(arguments) == 0
        load_runner(out, backend="torchscript")
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["check"]["images"] == "real"
    model = checkpoint.load_model(varied_run)
    images = real_faces(model.metadata["image_size"])
    module = torch.jit.load(str(out))
    with torch.jit.optimized_execution(False):  # same results; skips the profiling runs' seconds
        for batch in (images, images[:1]):
            (ages,) = module(batch)
            assert np.abs(ages.detach().numpy() - pytorch_fp32(model)(batch)["age"]).max() < TOLERANCE


def test_onnx_predictor_finds_the_same_faces_and_ages_as_pytorch(onnx_file: Path, varied_run: Path):
    model = checkpoint.load_model(varied_run)
    detector = create_detector("yunet", require(YUNET))
    torch_predictor = AgePredictor(runner=pytorch_fp32(model), metadata=model.metadata, detector=detector)
    onnx_predictor = load_predictor(onnx_file, backend="onnx", detector=detector)
    photos = sorted(p for p in require(TEST_IMAGES).iterdir() if p.suffix in (".jpg", ".png"))
    for photo in photos:
        expected, got = torch_predictor.predict(photo), onnx_predictor.predict(photo)
        assert len(got) == len(expected) == 1, photo.name
        assert (got[0].box, got[0].crop_box) == (expected[0].box, expected[0].crop_box)
        assert abs(got[0].age - expected[0].age) < TOLERANCE, photo.name


def test_distribution_model_exports_its_interval(utkface_sample: Path, tmp_path: Path, monkeypatch):
    weights = str(require(MOBILENET))
    run = train_tiny(
        utkface_sample,
        tmp_path / "run",
        "--head",
        "distribution",
        "--pretrained",
        "--weights",
        weights,
        "--epochs",
        "1",
    )
    model = checkpoint.load_model(run)
    out = run / "age_model.onnx"  # the run's own export: what --backend onnx --model RUN runs
    metadata = export_model(model, out, check_images=[utkface_sample])
    assert metadata["outputs"] == ["age", "lower", "upper"]

    images = real_faces(model.metadata["image_size"])
    expected = pytorch_fp32(model)(images)
    got = OnnxRunner(out)(images)
    assert_same_outputs(expected, got)
    assert (got["lower"] < got["upper"]).all()
    face = load_rgb(sorted(utkface_sample.iterdir())[0])  # a crop: the whole image is the face
    (prediction,) = load_predictor(out, backend="onnx").predict_image(face)
    (reference,) = AgePredictor(runner=pytorch_fp32(model), metadata=model.metadata).predict_image(face)
    assert np.allclose(prediction.interval, reference.interval, atol=TOLERANCE, rtol=0)

    # `evaluate --backend onnx` reports the export on the run's test split like the model itself. PyTorch
    # in fp32 here: bf16 moves this 1-epoch model's interval bounds by up to ~0.9 years on some CPUs.
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    as_model, _ = evaluate_model(run, split="test", out=tmp_path / "torch")
    as_export, report = evaluate_model(run, split="test", out=tmp_path / "onnx", backend="onnx")
    rows = [pd.read_csv(folder / "predictions.csv") for folder in (tmp_path / "torch", report)]
    assert rows[1]["path"].tolist() == rows[0]["path"].tolist() and len(rows[1]) == as_model["count"]
    for column in ("predicted", "lower", "upper"):  # the report rounds to 0.001 years
        assert np.abs(rows[1][column] - rows[0][column]).max() < 0.02, column
    assert as_export["mae"] == pytest.approx(as_model["mae"], abs=0.01)
    assert as_export["interval"]["nominal"] == as_model["interval"]["nominal"] == 0.8
    assert "on --backend onnx" in (report / "evaluation.md").read_text()
    with pytest.raises(ConfigError, match="--tta"):
        evaluate_model(run, split="test", backend="onnx", tta=True)


def test_export_never_overwrites_the_trained_models_metadata(varied_run: Path):
    before = (varied_run / "best.json").read_text(encoding="utf-8")
    assert export_cli.main(["--model", str(varied_run), "--out", str(varied_run / "best.onnx")]) == 2
    assert (varied_run / "best.json").read_text(encoding="utf-8") == before
    assert not (varied_run / "best.onnx").exists()


def test_export_never_overwrites_the_metadata_of_another_export(varied_run: Path, tmp_path: Path):
    script = tmp_path / "age.pt"
    assert export_cli.main(["--model", str(varied_run), "--format", "torchscript", "--out", str(script)]) == 0
    before = (tmp_path / "age.json").read_text(encoding="utf-8")
    # age.onnx would share age.json, and age.pt would no longer load (its checksum is in there).
    assert export_cli.main(["--model", str(varied_run), "--out", str(tmp_path / "age.onnx")]) == 2
    assert (tmp_path / "age.json").read_text(encoding="utf-8") == before
    assert not (tmp_path / "age.onnx").exists()
    load_runner(script, backend="torchscript")  # still loads
    # The same export made again, under its own name, replaces its own metadata.
    assert export_cli.main(["--model", str(varied_run), "--format", "torchscript", "--out", str(script)]) == 0


def test_an_out_that_cannot_be_the_exported_file_is_refused_before_the_export(
    varied_run: Path, tmp_path: Path, caplog, monkeypatch
):
    """A folder, a path under a file, or a .JSON name (the metadata's own on macOS and Windows): the
    folder was found only at the save, after the whole export, naming a temporary file."""
    from age_detect_resnet.export import exporter

    def no_export(*_args, **_kwargs):
        raise AssertionError("the export ran before --out was checked")

    monkeypatch.setattr(exporter, "export_onnx", no_export)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for out, message in (
        (tmp_path / "folder", "is a folder; give the exported file's name"),
        (tmp_path / "file" / "age.onnx", f"cannot be written: {tmp_path / 'file'} is a file, not a folder"),
        (tmp_path / "age.JSON", "the metadata goes to <stem>.json"),
    ):
        caplog.clear()
        assert export_cli.main(["--model", str(varied_run), "--out", str(out)]) == 2
        assert message in caplog.text, caplog.text


def test_int8_needs_real_images_to_calibrate_and_check(varied_run: Path, tmp_path: Path):
    for name in ("best.safetensors", "best.json"):  # the model alone, without its run's test images
        shutil.copy(varied_run / name, tmp_path / name)
    args = [
        "--model",
        str(tmp_path / "best.safetensors"),
        "--out",
        str(tmp_path / "a.onnx"),
        "--quantize",
        "int8",
    ]
    assert export_cli.main(args) == 2
    assert not (tmp_path / "a.onnx").exists()


def test_int8_is_calibrated_on_validation_faces_and_judged_by_its_test_mae(
    varied_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "int8.onnx"
    assert export_cli.main(["--model", str(varied_run), "--out", str(out), "--quantize", "int8"]) == 0
    assert "Collecting tensor data" not in capsys.readouterr().out  # the calibrator's chatter is logged
    check = read_export_metadata(out)["check"]
    split = pd.read_csv(varied_run / "split.csv")
    assert check["count"] == (split["split"] == "test").sum()
    assert check["calibration_count"] == (split["split"] == "val").sum()
    assert check["age_mae_int8"] <= check["age_mae_float32"] + INT8_TOLERANCE_YEARS
    graph = onnx.load(str(out)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    first = set(image_convolutions(graph))
    assert first and all(n.input[1] not in dequantized for n in convs if n.name in first)  # kept float
    assert all(n.input[1] in dequantized for n in convs if n.name not in first)  # the rest int8
    face = to_input_tensor(load_rgb(sorted(require(UTKFACE).glob("*.jpg"))[7]), 40)[None]
    assert OnnxRunner(out)(face)["age"].shape == (1,)


def test_the_convolutions_that_read_the_image_are_found_through_any_other_operation():
    """Each network's first convolution, past normalisation, a flip and a concatenation; none behind it."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pixels", "scale"], ["x"]),
        helper.make_node("Conv", ["x", "w1"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="second"),
        helper.make_node("Slice", ["x", "start", "end", "axis", "step"], ["flipped"]),
        helper.make_node("Concat", ["x", "flipped"], ["both"], axis=0),
        helper.make_node("Conv", ["both", "w3"], ["d"], name="other network's first"),
        helper.make_node("Add", ["c", "d"], ["e"]),
        helper.make_node("Conv", ["e", "w4"], ["out"], name="after both"),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    weights = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [1], [1.0]) for i in range(1, 5)]
    graph = helper.make_graph(nodes, "g", [image], [out], initializer=weights)
    assert sorted(image_convolutions(graph)) == ["first", "other network's first"]
    # Weights listed among the graph's inputs (as older exporters do) are not images.
    as_inputs = [helper.make_tensor_value_info(w.name, TensorProto.FLOAT, [1]) for w in weights]
    graph = helper.make_graph(nodes, "g", [image, *as_inputs], [out], initializer=weights)
    assert sorted(image_convolutions(graph)) == ["first", "other network's first"]


def test_the_int8_verdict_is_by_mae_with_ages_and_by_mean_change_without():
    reference, ages = np.array([20.0, 30.0, 40.0, 50.0]), np.array([22.0, 30.0, 37.0, 50.0])
    shifted = reference + np.array([0.5, 0.5, -0.5, -0.5])  # changes every age, not the MAE
    check = {"age_mean_abs_diff": 0.5}
    assert int8_verdict(check, reference, shifted, ages) is None
    assert check["age_mae_float32"] == check["age_mae_int8"] == 1.25
    assert "unlabelled" in int8_verdict({"age_mean_abs_diff": 0.5}, reference, shifted, None)
    assert int8_verdict({"age_mean_abs_diff": 0.05}, reference, reference + 0.05, None) is None
    worse = int8_verdict({"age_mean_abs_diff": 1.0}, reference, reference + 1.0, ages)
    assert "raises the MAE on 4 labelled test faces from 1.250 to 1.750" in worse
    assert int8_verdict({"age_mean_abs_diff": np.nan}, reference, reference * np.nan, ages)


def test_onnx_predictor_refuses_a_model_file_that_does_not_match_its_metadata(
    onnx_file: Path, tmp_path: Path
):
    for path in (onnx_file, onnx_file.with_suffix(".json")):
        shutil.copy(path, tmp_path / path.name)
    with (tmp_path / onnx_file.name).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(checkpoint.ModelFileError, match="checksum"):
        load_predictor(tmp_path / onnx_file.name, backend="onnx")


@pytest.mark.parametrize(("name", "backend"), [("age.onnx", "onnx"), ("age.torchscript.pt", "torchscript")])
def test_an_export_given_to_the_torch_backend_is_named_with_the_backend_it_needs(tmp_path, name, backend):
    (tmp_path / name).write_bytes(b"export")
    with pytest.raises(checkpoint.ModelFileError, match=f"run it with --backend {backend} "):
        checkpoint.load_model(tmp_path / name)
