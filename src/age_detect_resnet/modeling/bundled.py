"""The models shipped inside the package, so that `pip install .` then `age-detect predict photo.jpg`
works offline, first try.

assets/age_model.safetensors (+ .json)   the default age model: fp16 weights, project metadata
assets/age_model_split.csv.gz             its run's split: the faces it trained on, and those it never
                                          saw (`evaluate --split test` judges it on them)
assets/face_detection_yunet.onnx          the YuNet face detector, where a release build includes it

All are checked against the SHA-256 below before use, so a damaged or swapped file is refused
instead of giving wrong ages. `write_bundled_model` makes the bundle from a finished run.

What the package downloads (YuNet where the build lacks it) or derives from the bundle (its ONNX export
for `--backend onnx`) is kept in `cache_dir()`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from age_detect_resnet.digests import file_digest
from age_detect_resnet.run_folder import RunFolder, SavedSplit

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parents[1] / "assets"  # age_detect_resnet/assets
AGE_MODEL = ASSETS / "age_model.safetensors"


def split_file_of(model_file: Path) -> Path:
    """Where a bundled model file's split lies: beside it, as <stem>_split.csv.gz."""
    return model_file.with_name(f"{model_file.stem}_split.csv.gz")


AGE_MODEL_SPLIT = split_file_of(AGE_MODEL)
YUNET_MODEL = ASSETS / "face_detection_yunet.onnx"
# The name that selects the bundled model wherever a model path is asked for.
DEFAULT_MODEL_NAME = "default"
# SHA-256 of the bundled age model's weights file (written by `write_bundled_model`).
AGE_MODEL_SHA256 = "d76be5fd17550e9eb0c0e4d69b50255c7595b34b70896a395f0333b294fe7dcd"
# SHA-256 of its run's split (written by `write_bundled_model` too).
AGE_MODEL_SPLIT_SHA256 = "aec8ef1f2141c4781c5593d83cad7097bcf9d368e01ca1f02c05416655058f51"


class BundledModelError(RuntimeError):
    """The bundled model is missing or damaged; the message says what to do."""


def cache_dir() -> Path:
    """Where files made once on this machine are kept: $XDG_CACHE_HOME/age-detect-resnet (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "age-detect-resnet"


def is_default(path: str | Path | None) -> bool:
    return path is None or str(path) == DEFAULT_MODEL_NAME


def bundled_model_path() -> Path:
    """The bundled age model's weights file, after checking it is the one this release shipped."""
    if not AGE_MODEL.is_file() or not AGE_MODEL.with_suffix(".json").is_file():
        raise BundledModelError(
            f"this installation has no bundled age model ({AGE_MODEL} is missing); reinstall "
            "age-detect-resnet, or pass --model with a trained run folder"
        )
    if AGE_MODEL_SHA256 and file_digest(AGE_MODEL) != AGE_MODEL_SHA256:
        raise BundledModelError(
            f"the bundled age model {AGE_MODEL} does not have the checksum this release shipped; the "
            "installation is damaged: reinstall age-detect-resnet"
        )
    return AGE_MODEL


def bundled_split() -> SavedSplit:
    """The split of the run the bundled model was made from, after checking it is the one this release
    shipped: which faces of its dataset it trained on and which it never saw. Its data root is the
    user's to name."""
    if not AGE_MODEL_SPLIT.is_file():
        raise BundledModelError(
            f"this installation has no split for the bundled model ({AGE_MODEL_SPLIT} is missing): its "
            "held-out faces are unknown; reinstall age-detect-resnet"
        )
    if file_digest(AGE_MODEL_SPLIT) != AGE_MODEL_SPLIT_SHA256:
        raise BundledModelError(
            f"{AGE_MODEL_SPLIT} does not have the checksum this release shipped; the installation is "
            "damaged: reinstall age-detect-resnet"
        )
    metadata = json.loads(bundled_model_path().with_suffix(".json").read_text(encoding="utf-8"))
    return SavedSplit(AGE_MODEL_SPLIT, metadata["dataset"], None, "the bundled model")


def bundled_yunet_path() -> Path | None:
    """The bundled YuNet file if this build includes it (checked by the caller's checksum)."""
    return YUNET_MODEL if YUNET_MODEL.is_file() else None


def write_bundled_yunet(source: Path | None = None, out: Path | None = None) -> Path:
    """Put the YuNet face detector into the package (maintainers, before building a release), so that
    the installed package detects faces offline from the first run: `source`, else the file the
    detector would use ($AGE_DETECT_YUNET_MODEL, the cached download, or a download now). Refused unless
    it is the exact file the detector expects (its SHA-256). Returns where it was written."""
    import shutil

    from age_detect_resnet.atomic import atomic_path
    from age_detect_resnet.faces.detection import YUNET_SHA256, resolve_yunet_model

    out = Path(out) if out is not None else YUNET_MODEL
    path = resolve_yunet_model(source)
    if file_digest(path) != YUNET_SHA256:
        raise BundledModelError(
            f"{path} is not the YuNet model this release expects (SHA-256 {YUNET_SHA256[:16]}...); "
            "pass the file from OpenCV's model zoo, or none to download it"
        )
    if path.resolve() != out.resolve():
        with atomic_path(out) as tmp:
            shutil.copyfile(path, tmp)
    return out


def write_bundled_model(run: Path, out: Path = AGE_MODEL) -> dict[str, Any]:
    """Copy the best model of `run` into the package as fp16 safetensors + metadata, and its split.csv
    beside it (gzipped, `split_file_of`); returns the metadata (its `sha256` goes into AGE_MODEL_SHA256)
    with the split's SHA-256 as `split_sha256` (for AGE_MODEL_SPLIT_SHA256)."""
    import gzip
    import shutil

    from age_detect_resnet.atomic import atomic_path
    from age_detect_resnet.modeling import checkpoint

    split = RunFolder(run).split
    if not split.is_file():
        raise BundledModelError(f"{split} does not exist: bundle a run folder with its split.csv")
    model = checkpoint.load_model(Path(run), "cpu")
    metadata = {k: v for k, v in model.metadata.items() if k not in ("format", "model", "sha256")}
    metadata["bundled_from"] = {"run": Path(run).name, "sha256": model.metadata.get("sha256")}
    checkpoint.save_model(model, out, metadata, dtype=torch.float16)
    # mtime=0: the same split gives the same bytes, so its checksum changes only with the split
    split_out = split_file_of(Path(out))
    with (
        atomic_path(split_out) as tmp,
        split.open("rb") as source,
        Path(tmp).open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as packed,
    ):
        shutil.copyfileobj(source, packed)
    written = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    return {**written, "split_sha256": file_digest(split_out)}
