"""Export a trained model to ONNX or TorchScript, and run an exported ONNX model with ONNX Runtime.

    age-detect export --model runs/NAME --format onnx --out age.onnx
    age-detect export --model runs/NAME --format torchscript --out age.torchscript.pt
    age-detect export --model runs/NAME --out age-int8.onnx --quantize int8 --check-images data/faces/

The exported graph takes what `AgePredictor` feeds any runner, uint8 images (B, 3, S, S) RGB, and
returns the ages (B,) and, for the distribution head, the lower and upper ages of the calibrated
interval (B,): a consumer needs no head logic. Beside it, `<stem>.json` holds what a consumer needs
to crop and resize exactly as in training (image size, crop margins), the output names and the head.

Every export is run before it is kept (ONNX Runtime or TorchScript, one image and a batch) and must
give the float32 PyTorch ages within `TOLERANCE_YEARS` (int8: on average within `INT8_TOLERANCE_YEARS`).

    predictor = load_onnx_predictor("age.onnx", detector=create_detector())
    faces = predictor.predict("photo.jpg")
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from age_detect_resnet import checkpoint
from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.dataset import to_input_tensor
from age_detect_resnet.digests import file_digest
from age_detect_resnet.faces import FaceDetector
from age_detect_resnet.heads import DistributionHead
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.inference import AgePredictor, AgeRunner
from age_detect_resnet.model import AgeModel
from age_detect_resnet.preprocessing.prepare import load_split
from age_detect_resnet.preprocessing.sources import image_root

log = logging.getLogger(__name__)

EXPORT_FORMAT = "age-detect-resnet-export/1"
FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
# The contract: an exported model gives PyTorch's float32 ages within 0.01 years.
TOLERANCE_YEARS = 0.01
# int8 is kept only if its ages stay this close to float32 on average, which bounds its change of MAE.
INT8_TOLERANCE_YEARS = 0.1
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
    calibrated on `calibration` (N, 3, S, S) uint8 real face crops."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT_NAME: image[None]} for image in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    ir_log = logging.getLogger("onnx_ir")  # logs every graph rewrite at INFO
    level = ir_log.level
    ir_log.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(dir=Path(target).parent) as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
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
            )
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


def image_files(sources: Sequence[Path], *, limit: int) -> list[Path]:
    """Up to `limit` images from files and folders, spread evenly over each folder's sorted files."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(found[:: max(1, len(found) // limit)][:limit])
        elif source.is_file():
            files.append(source)
        else:
            raise ExportError(f"check image source {source} does not exist")
    if not files:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, sources))}")
    return files[:limit]


def check_batch(sources: Sequence[Path] | None, image_size: int, *, limit: int = 32) -> torch.Tensor:
    """(N, 3, S, S) uint8 images to check an export on: face crops resized as in training, or without
    `sources` fixed random pixels (enough to compare two implementations of one graph)."""
    if not sources:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (8, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    tensors = []
    for path in image_files(sources, limit=limit):
        try:
            tensors.append(to_input_tensor(load_rgb(path), image_size))
        except ImageReadError as err:
            log.warning("not checking on %s", err)
    if not tensors:
        raise ExportError("none of the check images could be read")
    return torch.stack(tensors)


def run_test_images(model_path: Path, *, limit: int = 32) -> list[Path]:
    """Up to `limit` images of the test split saved with the model's run, where its data is on this
    machine: the default check is then on real faces the model never trained on."""
    folder = model_path if model_path.is_dir() else model_path.parent
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))["data"]
        prepared = load_split(folder / "split.csv", image_root(data["dataset"], Path(data["data_root"])))
        paths = [prepared.root / p for p in prepared.split("test")["path"]]
    except (OSError, KeyError, TypeError, ValueError) as err:  # no run folder, or not this machine's data
        log.debug("no test images of the run beside %s: %s", model_path, err)
        return []
    return [p for p in paths[:: max(1, len(paths) // limit)] if p.is_file()][:limit]


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
) -> dict[str, float]:
    """Differences between an export and PyTorch, running the whole batch and its first image alone
    (which also proves the batch axis is dynamic)."""
    stats = compare(reference, runner(images))
    alone = compare({k: v[:1] for k, v in reference.items()}, runner(images[:1]))
    return {k: max(v, alone[k]) if k.endswith("_max_abs_diff") else v for k, v in stats.items()}


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
            "pixels": "RGB 0-255: the face crop (margins in 'crop') resized with PIL bilinear",
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
    source: Path | None = None,
) -> dict[str, Any]:
    """Export `model` to `out` and write its metadata JSON; returns the metadata.

    The file replaces `out` only after passing its check against float32 PyTorch: every output within
    `TOLERANCE_YEARS`, or for int8 (which needs real `check_images`: every other one calibrates, the
    rest check) the mean age difference within `INT8_TOLERANCE_YEARS`.
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
    images = check_batch(check_images, int(model.metadata.get("image_size", 224)))
    calibration = None
    if quantize == "int8":
        if len(images) < 4:
            raise ExportError("--quantize int8 needs at least 4 readable check images")
        calibration, images = images[::2].numpy(), images[1::2]
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
        check = {
            "images": "real" if check_images else "random",
            "count": len(images),
            **check_export(runner, reference, images),
        }
        if quantize == "int8":
            error, limit, how = check["age_mean_abs_diff"], INT8_TOLERANCE_YEARS, "on average"
        else:
            worst = max(v for k, v in check.items() if k.endswith("_max_abs_diff"))
            error, limit, how = worst, TOLERANCE_YEARS, "at most"
        if not error <= limit:  # also catches NaN
            raise ExportError(
                f"the exported model's outputs differ from PyTorch's by {error:.4f} years {how} on "
                f"{len(images)} images (limit {limit}); {out} was not written"
            )
        metadata = export_metadata(
            model, tmp, fmt, name=out.name, quantize=quantize, source=source, check=check
        )
    write_text_atomic(meta, json.dumps(metadata, indent=2) + "\n")
    log.info(
        "exported %s (%.1f MB) and %s; outputs within %.2g years of PyTorch",
        out,
        out.stat().st_size / 1e6,
        meta.name,
        error,
    )
    return metadata


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
    parser.add_argument("--model", required=True, type=Path, help="run folder or its best.safetensors")
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
        help="int8: static int8 ONNX, kept only if its ages stay within "
        f"{INT8_TOLERANCE_YEARS} years of float32 on average (needs real check images, see below)",
    )
    parser.add_argument(
        "--check-images",
        type=Path,
        nargs="+",
        help="face crops (files or folders; 32 are used) to check the export on and to calibrate "
        "int8 (default: the run's test images where they are on this machine, else random pixels)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        model = checkpoint.load_model(args.model, "cpu")
        out = args.out or default_out(args.model, args.format)
        check_images = args.check_images or run_test_images(args.model)
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
            source=checkpoint.resolve_model_path(args.model),
        )
    except (checkpoint.ModelFileError, ExportError) as err:
        log.error("%s", err)
        return 2
    worst = max(v for k, v in metadata["check"].items() if k.endswith("_max_abs_diff"))
    print(
        f"wrote {out} and {metadata_path(out).name}: outputs {', '.join(metadata['outputs'])}; "
        f"largest difference from PyTorch {worst:.5f} years on {metadata['check']['count']} "
        f"{metadata['check']['images']} images"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="age-detect export", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
