"""Export a trained model to ONNX or TorchScript, and run an exported ONNX model with ONNX Runtime.

    age-detect export --model runs/NAME --format onnx --out age.onnx
    age-detect export --model runs/NAME --format torchscript --out age.torchscript.pt
    age-detect export --model runs/NAME --out age-int8.onnx --quantize int8 --check-images data/faces/

The exported graph takes what `AgePredictor` feeds any runner, uint8 images (B, 3, S, S) RGB, and
returns the ages (B,) and, for the distribution head, the lower and upper ages of the calibrated
interval (B,): a consumer needs no head logic. Beside it, `<stem>.json` holds what a consumer needs
to crop and resize exactly as in training (image size, crop margins), the output names and the head.

Every export is run before it is kept (ONNX Runtime or TorchScript, one image and a batch) and must
give the float32 PyTorch ages within `TOLERANCE_YEARS`. int8 changes single ages by a few tenths of a
year, so it is judged by what it does to accuracy: on labelled faces (the run's test split) its MAE may
exceed float32's by at most `INT8_TOLERANCE_YEARS`; on unlabelled ones its ages must stay that close to
float32's on average (a bound on any change of MAE).

    predictor = load_predictor("age.onnx", backend="onnx", detector=create_detector())   # inference/
    faces = predictor.predict("photo.jpg")

The bundled model is exported on demand (`bundled_export`, what `--backend onnx` without --model runs):
once per bundle, into the user cache.

graph.py writes the graph, quantize.py makes int8, verify.py checks; this module puts them together.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from age_detect_resnet.atomic import atomic_path, unwritable_reason, write_text_atomic
from age_detect_resnet.digests import file_digest
from age_detect_resnet.export.graph import FORMATS, ExportError, export_onnx, export_torchscript
from age_detect_resnet.export.quantize import quantize_int8
from age_detect_resnet.export.verify import (
    INT8_CALIBRATION_IMAGES,
    INT8_CHECK_IMAGES,
    TOLERANCE_YEARS,
    check_batch,
    check_export,
    int8_verdict,
    reference_outputs,
)
from age_detect_resnet.inference.backends import (
    EXPORT_FORMAT,
    INPUT_NAME,
    AgeRunner,
    OnnxRunner,
    TorchScriptRunner,
    metadata_path,
    read_export_metadata,
)
from age_detect_resnet.modeling import bundled, checkpoint
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.model import AgeModel

log = logging.getLogger(__name__)


def export_metadata(
    model: AgeModel,
    path: Path,
    fmt: str,
    *,
    name: str,
    quantize: str,
    source: Path | None,
    check: dict[str, Any],
) -> dict[str, Any]:
    """The JSON beside an export (`path`, to be called `name`): the model's metadata, plus how to feed
    the file and read its outputs."""
    size = image_size_of(model)
    kept = {k: v for k, v in model.metadata.items() if k not in ("format", "sha256")}
    return {
        **kept,
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": name,
        "sha256": file_digest(path),
        "image_size": size,
        "head": model.head.kind,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", 3, size, size],
            "pixels": "RGB 0-255: the face aligned onto the template in 'alignment' (older models: the "
            "box grown by the margins in 'crop', resized with PIL bilinear)",
        },
        "outputs": list(model.head.output_names),
        "quantize": quantize,
        "source": {"path": str(source) if source else None, "sha256": model.metadata.get("sha256")},
        "exporter": f"torch {torch.__version__} "
        + ("torch.onnx (dynamo)" if fmt == "onnx" else "torch.jit.trace"),
        "check": check,
    }


def _json_fields(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} where it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export_model(
    model: AgeModel,
    out: Path,
    fmt: str = "onnx",
    *,
    quantize: str = "none",
    check_images: Sequence[Path] | None = None,
    check_ages: Mapping[Path, float] | None = None,
    calibration_images: Sequence[Path] | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """Export `model` to `out` and write its metadata JSON; returns the metadata.

    The file replaces `out` only after passing its check against float32 PyTorch: every output within
    `TOLERANCE_YEARS`, or for int8 (which needs real `check_images`) `int8_verdict`, by MAE where
    `check_ages` gives every check image's true age. int8 calibrates on `calibration_images`, or
    without them on every other check image (the rest check).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use {' or '.join(FORMATS)}")
    if quantize not in ("none", "int8"):
        raise ExportError(f"unknown quantisation {quantize!r}; use none or int8")
    if quantize == "int8" and (fmt != "onnx" or not check_images):
        raise ExportError(
            "--quantize int8 needs --format onnx and real face crops to calibrate the quantisation and "
            "check its ages: pass --check-images FOLDER (or export from a run whose test images are here; "
            "for the bundled model, --data-root with your copy of UTKFace)"
        )
    out = Path(out)
    meta = metadata_path(out)
    if out.suffix.lower() == ".json":  # any case: x.JSON and x.json are one file on macOS and Windows
        raise ExportError(
            f"{out}: the metadata goes to <stem>.json; give the model file another suffix (.onnx)"
        )
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give the exported file's name, e.g. {out / 'age.onnx'}")
    unwritable = unwritable_reason(out.parent)  # before the minutes of export, not at the save
    if unwritable:
        raise ExportError(f"--out {out} cannot be written: {unwritable}; choose another place")
    existing = _json_fields(meta) if meta.is_file() else None
    if existing is not None and existing.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"--out {out} would overwrite {meta}, which is not export metadata (the trained "
            "model's own?); choose another file name"
        )
    other = (existing or {}).get("file")
    if other and other != out.name and (out.parent / other).is_file():
        raise ExportError(
            f"--out {out} would overwrite {meta}, the metadata of the export {out.parent / other}, which "
            "could then not be loaded; choose another file name, or delete that export first"
        )
    model = model.float().eval().to("cpu")
    # Each step below takes from seconds to minutes on a CPU (int8: the faces found and aligned, then the
    # calibration): said as it starts, so a long export does not look stuck.
    log.info("preparing the check images (faces detected and aligned as in training)")
    images, used = check_batch(
        check_images, model.metadata, limit=INT8_CHECK_IMAGES if quantize == "int8" else 32
    )
    calibration = None
    if quantize == "int8":
        if calibration_images:
            calibrated, _ = check_batch(calibration_images, model.metadata, limit=INT8_CALIBRATION_IMAGES)
            calibration = calibrated.numpy()
        elif len(images) >= 4:
            calibration, images, used = images[::2].numpy(), images[1::2], used[1::2]
        if calibration is None or len(images) < 2:
            raise ExportError("--quantize int8 needs at least 4 readable check images")
    ages = None
    if check_ages is not None and used and all(path in check_ages for path in used):
        ages = np.array([check_ages[path] for path in used])
    reference = reference_outputs(model, images)
    log.info(
        "exporting to %s%s",
        fmt,
        f", then quantising to int8 on {len(calibration)} faces" if calibration is not None else "",
    )
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            export_torchscript(model, tmp)
            runner: AgeRunner = TorchScriptRunner(tmp, model.head.output_names)
        else:
            if calibration is None:
                export_onnx(model, tmp)
            else:
                with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
                    export_onnx(model, Path(scratch) / "float.onnx")
                    quantize_int8(Path(scratch) / "float.onnx", tmp, calibration)
            runner = OnnxRunner(tmp, providers=["CPUExecutionProvider"])
        log.info("checking the export's outputs against PyTorch's on %d images", len(images))
        stats, outputs = check_export(runner, reference, images)
        check = {"images": "real" if check_images else "random", "count": len(images), **stats}
        if quantize == "int8":
            check["calibration_count"] = len(calibration)
            refusal = int8_verdict(check, reference["age"], outputs["age"], ages)
        else:
            worst = max(v for k, v in check.items() if k.endswith("_max_abs_diff"))
            refusal = None
            if not worst <= TOLERANCE_YEARS:  # also catches NaN
                refusal = (
                    f"the exported model's outputs differ from PyTorch's by {worst:.4f} years at most "
                    f"on {len(images)} images (limit {TOLERANCE_YEARS})"
                )
        if refusal:
            raise ExportError(f"{refusal}; {out} was not written")
        metadata = export_metadata(
            model, tmp, fmt, name=out.name, quantize=quantize, source=source, check=check
        )
    write_text_atomic(meta, json.dumps(metadata, indent=2) + "\n")
    log.info("exported %s (%.1f MB) and %s", out, out.stat().st_size / 1e6, meta.name)
    return metadata


def bundled_export(fmt: str = "onnx") -> tuple[Path, dict[str, Any]]:
    """The bundled age model exported to `fmt`, and its metadata: made once (about half a minute for
    ONNX on 2 CPU cores) into `bundled.cache_dir()`, named by the bundle's checksum, and reused while it
    is valid (its file matches its metadata, which names this bundle); a damaged or stale copy is made
    again. The metadata comes checked against the file, so the caller need not read it again."""
    digest = bundled.AGE_MODEL_SHA256 or file_digest(bundled.bundled_model_path())
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    out = bundled.cache_dir() / f"age_model-{digest[:16]}{suffix}"
    if out.is_file():
        try:
            metadata = read_export_metadata(out)
        except checkpoint.ModelFileError as err:
            log.warning("%s; exporting the bundled model again", err)
        else:
            if metadata.get("model_format") == fmt and metadata.get("source", {}).get("sha256") == digest:
                return out, metadata
    log.info("exporting the bundled model to %s once (about half a minute), for later runs too: %s", fmt, out)
    model = checkpoint.load_model(bundled.DEFAULT_MODEL_NAME, "cpu")  # checks the bundle's checksum
    if model.metadata.get("sha256") != digest:
        raise ExportError("the bundled model's metadata does not name its weights file; reinstall")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, export_model(model, out, fmt, source=bundled.AGE_MODEL)
