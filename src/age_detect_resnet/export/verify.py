"""Checking an export before it is kept: the images it is checked on, the float32 PyTorch reference,
and the verdicts (float exports within `TOLERANCE_YEARS`; int8 by the MAE it adds, see export_model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from age_detect_resnet.export.graph import ExportedAgeModel, ExportError
from age_detect_resnet.images import IMAGE_SUFFIXES, ImageReadError, load_rgb
from age_detect_resnet.inference.backends import AgeRunner
from age_detect_resnet.inference.predictor import face_crop_input
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.run_folder import RunFolderError, SavedSplit

log = logging.getLogger(__name__)
T = TypeVar("T")

# The contract: an exported model gives PyTorch's float32 ages within 0.01 years.
TOLERANCE_YEARS = 0.01
# int8 is kept only if it costs at most this much MAE (the speed issue's budget); see export_model.
INT8_TOLERANCE_YEARS = 0.1
# Faces the int8 gate uses from a run: enough for its MAE difference to be measured to ~0.03 years.
INT8_CHECK_IMAGES = 512
INT8_CALIBRATION_IMAGES = 256


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
    image_size = image_size_of(metadata)
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


def run_split_images(
    model_path: Path, split: str = "test", *, limit: int = 32, data_root: Path | None = None
) -> dict[Path, float]:
    """`labelled_split_images`, or none where they are not on this machine: an export's check then falls
    back to other images (the reason is logged at debug level)."""
    try:
        return labelled_split_images(model_path, split, limit=limit, data_root=data_root)
    except (OSError, RunFolderError, KeyError, ValueError) as err:  # not this machine's data
        log.debug("no %s images of %s: %s", split, model_path, err)
        return {}


def labelled_split_images(
    model_path: Path, split: str = "test", *, limit: int = 32, data_root: Path | None = None
) -> dict[Path, float]:
    """Up to `limit` images of a split the model was trained with (its run's, or the bundled model's),
    with their ages, where its data is on this machine (in `data_root`, else where the run found it; the
    bundled model's split knows no folder): labelled real faces the model never trained on. Where there
    are none, a RunFolderError says why (no split, no such images, none of them in the folder), for a
    check that needs them (scripts/bundle_model.py)."""
    saved = SavedSplit.of(model_path)
    if saved is None:
        raise RunFolderError(f"{model_path} has no saved split (split.csv): its {split} images are unknown")
    try:
        prepared = saved.load(data_root)
        rows = prepared.split(split)
        labelled = [(prepared.root / p, float(a)) for p, a in zip(rows["path"], rows["age"], strict=True)]
    except RunFolderError:  # no data root: it says what to pass
        raise
    except (OSError, KeyError, ValueError) as err:
        raise RunFolderError(
            f"the {split} images of {saved.owner} cannot be listed from {saved.path} ({err})"
        ) from err
    if not labelled:
        raise RunFolderError(f"{saved.owner} has no {split} images in {saved.path}")
    found = {path: age for path, age in evenly_spaced(labelled, limit) if path.is_file()}
    if not found:
        raise RunFolderError(
            f"none of the {split} images of {saved.owner} are in {prepared.root} (e.g. "
            f"{labelled[0][0].name}): pass --data-root with the folder of its {saved.dataset} images"
        )
    return found


@torch.inference_mode()
def reference_outputs(model: AgeModel, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The float32 eager PyTorch outputs an export must reproduce."""
    values = ExportedAgeModel(model.float().eval())(images)
    return {name: value.numpy() for name, value in zip(model.head.output_names, values, strict=True)}


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
