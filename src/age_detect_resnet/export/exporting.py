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

    predictor = load_onnx_predictor("age.onnx", detector=create_detector())
    faces = predictor.predict("photo.jpg")
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.digests import file_digest
from age_detect_resnet.faces.detection import FaceDetector
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, AgeRunner, face_crop_input
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import DistributionHead
from age_detect_resnet.modeling.model import AgeModel

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPORT_FORMAT = "age-detect-resnet-export/1"
FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
# The contract: an exported model gives PyTorch's float32 ages within 0.01 years.
TOLERANCE_YEARS = 0.01
# int8 is kept only if it costs at most this much MAE (the speed issue's budget); see the module notes.
INT8_TOLERANCE_YEARS = 0.1
# Faces the int8 gate uses from a run: enough for its MAE difference to be measured to ~0.03 years.
INT8_CHECK_IMAGES = 512
INT8_CALIBRATION_IMAGES = 256
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Example batch of 2, not 1: with 1 the exporters may specialise the batch axis to a constant.
_EXAMPLE_BATCH = 2


class ExportError(RuntimeError):
    """An export that could not be made or did not pass its check; the message says why."""


class ExportedAgeModel(nn.Module):
    """The exported graph: uint8 (B, 3, S, S) -> ages (B,) [, lower (B,), upper (B,)]."""

    def __init__(self, model: AgeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)  # (B, K) raw head outputs
        head = self.model.head
        ages = head.decode(outputs)  # (B,)
        if isinstance(head, DistributionHead):
            bounds = head.interval_bounds(outputs)  # (B, 2)
            return ages, bounds[:, 0], bounds[:, 1]
        return (ages,)


def output_names(model: AgeModel) -> list[str]:
    """The names of `ExportedAgeModel`'s outputs, as `AgeRunner` results name them."""
    return ["age", "lower", "upper"] if isinstance(model.head, DistributionHead) else ["age"]


def metadata_path(path: Path) -> Path:
    """Where the metadata of an exported file lives: same folder and stem, `.json`."""
    return Path(path).with_suffix(".json")


def _searchsorted_onnx(sorted_sequence, values, out_int32=False, right=False, side=None, sorter=None):
    """ONNX for `torch.searchsorted` on the last axis (the distribution head's quantiles), which no
    PyTorch exporter translates: a value's index is the count of sequence entries below it."""
    import onnx
    from onnxscript import opset18 as op

    sequence = op.Unsqueeze(sorted_sequence, [-2])  # (B, 1, K)
    points = op.Unsqueeze(values, [-1])  # (B, Q, 1)
    below = op.LessOrEqual(sequence, points) if right or side == "right" else op.Less(sequence, points)
    index_type = onnx.TensorProto.INT32 if out_int32 else onnx.TensorProto.INT64
    return op.ReduceSum(op.Cast(below, to=index_type), [-1], keepdims=0)  # (B, Q)


def _example(model: AgeModel) -> torch.Tensor:
    size = int(model.metadata.get("image_size", 224))
    return torch.zeros(_EXAMPLE_BATCH, 3, size, size, dtype=torch.uint8)


def export_onnx(model: AgeModel, path: Path) -> None:
    """Write `ExportedAgeModel(model)` as one self-contained ONNX file with a dynamic batch axis."""
    import onnx

    try:
        torch.onnx.export(
            ExportedAgeModel(model).eval(),
            (_example(model),),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=output_names(model),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            custom_translation_table={torch.ops.aten.searchsorted.Tensor: _searchsorted_onnx},
            verbose=False,
        )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # the exporter and the checker raise many types, with long reports
        raise ExportError(f"ONNX export failed: {str(err)[:800]}") from err


def export_torchscript(model: AgeModel, path: Path) -> None:
    """Write `ExportedAgeModel(model)` as traced TorchScript (the batch axis stays dynamic)."""
    log.info("TorchScript is deprecated by PyTorch; ONNX is the export format this project recommends")
    # check_trace=False: `export_model` checks the saved file itself, on other images and batch sizes.
    traced = torch.jit.trace(ExportedAgeModel(model).eval(), _example(model), check_trace=False)
    torch.jit.save(traced, str(path))


def quantize_int8(source: Path, target: Path, calibration: np.ndarray) -> None:
    """Static int8 quantisation of an ONNX export (QDQ, per-channel weights), its activation ranges
    calibrated on `calibration` (N, 3, S, S) uint8 real face crops.

    Ranges are the 99.99th percentile of each activation, not its extreme: on the trained UTKFace
    models that halves the mean age change of min-max ranges (0.62 -> 0.31 years on 256 faces)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        """Batches of 8 images, handed over one at a time (`set_range`), so that the calibrator
        keeps the activations of 8 images, not all of them (gigabytes at 224 px)."""

        def __init__(self) -> None:
            self.batches = [{INPUT_NAME: calibration[i : i + 8]} for i in range(0, len(calibration), 8)]
            self.items = iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    ir_log = logging.getLogger("onnx_ir")  # logs every graph rewrite at INFO
    level = ir_log.level
    ir_log.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(dir=Path(target).parent) as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            # The percentile calibrator prints its progress to stdout, which belongs to the caller
            # (a benchmark's table, a pipe): it goes to the log instead.
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter):
                quantize_static(
                    str(prepared),
                    str(target),
                    Batches(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    # Convolutions are nearly all the work; the head's few matrix products stay float,
                    # where quantising them would cost precision and save nothing.
                    op_types_to_quantize=["Conv"],
                    calibrate_method=CalibrationMethod.Percentile,
                    extra_options={"CalibPercentile": 99.99, "CalibStridedMinMax": 1},  # 1 batch at a time
                )
            log.debug("calibration: %s", chatter.getvalue().strip())
    finally:
        ir_log.setLevel(level)


class OnnxRunner:
    """The `AgeRunner` protocol on ONNX Runtime: uint8 (B, 3, S, S) in (a torch tensor or numpy array),
    numpy ages out; PyTorch is not used in the call."""

    def __init__(
        self, path: Path | str, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = (
            list(providers)
            if providers
            else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        )
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(images)  # torch CPU tensors convert without a copy when contiguous
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 3, S, S), got {array.dtype} {array.shape}")
        return dict(
            zip(self.output_names, self.session.run(self.output_names, {self.input_name: array}), strict=True)
        )


class TorchScriptRunner:
    """The `AgeRunner` protocol on a TorchScript export (float32 on the CPU)."""

    def __init__(self, path: Path | str, outputs: Sequence[str]) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.outputs = list(outputs)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        # No profiling executor: its first two calls take seconds, and it changes no result on the CPU.
        with torch.jit.optimized_execution(False):
            values = self.module(torch.as_tensor(images))
        return {name: value.numpy() for name, value in zip(self.outputs, values, strict=True)}


def evenly_spaced(items: Sequence[T], limit: int) -> list[T]:
    """At most `limit` of `items`, spread evenly from the first to near the last (a stride alone,
    cut at `limit`, would keep only the start of a sorted list, e.g. the youngest faces)."""
    if len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def image_files(sources: Sequence[Path], *, limit: int) -> list[Path]:
    """Up to `limit` images from files and folders, spread evenly over each folder's sorted files."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(evenly_spaced(found, limit))
        elif source.is_file():
            files.append(source)
        else:
            raise ExportError(f"check image source {source} does not exist")
    if not files:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, sources))}")
    return files[:limit]


def check_batch(
    sources: Sequence[Path] | None, metadata: dict[str, Any], *, limit: int = 32
) -> tuple[torch.Tensor, list[Path]]:
    """(N, 3, S, S) uint8 images to check an export on, and the files they came from: face crops
    framed as in training (aligned, for aligned models), or without `sources` fixed random pixels
    (enough to compare two implementations of one graph) and no files."""
    image_size = int(metadata.get("image_size", 224))
    if not sources:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (8, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
        return pixels, []
    tensors, used = [], []
    for path in image_files(sources, limit=limit):
        try:
            tensors.append(face_crop_input(load_rgb(path), metadata))
            used.append(path)
        except ImageReadError as err:
            log.warning("not checking on %s", err)
    if not tensors:
        raise ExportError("none of the check images could be read")
    return torch.stack(tensors), used


def run_split_images(model_path: Path, split: str = "test", *, limit: int = 32) -> dict[Path, float]:
    """Up to `limit` images of a split saved with the model's run, with their ages, where its data is
    on this machine: the default check is then on labelled real faces the model never trained on."""
    folder = model_path if model_path.is_dir() else model_path.parent
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))["data"]
        prepared = load_split(folder / "split.csv", image_root(data["dataset"], Path(data["data_root"])))
        rows = prepared.split(split)
        labelled = [(prepared.root / p, float(a)) for p, a in zip(rows["path"], rows["age"], strict=True)]
    except (OSError, KeyError, TypeError, ValueError) as err:  # no run folder, or not this machine's data
        log.debug("no %s images of the run beside %s: %s", split, model_path, err)
        return {}
    return {path: age for path, age in evenly_spaced(labelled, limit) if path.is_file()}


@torch.inference_mode()
def reference_outputs(model: AgeModel, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The float32 eager PyTorch outputs an export must reproduce."""
    values = ExportedAgeModel(model.float().eval())(images)
    return {name: value.numpy() for name, value in zip(output_names(model), values, strict=True)}


def compare(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, the maximum and mean absolute difference in years."""
    if set(reference) != set(exported):
        raise ExportError(f"the export has outputs {sorted(exported)}, expected {sorted(reference)}")
    stats = {}
    for name, value in reference.items():
        difference = np.abs(exported[name].astype(np.float64) - value)
        stats[f"{name}_max_abs_diff"] = float(difference.max())
        stats[f"{name}_mean_abs_diff"] = float(difference.mean())
    return stats


def check_export(
    runner: AgeRunner, reference: dict[str, np.ndarray], images: torch.Tensor
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Differences between an export and PyTorch, running the whole batch and its first image alone
    (which also proves the batch axis is dynamic); and the export's outputs on the batch."""
    outputs = runner(images)
    stats = compare(reference, outputs)
    alone = compare({k: v[:1] for k, v in reference.items()}, runner(images[:1]))
    stats = {k: max(v, alone[k]) if k.endswith("_max_abs_diff") else v for k, v in stats.items()}
    return stats, outputs


def int8_verdict(
    check: dict[str, Any], reference: np.ndarray, exported: np.ndarray, ages: np.ndarray | None
) -> str | None:
    """Why an int8 export must not be kept (None: keep it); records the MAEs in `check`.

    With the true `ages`, the test is the MAE int8 adds; without them, the mean age change, which
    bounds any change of MAE."""
    if ages is not None:
        check["age_mae_float32"] = float(np.abs(reference - ages).mean())
        check["age_mae_int8"] = float(np.abs(exported - ages).mean())
        added = check["age_mae_int8"] - check["age_mae_float32"]
        if not added <= INT8_TOLERANCE_YEARS:  # also catches NaN
            return (
                f"int8 raises the MAE on {len(ages)} labelled test faces from {check['age_mae_float32']:.3f} "
                f"to {check['age_mae_int8']:.3f} years (limit +{INT8_TOLERANCE_YEARS}); "
                "use the float32 export"
            )
        return None
    shift = check["age_mean_abs_diff"]
    if not shift <= INT8_TOLERANCE_YEARS:
        return (
            f"int8 ages differ from float32 by {shift:.3f} years on average on {len(reference)} "
            f"unlabelled images (limit {INT8_TOLERANCE_YEARS}); without true ages only that bound is "
            "safe: export from a run whose test images are on this machine to judge int8 by its MAE"
        )
    return None


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
    size = int(model.metadata.get("image_size", 224))
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
        "outputs": output_names(model),
        "quantize": quantize,
        "source": {"path": str(source) if source else None, "sha256": model.metadata.get("sha256")},
        "exporter": f"torch {torch.__version__} "
        + ("torch.onnx (dynamo)" if fmt == "onnx" else "torch.jit.trace"),
        "check": check,
    }


def _json_format(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


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
            "check its ages: pass --check-images FOLDER (or export from a run whose test images are here)"
        )
    out = Path(out)
    meta = metadata_path(out)
    if out.suffix == ".json":
        raise ExportError(
            f"{out}: the metadata goes to <stem>.json; give the model file another suffix (.onnx)"
        )
    if meta.is_file() and _json_format(meta) != EXPORT_FORMAT:
        raise ExportError(
            f"--out {out} would overwrite {meta}, which is not export metadata (the trained "
            "model's own?); choose another file name"
        )
    model = model.float().eval().to("cpu")
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
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            export_torchscript(model, tmp)
            runner: AgeRunner = TorchScriptRunner(tmp, output_names(model))
        else:
            if calibration is None:
                export_onnx(model, tmp)
            else:
                with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
                    export_onnx(model, Path(scratch) / "float.onnx")
                    quantize_int8(Path(scratch) / "float.onnx", tmp, calibration)
            runner = OnnxRunner(tmp, providers=["CPUExecutionProvider"])
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


def describe_check(check: dict[str, Any]) -> str:
    """One line on how an export compared with float32 PyTorch."""
    worst = max(v for k, v in check.items() if k.endswith("_max_abs_diff"))
    line = (
        f"largest difference from PyTorch {worst:.5f} years, mean {check['age_mean_abs_diff']:.5f}, "
        f"on {check['count']} {check['images']} images"
    )
    if "age_mae_int8" in check:
        line += f"; MAE int8 {check['age_mae_int8']:.3f} vs float32 {check['age_mae_float32']:.3f} years"
    return line


def read_export_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata JSON of an exported file, checked to belong to that file."""
    path = Path(path)
    meta = metadata_path(path)
    if not path.is_file():
        raise checkpoint.ModelFileError(f"{path} does not exist; create it with `age-detect export`")
    if not meta.is_file():
        raise checkpoint.ModelFileError(
            f"{path} has no metadata {meta.name} beside it; re-run `age-detect export` "
            "or copy the .json together with the model file"
        )
    try:
        metadata = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise checkpoint.ModelFileError(f"{meta} is not valid JSON ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise checkpoint.ModelFileError(
            f"{meta} is not export metadata of this project (format {EXPORT_FORMAT})"
        )
    if metadata.get("sha256") != file_digest(path):
        raise checkpoint.ModelFileError(
            f"{path} does not match the checksum in {meta.name}: the file was changed "
            "or belongs to another export; re-export it"
        )
    return metadata


def load_onnx_predictor(
    path: Path | str,
    detector: FaceDetector | None = None,
    *,
    batch_size: int = 32,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> AgePredictor:
    """An `AgePredictor` whose model runs on ONNX Runtime: same detection, crop and resize as PyTorch.

    `path` is an exported .onnx file, or a run folder holding the default export (age_model.onnx).
    Every problem a user can fix (no file, no metadata, no onnxruntime) is a `ModelFileError`.
    """
    path = default_out(Path(path), "onnx") if Path(path).is_dir() else Path(path)
    metadata = read_export_metadata(path)
    if metadata.get("model_format") != "onnx":
        raise checkpoint.ModelFileError(f"{path} is a {metadata.get('model_format')} export, not ONNX")
    try:
        runner = OnnxRunner(path, providers=providers, threads=threads)
    except ImportError as err:
        raise checkpoint.ModelFileError(
            f"running {path} needs ONNX Runtime ({err}); pip install 'age-detect-resnet[export]'"
        ) from err
    return AgePredictor(runner=runner, metadata=metadata, detector=detector, batch_size=batch_size)


def default_out(model_path: Path, fmt: str) -> Path:
    """`age_model.onnx` / `age_model.torchscript.pt` beside the trained model (never its best.json)."""
    folder = model_path if model_path.is_dir() else model_path.parent
    return folder / ("age_model.onnx" if fmt == "onnx" else "age_model.torchscript.pt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        type=Path,
        help="run folder, its best.safetensors, or default: the bundled model",
    )
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument(
        "--out",
        type=Path,
        help="exported file; its metadata goes to the same name with .json "
        "(default: <run>/age_model.onnx or age_model.torchscript.pt)",
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help=f"int8: static int8 ONNX, kept only if it adds at most {INT8_TOLERANCE_YEARS} years of MAE "
        "on the run's test faces (with --check-images, which carry no ages: only if its ages stay "
        f"within {INT8_TOLERANCE_YEARS} years of float32 on average)",
    )
    parser.add_argument(
        "--check-images",
        type=Path,
        nargs="+",
        help=f"face crops (files or folders; 32 are used, {INT8_CHECK_IMAGES} for int8, half of them to "
        "calibrate) to check the export on (default: the run's test images where they are on this "
        "machine, int8 calibrated on its validation images; else random pixels)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        model = checkpoint.load_model(args.model, "cpu")
        out = args.out or default_out(args.model, args.format)
        int8 = args.quantize == "int8"
        check_ages = None
        check_images = args.check_images
        calibration_images = None
        if not check_images:  # the run's held-out faces, labelled; int8 calibrates on validation faces
            check_ages = run_split_images(args.model, "test", limit=INT8_CHECK_IMAGES if int8 else 32)
            check_images = list(check_ages)
            if int8:
                calibration_images = list(run_split_images(args.model, "val", limit=INT8_CALIBRATION_IMAGES))
        if not check_images:
            log.warning(
                "checking the export on random pixels: the run's test images are not on this machine; "
                "pass --check-images with a folder of face crops to check it on real faces"
            )
        metadata = export_model(
            model,
            out,
            args.format,
            quantize=args.quantize,
            check_images=check_images,
            check_ages=check_ages,
            calibration_images=calibration_images,
            source=checkpoint.resolve_model_path(args.model),
        )
    except (checkpoint.ModelFileError, ExportError) as err:
        log.error("%s", err)
        return 2
    print(
        f"wrote {out} and {metadata_path(out).name}: outputs {', '.join(metadata['outputs'])}; "
        + describe_check(metadata["check"])
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="age-detect export", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
