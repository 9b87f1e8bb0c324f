"""A trained model on disk: weights as safetensors (no pickle) + a JSON of everything needed to use it.

best.safetensors   the weights
best.json          architecture, head, image size, normalisation, age range, face framing,
                   the weights' sha256 (a changed or foreign file is refused)

The resumable training state (last.pt) is training/state.py's; where a run keeps its files, run_folder.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.digests import file_digest
from age_detect_resnet.modeling import bundled
from age_detect_resnet.modeling.model import AgeModel, model_from_description
from age_detect_resnet.run_folder import RunFolder

FORMAT = "age-detect-resnet/1"
# Models saved before the image size was recorded were trained at torchvision's 224 px.
DEFAULT_IMAGE_SIZE = 224


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names it and says why."""


def save_model(
    model: AgeModel, path: Path, metadata: dict[str, Any], *, dtype: torch.dtype | None = None
) -> None:
    """Write `path` (.safetensors) and its `.json` metadata, each atomically, weights first;
    `dtype` (e.g. float16, for a file half the size) converts the backbone's convolution and linear
    weights, which are nearly all of the bytes; normalisation statistics and the head stay float32."""
    path = Path(path)

    def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if (
            dtype is not None
            and tensor.is_floating_point()
            and tensor.ndim >= 2
            and (name.startswith("backbone.") or ".backbone." in name)  # an ensemble's members.N.backbone
        ):
            tensor = tensor.to(dtype)
        return tensor.detach().cpu().contiguous()

    state = {k: stored(k, v) for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
        digest = file_digest(tmp)
    full = {"format": FORMAT, "model": model.describe(), **metadata, "sha256": digest}
    write_text_atomic(path.with_suffix(".json"), json.dumps(full, indent=2) + "\n")


def resolve_model_path(path: Path | str | None) -> Path:
    """A run folder means its best model; `default` (or None) the model bundled with the package;
    otherwise the .safetensors file itself."""
    if bundled.is_default(path):
        try:
            return bundled.bundled_model_path()
        except bundled.BundledModelError as err:
            raise ModelFileError(str(err)) from err
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).best
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist; pass a run folder (runs/NAME) or its best.safetensors")
    if path.name == RunFolder(path.parent).last.name:
        raise ModelFileError(
            f"{path} is a training state (for `age-detect train --resume`), not a model: pass its run "
            f"folder {path.parent} or its best.safetensors"
        )
    if path.suffix != ".safetensors":
        export = {".onnx": "onnx", ".pt": "torchscript"}.get(path.suffix.lower())
        hint = (
            f"; it looks like an export from `age-detect export`: run it with --backend {export} "
            f"(Python: backend={export!r})"
            if export
            else ""
        )
        raise ModelFileError(
            f"{path} is not a .safetensors model; trained models are saved as best.safetensors{hint}"
        )
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    path = resolve_model_path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ModelFileError(
            f"{path} has no metadata file {meta_path.name} beside it; it was not saved by this project"
        )
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{meta_path} is not valid JSON ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ModelFileError(f"{meta_path} is not metadata of this project (expected format {FORMAT})")
    return metadata


def load_model(path: Path | str | None, device: torch.device | str = "cpu") -> AgeModel:
    """The trained model at `path` (run folder, .safetensors, or `default`/None for the bundled
    model) in eval mode, with `.metadata` set."""
    path = resolve_model_path(path)
    metadata = read_metadata(path)
    if metadata.get("sha256") != file_digest(path):
        raise ModelFileError(
            f"{path} does not match the checksum in {path.with_suffix('.json').name}: "
            "the file was changed or replaced; re-copy it from the run folder"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{path} is not a readable safetensors file ({err})") from err
    model = model_from_description(metadata["model"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(
            f"{path} does not fit the architecture in its metadata: {str(err)[:300]}"
        ) from err
    model.metadata = metadata
    return model.to(device).eval()


def image_size_of(model_or_metadata: AgeModel | dict[str, Any]) -> int:
    """The side in pixels of the square faces a model takes (from its metadata)."""
    metadata = model_or_metadata if isinstance(model_or_metadata, dict) else model_or_metadata.metadata
    return int(metadata.get("image_size", DEFAULT_IMAGE_SIZE))
