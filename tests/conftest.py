"""Shared fixtures: paths into ../shared (skipping with a reason when absent) and tiny real-format data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UTKFACE = SHARED / "data" / "utkface"
REPLICA = SHARED / "data" / "imdb_wiki_replica"
YUNET = SHARED / "models" / "face_detection_yunet.onnx"
WEIGHTS = SHARED / "weights"
TEST_IMAGES = SHARED / "test_images"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the ../shared folder beside the project")
    return path


def load_script(relative: str):
    """A script of this repository (`experiments/NAME.py`, `scripts/NAME.py`) as a module: scripts are
    not part of the package, so they cannot be imported by name."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tests never download: the face detector comes from ../shared (a missing path where it is absent,
# so detector-dependent code reports itself unavailable instead of reaching for the network).
os.environ["AGE_DETECT_YUNET_MODEL"] = str(YUNET if YUNET.is_file() else REPO / "no-detector-model.onnx")


@pytest.fixture
def utkface_sample(tmp_path: Path) -> Path:
    """A folder of 60 real UTKFace crops (ages 10-75) with their original names."""
    source = require(UTKFACE)
    names = sorted(p.name for p in source.glob("*.jpg") if 10 <= int(p.name.split("_")[0]) <= 75)
    folder = tmp_path / "utkface"
    folder.mkdir()
    for name in names[:: max(1, len(names) // 60)][:60]:
        shutil.copy(source / name, folder / name)
    return folder


MOBILENET = WEIGHTS / "mobilenet_v2_imagenet_fp16.safetensors"


def train_tiny(data_root: Path, out: Path, *extra: str) -> Path:
    """Train a small MobileNetV2 for 2 epochs on 40 px images: seconds on a CPU. It starts from ImageNet
    weights where ../shared has them, so its ages differ from face to face (checks comparing ages bite)."""
    from age_detect_resnet.cli.train import main

    weights = ["--weights", str(MOBILENET)] if MOBILENET.is_file() else ["--no-pretrained"]
    settings = (
        "--backbone mobilenet_v2 --image-size 40 --epochs 2 --batch-size 8 --num-workers 0 --lr 1e-3 "
        "--no-progress --grid-size 4 --no-tensorboard"
    ).split()
    source = ["--dataset", "utkface", "--data-root", str(data_root)]
    assert main([*source, *weights, *settings, "--out", str(out), *extra]) == 0
    return out


def assert_combined_run(out: Path, model, sources_key: str, runs: list[Path], weights: list[float]) -> None:
    """What `average` and `ensemble` promise of the run folder `out` (its loaded `model` given): each source
    run's SHA-256 and weight under `sources_key`, the calibration run's (the last one's) split copied so
    that evaluate knows it, the validation MAE recorded as `evaluate --split val` measures it, and an
    interval calibrated on those faces, covering at least the share it promises."""
    import json

    import pandas as pd

    from age_detect_resnet.cli.evaluate import main as evaluate_main

    sources = model.metadata[sources_key]
    assert [s["weight"] for s in sources] == weights
    assert [s["sha256"] for s in sources] == [
        json.loads((run / "best.json").read_text())["sha256"] for run in runs
    ]
    assert (out / "split.csv").read_bytes() == (runs[-1] / "split.csv").read_bytes()
    val = out.parent / f"{out.name}-val"
    assert (
        evaluate_main(["--model", str(out), "--split", "val", "--out", str(val), "--num-workers", "0"]) == 0
    )
    frame = pd.read_csv(val / "predictions.csv")
    assert model.metadata["val_mae"] == pytest.approx(frame["error"].abs().mean(), abs=0.01)
    covered = ((frame["age"] >= frame["lower"]) & (frame["age"] <= frame["upper"])).mean()
    assert covered >= model.head.interval - 1e-9


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny training run (regression head), shared by the tests that only read it."""
    source = require(UTKFACE)
    folder = tmp_path_factory.mktemp("utk")
    names = sorted(p.name for p in source.glob("*.jpg") if 10 <= int(p.name.split("_")[0]) <= 75)
    for name in names[::300][:60]:
        shutil.copy(source / name, folder / name)
    return train_tiny(folder, tmp_path_factory.mktemp("runs") / "tiny")
