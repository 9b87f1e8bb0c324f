"""Runtime backends: where a model's forward pass runs, behind one protocol (`AgeRunner`).

    runner, metadata = load_runner("default")                       # PyTorch (a run, a file, the bundle)
    runner, metadata = load_runner("age.onnx", backend="onnx")      # ONNX Runtime, from `age-detect export`
    runner(images)   # uint8 (B, 3, S, S) -> {"age": (B,), ["lower", "upper"]: (B,)} as numpy

Every backend returns the head's readout under the names of `AgeHead.output_names`, so the photo
predictor, the web app and the benchmarks never know which one runs. A new backend is a class here
with that call, and a branch in `load_runner`. The exported file format (a model file + `<stem>.json`)
is defined here too, where it is read; export/ writes it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from age_detect_resnet.digests import file_digest
from age_detect_resnet.extras import install_command
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.bundled import is_default
from age_detect_resnet.modeling.model import AgeModel, folded_for_inference, raw_outputs
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.runtime import autocast_factory, onnx_session, resolve_precision, select_device

BACKENDS = ("torch", "onnx", "torchscript")
EXPORT_FORMAT = "age-detect-resnet-export/1"
INPUT_NAME = "images"


class AgeRunner(Protocol):
    """(B, 3, S, S) uint8 -> {"age": (B,), and for heads with intervals "lower"/"upper": (B,)}."""

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """An `AgeModel` on batches: inference mode, bf16 autocast where the hardware has it,
    channels_last, optional flip test-time augmentation, and with `fold` (a runner kept for many
    batches) a copy of the model with its batch norms folded into its convolutions
    (`folded_for_inference`: a copy, so the caller's model is left as it is)."""

    def __init__(
        self,
        model: AgeModel,
        device: str | torch.device = "cpu",
        *,
        precision: str = "auto",
        tta_flip: bool = False,
        fold: bool = True,
    ) -> None:
        self.device = select_device(device)
        model = folded_for_inference(model) if fold else model
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.autocast = autocast_factory(self.device, resolve_precision(precision, self.device))
        self.tta_flip = tta_flip

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        images = torch.as_tensor(images).to(self.device, memory_format=torch.channels_last)
        with self.autocast():
            outputs = raw_outputs(self.model, images, tta_flip=self.tta_flip)
        return {name: value.cpu().numpy() for name, value in self.model.head.predict(outputs).items()}


class OnnxRunner:
    """An ONNX export on ONNX Runtime: uint8 (B, 3, S, S) in (a torch tensor or numpy array), numpy
    out; PyTorch is not used in the call."""

    def __init__(
        self, path: Path | str, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        self.session = onnx_session(path, threads=threads, providers=providers or None)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(images)  # torch CPU tensors convert without a copy when contiguous
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 3, S, S), got {array.dtype} {array.shape}")
        return dict(
            zip(self.output_names, self.session.run(self.output_names, {self.input_name: array}), strict=True)
        )


@contextmanager
def torchscript_warnings_said() -> Iterator[None]:
    """Without the FutureWarning of recent PyTorch that torch.jit is deprecated, printed on every trace,
    save and load: `age-detect export --format torchscript` says it once, in its own words, and a
    TorchScript file that loads is run as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


class TorchScriptRunner:
    """A TorchScript export (float32 on the CPU)."""

    def __init__(self, path: Path | str, outputs: Sequence[str]) -> None:
        with torchscript_warnings_said():
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.outputs = list(outputs)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        # No profiling executor: its first two calls take seconds, and it changes no result on the CPU.
        with torch.jit.optimized_execution(False):
            values = self.module(torch.as_tensor(images))
        return {name: value.numpy() for name, value in zip(self.outputs, values, strict=True)}


def metadata_path(path: Path) -> Path:
    """Where the metadata of an exported file lives: same folder and stem, `.json`."""
    return Path(path).with_suffix(".json")


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


def _bundled_export(backend: str) -> tuple[Path, dict[str, Any]]:
    """`export.exporter.bundled_export`, with what a user can fix (no exporter installed, a failed
    export) as a `ModelFileError`."""
    from age_detect_resnet.export.exporter import bundled_export  # export/ imports this module
    from age_detect_resnet.export.graph import ExportError

    try:
        return bundled_export(backend)
    except ImportError as err:
        raise checkpoint.ModelFileError(
            f"--backend {backend} with the bundled model exports it once, which needs the exporter "
            f"({err}): {install_command('export')}, or use --backend torch"
        ) from err
    except (ExportError, OSError) as err:
        raise checkpoint.ModelFileError(
            f"could not export the bundled model for --backend {backend} ({err}); use --backend torch"
        ) from err


def load_runner(
    model: AgeModel | Path | str | None = "default",
    *,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    tta_flip: bool = False,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> tuple[AgeRunner, dict[str, Any]]:
    """A runner and the metadata that says how to feed it (image size, framing).

    torch: a loaded AgeModel, a run folder, a .safetensors file or `default` (the bundled model).
    onnx / torchscript: a file from `age-detect export`, a run folder holding the default export, or
    `default`: the bundled model's export, made once into the user cache (`export.bundled_export`).
    Every problem a user can fix (no file, no metadata, no onnxruntime) is a `ModelFileError`."""
    if backend not in BACKENDS:
        raise checkpoint.ModelFileError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "torch":
        loaded = model if isinstance(model, AgeModel) else checkpoint.load_model(model, device)
        return TorchRunner(loaded, device, tta_flip=tta_flip), loaded.metadata
    if tta_flip:
        raise checkpoint.ModelFileError(
            f"flip averaging needs the torch backend; an {backend} export has none"
        )
    if isinstance(model, AgeModel):
        raise checkpoint.ModelFileError(
            f"--backend {backend} runs an exported file: create one with `age-detect export` and "
            "pass it as --model"
        )
    if is_default(model):
        path, metadata = _bundled_export(backend)
    else:
        path = Path(model)
        path = RunFolder(path).export(backend) if path.is_dir() else path
        metadata = read_export_metadata(path)
    if metadata.get("model_format") != backend:
        raise checkpoint.ModelFileError(f"{path} is a {metadata.get('model_format')} export, not {backend}")
    if backend == "torchscript":
        return TorchScriptRunner(path, metadata["outputs"]), metadata
    try:
        return OnnxRunner(path, providers=providers, threads=threads), metadata
    except ImportError as err:
        raise checkpoint.ModelFileError(
            f"running {path} needs ONNX Runtime ({err}); pip install onnxruntime"
        ) from err
