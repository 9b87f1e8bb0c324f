"""Evaluate a trained model on its own test split or on any dataset, with an honest per-age report.

    age-detect evaluate --model runs/NAME                                  # the run's saved test split
    age-detect evaluate --model runs/NAME --split val                      # ... or validation split
    age-detect evaluate --split test --data-root UTKFace/                  # the bundled model's test split
    age-detect evaluate --model runs/NAME --dataset csv --data-root other.csv --split all
    age-detect evaluate --model runs/NAME --dataset csv --data-root photos.csv --split all --detect
    age-detect evaluate --model runs/NAME --by gender,ethnicity            # error per group of people
    age-detect evaluate --model age-int8.onnx --backend onnx --dataset csv --data-root photos.csv --split all

Writes predictions.csv, evaluation.json, evaluation.md and plots/ into --out (default:
<run>/eval-<dataset>-<split>, with a CSV's name, --tta and another backend: `run_folder.evaluation_name`).
`evaluate_model` is the evaluation; cli/evaluate.py the command.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from age_detect_resnet.data.dataset import AgeDataset, FileImages, make_loader
from age_detect_resnet.data.sources import check_columns, dataset_at, image_root, load_table, with_columns
from age_detect_resnet.data.splits import PreparedData
from age_detect_resnet.evaluation.groups import group_errors
from age_detect_resnet.evaluation.report import (
    evaluation_metrics,
    prediction_frame,
    readout_frame,
    write_evaluation,
)
from age_detect_resnet.faces.align import Aligner, framing_of, head_pose
from age_detect_resnet.faces.detection import subject_faces
from age_detect_resnet.inference.backends import AgeRunner, load_runner
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.heads import AgeHead, create_head
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.run_folder import RunFolder, SavedSplit, evaluation_name
from age_detect_resnet.runtime import autocast_factory, resolve_precision, select_device
from age_detect_resnet.training.config import ConfigError
from age_detect_resnet.training.engine import Predictions, evaluate

log = logging.getLogger(__name__)


# The splits a run saves in split.csv that can be evaluated by name (`--split test|val`).
SAVED_SPLITS = ("test", "val")


# Datasets whose file names identify one photo (UTKFace's hold its capture time to the millisecond,
# IMDB-WIKI's a person and picture id): one of their images copied elsewhere or listed by a CSV is still
# known by its name, so evaluation can say when a model is judged on faces it trained on.
NAMES_IDENTIFY_PHOTOS = ("utkface", "imdb-wiki")


def evaluation_table(
    saved: SavedSplit | None,
    *,
    dataset: str | None,
    data_root: str | Path | None,
    meta: str | Path | None,
    split: str,
    by: Sequence[str],
    min_age: float,
    max_age: float,
    limit: int | None,
) -> tuple[pd.DataFrame, Path, str]:
    """The images to evaluate, their root folder, and the dataset's name (the model's where not given).
    `saved` is the split the model was trained with (`SavedSplit.of`): `split` test or val evaluates its
    held-out images; with "all" on its own dataset, the images it trained on are counted in `trained_on`
    of the table's attrs, and a warning says how many. The table's attrs also hold the data root read
    (`data_root`: for a CSV the file, not the images' folder) and, with "all", the dataset's rows left out,
    by reason (`removed`: the adapter's, then those outside `min_age`-`max_age`)."""
    if dataset is None and data_root is not None and meta is None:
        dataset = dataset_at(Path(data_root), saved.dataset if saved else None)
    dataset = dataset or (saved.dataset if saved else None)
    if dataset is None:
        raise ConfigError("--dataset is needed: the model has no run folder to take it from")
    own_dataset = saved is not None and dataset == saved.dataset
    if split in SAVED_SPLITS:
        if not own_dataset:
            raise ConfigError(
                f"--split {split} needs the split the model was trained with (a run folder's split.csv, or "
                "the bundled model's) and its own dataset; for another dataset use --split all"
            )
        prepared: PreparedData = saved.load(data_root)
        data_root = data_root if data_root is not None else saved.data_root  # not None: load checked it
        images = prepared.split(split)
        missing = [path for path in images["path"] if not (prepared.root / path).is_file()]
        if missing:
            raise ConfigError(
                f"{len(missing):,} of the {len(images):,} {split} images of {saved.owner} are not in "
                f"{prepared.root} (e.g. {missing[0]}): pass --data-root with the {dataset} folder it "
                "was trained on"
            )
        images = with_columns(images, by, dataset, Path(data_root), meta)
        images.attrs["data_root"] = str(data_root)
        return images, prepared.root, dataset
    data_root = Path(data_root or (saved.data_root if own_dataset else None) or "data/raw")
    table, root = load_table(dataset, data_root, meta=Path(meta) if meta else None)
    check_columns(by, set(table.columns), data_root)
    removed = dict(table.attrs.get("removed", {}))
    in_range = labelled_in_range(table, min_age, max_age)
    if not in_range.all():
        log.warning(
            "%s of the %s images in %s are labelled outside ages %g-%g%s and are not evaluated "
            "(--min-age/--max-age)",
            f"{int((~in_range).sum()):,}",
            f"{len(table):,}",
            data_root,
            min_age,
            max_age,
            " (an age group: with none of its ages inside)" if "age_from_group" in table else "",
        )
    removed[f"images labelled outside ages {min_age:g}-{max_age:g}"] = int((~in_range).sum())
    table = table[in_range]
    if limit is not None:
        table = table.sample(min(limit, len(table)), random_state=0)
    table = table.reset_index(drop=True)
    table.attrs.update(removed=removed, data_root=str(data_root))
    # The same dataset in the same folder (or, for the bundled model, whose folder is unknown, by name)
    same_images = own_dataset and (
        saved.data_root is None or image_root(dataset, saved.data_root).resolve() == root.resolve()
    )
    if same_images:
        trained_on = int(table["path"].astype(str).isin(saved.paths("train")).sum())
        table.attrs["trained_on"] = trained_on
        which = "are ones"
    elif saved is not None and saved.dataset in NAMES_IDENTIFY_PHOTOS:
        # Its images in another folder, or listed by a CSV: known by their file names.
        names = {PurePath(path).name for path in saved.paths("train")}
        trained_on = int(table["path"].astype(str).map(lambda path: PurePath(path).name).isin(names).sum())
        if trained_on:
            table.attrs["trained_on"] = trained_on
        which = f"have the file names of {saved.dataset} images"
    else:
        return table, root, dataset
    if trained_on:
        log.warning(
            "%s of the %s images evaluated %s %s trained on, so their errors flatter it: "
            "--split test evaluates it on the %s %s images it never saw",
            f"{trained_on:,}",
            f"{len(table):,}",
            which,
            saved.owner,
            f"{len(saved.paths('test')):,}",
            saved.dataset,
        )
    return table, root, dataset


def labelled_in_range(table: pd.DataFrame, min_age: float, max_age: float) -> pd.Series:
    """Which rows of `table` are labelled within `min_age`-`max_age`: an exact age inside it, or an age
    group (whose `age` is only its midpoint: `age_from_group`) with any of its ages inside it, so that
    90-130 on a model of 0-100 is evaluated (is the prediction inside 90-130?) though its midpoint is not."""
    inside = table["age"].between(min_age, max_age)
    if "age_from_group" not in table:
        return inside
    overlaps = (table["age_low"] <= max_age) & (table["age_high"] >= min_age)
    return inside.where(~table["age_from_group"].astype(bool), overlaps)


def check_saved_split_options(split: str, **options: float | None) -> None:
    """Refuse `options` (--min-age, --max-age, --limit) given with a run's saved split: the report of
    `--split test` is the run's test figure, comparable with its training report and other runs only
    on the whole split, so a subset of it must not be written, silently, under the same name."""
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if split in SAVED_SPLITS and given:
        raise ConfigError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --split all (a dataset's "
            f"images); --split {split} evaluates the whole {split} split the model was trained with: "
            f"leave {'it' if len(given) == 1 else 'them'} out, or use --split all"
        )


def flip_text(metadata: dict[str, Any], tta: bool) -> str | bool:
    """The report's "test-time flip": a model that averages each face with its mirror image itself (a
    mirrored ensemble, as the bundled model) has it built in, whatever --tta says (flipping again changes
    nothing: `raw_outputs`)."""
    if metadata.get("model", {}).get("mirror"):
        return "built into the model (it averages each face with its mirror image)"
    return tta


# Attributes of each photo that detection finds rather than the labels give (`--by head_pose`):
# "frontal" or "turned" sideways (faces/align.py: head_pose), empty where no landmarks were found.
DETECTED_ATTRIBUTES = ("head_pose",)


def is_aligned(metadata: dict[str, Any]) -> bool:
    """Whether the model was trained on faces aligned by their landmarks (which evaluation then finds)."""
    return Aligner.from_metadata(metadata) is not None


def framed_images(
    metadata: dict[str, Any],
    table: pd.DataFrame,
    root: Path,
    *,
    detect: bool = False,
    detector: str = "auto",
    detector_model: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad_images: bool = False,
    device: torch.device | None = None,
) -> tuple[pd.DataFrame, DataLoader]:
    """The images of `table` (paths under `root`) framed as the model of `metadata` was trained: with
    `detect`, or always for a model trained on aligned faces, each image's subject face is found first
    and the table gains `face_found` and `head_pose`. Returns that table and a loader of its images in
    order (uint8 batches for `device`)."""
    faces = None
    if is_aligned(metadata) and not detect:
        log.info("the model was trained on aligned faces: detecting the landmarks of every image")
        detect = True
    if detect:
        faces = subject_faces(
            [root / p for p in table["path"]],
            kind=detector,
            model_path=detector_model,
            workers=num_workers,
        )
        table = table.assign(
            face_found=[f is not None for f in faces], head_pose=[head_pose(f) for f in faces]
        )
    images = FileImages(root, table["path"].tolist(), image_size_of(metadata), faces, framing_of(metadata))
    dataset = AgeDataset(images, table["age"].to_numpy(), skip_bad_images=skip_bad_images)
    device = device or torch.device("cpu")
    loader = make_loader(dataset, batch_size=batch_size, train=False, num_workers=num_workers, device=device)
    return table, loader


def predict_images(
    age_model: AgeModel,
    table: pd.DataFrame,
    root: Path,
    *,
    detect: bool = False,
    detector: str = "auto",
    detector_model: Path | None = None,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad_images: bool = False,
    device: torch.device | None = None,
) -> tuple[pd.DataFrame, Predictions]:
    """The model's outputs on the images of `table`, framed as it was trained (`framed_images`).
    Returns the table (with `face_found` and `head_pose` where faces were detected) and the predictions."""
    device = device or torch.device("cpu")
    table, loader = framed_images(
        age_model.metadata,
        table,
        root,
        detect=detect,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        device=device,
    )
    return table, model_predictions(age_model, loader, device=device, tta=tta)


def model_predictions(
    age_model: AgeModel, loader: DataLoader, *, device: torch.device, tta: bool = False
) -> Predictions:
    """A PyTorch model over every readable image of `loader` (bf16 where the hardware has it), as
    trained: its batch norms are not folded as `predict` folds them, so that a run's test report is
    reproduced to the last digit (folding changes bf16's rounding, not the function)."""
    autocast = autocast_factory(device, resolve_precision("auto", device))
    age_model = age_model.to(memory_format=torch.channels_last)
    _, predictions = evaluate(
        age_model, loader, device=device, autocast=autocast, tta_flip=tta, desc="evaluate"
    )
    return predictions


def run_backend(
    runner: AgeRunner, loader: DataLoader
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A runtime backend (an exported model) over every readable image of `loader`, in order: their
    dataset indices, their true ages, and the readout (`AgeHead.output_names` columns)."""
    kept, ages, parts = [], [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False):
        kept.append(batch.kept)
        if batch.ages.numel():
            ages.append(batch.ages.numpy())
            parts.append(runner(batch.images))
    mask = torch.cat(kept).numpy() if kept else np.zeros(0, dtype=bool)
    indices = np.asarray(list(iter(loader.sampler)))[: len(mask)][mask]
    if not parts:
        return indices, np.zeros(0, dtype=np.float32), {"age": np.zeros(0, dtype=np.float32)}
    readout = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return indices, np.concatenate(ages), readout


def export_head(metadata: dict[str, Any]) -> AgeHead:
    """The head an exported model was made with, rebuilt from its metadata for its settings (the
    interval's nominal coverage, the bins' labels) alone: its weights are not used."""
    described = metadata.get("model", {}).get("head")
    if not isinstance(described, dict):
        described = {"kind": metadata.get("head", "regression")}
    options = {name: value for name, value in described.items() if name != "kind"}
    return create_head(described["kind"], 1, **options)


def evaluate_model(
    model: str | Path = "default",
    *,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    meta: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    min_age: float | None = None,
    max_age: float | None = None,
    limit: int | None = None,
    detect: bool = False,
    detector: str = "auto",
    detector_model: Path | None = None,
    by: Sequence[str] = (),
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad_images: bool = False,
    device: str = "auto",
    backend: str = "torch",
) -> tuple[dict[str, Any], Path]:
    """Evaluate `model` (a run folder, its weights file, or "default") and write the report; returns
    the metrics and the report folder. `dataset`, `data_root` and `meta` default to the run's; `split`
    is "test" or "val" (the run's saved test or validation split, whole: `min_age`, `max_age` and `limit` are
    refused with it) or "all" (every image of the dataset, within `min_age`-`max_age`, default 0-100, at
    most `limit` of them); `by` names the label columns to break the error down
    by; `detect` frames the face each uncropped photo is of (`subject_face`; always done for a model
    trained on aligned faces); `backend` "onnx" runs `model` as an exported file, a run folder's export
    or the bundle's (`backends.load_runner`), framed and reported like the PyTorch model. Raises
    ConfigError and the errors of loading the model, the data or the detector."""
    check_saved_split_options(split, min_age=min_age, max_age=max_age, limit=limit)
    model_path = Path(model)
    torch_device = select_device(device) if backend == "torch" else torch.device("cpu")
    if backend == "torch":
        age_model = checkpoint.load_model(model_path, torch_device)
        metadata = age_model.metadata
    else:
        if tta:
            raise ConfigError(f"--tta needs --backend torch: an {backend} export has no flip averaging")
        runner, metadata = load_runner(model, backend=backend)
    run = RunFolder.of(model_path)
    detected = [name for name in by if name in DETECTED_ATTRIBUTES]
    if detected and not (detect or is_aligned(metadata)):
        raise ConfigError(f"--by {', '.join(detected)} is found by the face detector: add --detect")
    table, root, dataset = evaluation_table(
        SavedSplit.of(model_path),
        dataset=dataset,
        data_root=data_root,
        meta=meta,
        split=split,
        by=[name for name in by if name not in DETECTED_ATTRIBUTES],
        min_age=0 if min_age is None else min_age,
        max_age=100 if max_age is None else max_age,
        limit=limit,
    )
    if table.empty:
        raise ConfigError("no images to evaluate (check --data-root and the age range)")
    trained_on = table.attrs.get("trained_on")
    left_out = table.attrs.get("removed", {})
    read_from = table.attrs.get("data_root", root)  # a CSV named by its file, not the images' folder
    # person_id too: the error of two photos of one person is one draw for the groups' intervals
    by = list(by)
    by_columns_kept = [*by, "person_id"] if by else []
    table, loader = framed_images(
        metadata,
        table,
        root,
        detect=detect,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        device=torch_device,
    )
    if backend == "torch":
        predictions = model_predictions(age_model, loader, device=torch_device, tta=tta)
        indices = predictions.indices
        frame = prediction_frame(table, predictions, age_model, extra_columns=by_columns_kept)
        head = age_model.head
    else:
        indices, ages, readout = run_backend(runner, loader)
        frame = readout_frame(table, indices, ages, readout, extra_columns=by_columns_kept)
        head = export_head(metadata)
    metrics = evaluation_metrics(frame, head)
    if by:
        metrics["by"] = group_errors(frame, by)
    extra = {
        "model": str(model_path) + ("" if backend == "torch" else f" on --backend {backend}"),
        "dataset": f"{dataset} at {read_from}",
        "split": split,
        "test-time flip": flip_text(metadata, tta),
        **{f"{reason} skipped": count for reason, count in left_out.items()},
        "unreadable images skipped": len(table) - len(frame),
    }
    if trained_on is not None:
        extra["images the model trained on"] = trained_on
    if detect or is_aligned(metadata):
        found = table["face_found"].iloc[indices]
        frame["face_found"] = found.to_numpy()
        metrics["detection"] = {"faces_found": int(found.sum()), "whole_image_used": int((~found).sum())}
        extra["no face found (whole image used)"] = int((~found).sum())
    if out:
        report_dir = Path(out)
    else:
        name = evaluation_name(
            dataset, split, csv=read_from if dataset == "csv" else None, tta=tta, backend=backend
        )
        report_dir = run.evaluation_dir(name) if run else Path("runs") / name
    write_evaluation(frame, metrics, report_dir, title=f"Evaluation of {model_path}", extra=extra)
    return metrics, report_dir
