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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny training run (regression head), shared by the tests that only read it."""
    source = require(UTKFACE)
    folder = tmp_path_factory.mktemp("utk")
    names = sorted(p.name for p in source.glob("*.jpg") if 10 <= int(p.name.split("_")[0]) <= 75)
    for name in names[::300][:60]:
        shutil.copy(source / name, folder / name)
    return train_tiny(folder, tmp_path_factory.mktemp("runs") / "tiny")
