"""Evaluate a trained model on its own test split or on any dataset, with an honest per-age report.

    age-detect evaluate --model runs/NAME                                  # the run's saved test split
    age-detect evaluate --model runs/NAME --dataset csv --data-root other.csv --split all
    age-detect evaluate --model runs/NAME --dataset csv --data-root photos.csv --split all --detect
    age-detect evaluate --model runs/NAME --by gender,ethnicity            # error per group of people

Writes predictions.csv, evaluation.json, evaluation.md and plots/ into --out
(default: <run>/eval-<dataset>-<split>).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch

from age_detect_resnet.data.dataset import AgeDataset, FileImages, make_loader
from age_detect_resnet.data.sources import DatasetNotFoundError, image_root, load_table
from age_detect_resnet.data.splits import PreparedData, load_split
from age_detect_resnet.evaluation.groups import group_errors
from age_detect_resnet.evaluation.report import evaluation_metrics, prediction_frame, write_evaluation
from age_detect_resnet.faces.align import Aligner, framing_of
from age_detect_resnet.faces.detection import DetectorUnavailableError, largest_faces
from age_detect_resnet.images import ImageReadError
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.runtime import autocast_factory, resolve_precision, select_device
from age_detect_resnet.training.config import DATASETS, ConfigError
from age_detect_resnet.training.engine import evaluate

log = logging.getLogger(__name__)


def evaluation_table(args: argparse.Namespace, run: RunFolder | None) -> tuple[pd.DataFrame, Path, str]:
    """The images to evaluate, their root folder, and the dataset's name."""
    saved = run.data_settings if run else {}
    dataset = args.dataset or saved.get("dataset")
    data_root = Path(args.data_root or saved.get("data_root", "data/raw"))
    if dataset is None:
        raise ConfigError("--dataset is needed: the model has no run folder to take it from")
    if args.split == "test":
        same_dataset = run is not None and dataset == saved.get("dataset")
        if not same_dataset or not run.split.is_file():
            raise ConfigError(
                "--split test needs the model's run folder and its own dataset (the test split is "
                "saved there as split.csv); for another dataset use --split all"
            )
        prepared: PreparedData = load_split(run.split, image_root(dataset, data_root))
        test = with_attributes(prepared.split("test"), args.by, dataset, data_root, args.meta)
        return test, prepared.root, dataset
    table, root = load_table(dataset, data_root, meta=Path(args.meta) if args.meta else None)
    check_by(args.by, set(table.columns), data_root)
    table = table[table["age"].between(args.min_age, args.max_age)]
    if args.limit is not None:
        table = table.sample(min(args.limit, len(table)), random_state=0)
    return table.reset_index(drop=True), root, dataset


def by_columns(text: str | None) -> list[str]:
    """`--by gender,ethnicity` as a list of column names, in order, without repeats."""
    names = [name.strip() for name in (text or "").split(",")]
    return list(dict.fromkeys(name for name in names if name))


# Columns of every table that are no attribute of the person in the image.
NOT_ATTRIBUTES = frozenset({"path", "age", "split", "source", "sha1", "face_found"})


def with_attributes(
    table: pd.DataFrame, by: list[str], dataset: str, data_root: Path, meta: str | None
) -> pd.DataFrame:
    """A saved split keeps only path, age, person_id and split: join the `--by` columns it lacks from
    the dataset's own table (for UTKFace, parsed from the file names again)."""
    lacking = [name for name in by if name not in table.columns]
    if not lacking:
        return table
    full, _ = load_table(dataset, data_root, meta=Path(meta) if meta else None)
    check_by(by, set(table.columns) | set(full.columns), data_root)
    attributes = full.drop_duplicates("path").set_index("path")[lacking]
    return table.join(attributes, on="path")


def check_by(by: list[str], available: set[str], data_root: Path) -> None:
    """Refuse `--by` names that are no column of the dataset, naming the columns that are."""
    unknown = [name for name in by if name not in available]
    if not unknown:
        return
    usable = sorted(available - NOT_ATTRIBUTES)
    hint = f"available: {', '.join(usable)}" if usable else "it has no columns besides path and age"
    raise ConfigError(f"--by {', '.join(unknown)}: no such column in the dataset at {data_root}; {hint}")


def run(args: argparse.Namespace) -> int:
    try:
        model_path = Path(args.model)
        device = select_device(args.device)
        model = checkpoint.load_model(model_path, device)
        run = RunFolder.of(model_path)
        table, root, dataset = evaluation_table(args, run)
        if table.empty:
            raise ConfigError("no images to evaluate (check --data-root and the age range)")
        faces = None
        detect = args.detect or Aligner.from_metadata(model.metadata) is not None
        if detect and not args.detect:
            log.info("the model was trained on aligned faces: detecting the landmarks of every image")
        if detect:
            faces = largest_faces(
                [root / p for p in table["path"]],
                kind=args.detector,
                model_path=args.detector_model,
                workers=args.num_workers,
            )
            table = table.assign(face_found=[f is not None for f in faces])
        images = FileImages(
            root, table["path"].tolist(), image_size_of(model), faces, framing_of(model.metadata)
        )
        dataset_ = AgeDataset(images, table["age"].to_numpy(), skip_bad_images=args.skip_bad_images)
        loader = make_loader(
            dataset_, batch_size=args.batch_size, train=False, num_workers=args.num_workers, device=device
        )
        autocast = autocast_factory(device, resolve_precision("auto", device))
        model = model.to(memory_format=torch.channels_last)
        _, predictions = evaluate(
            model, loader, device=device, autocast=autocast, tta_flip=args.tta, desc="evaluate"
        )
        # person_id too: the error of two photos of one person is one draw for the groups' intervals
        by_columns_kept = [*args.by, "person_id"] if args.by else []
        frame = prediction_frame(table, predictions, model, extra_columns=by_columns_kept)
        metrics = evaluation_metrics(frame, model)
        if args.by:
            metrics["by"] = group_errors(frame, args.by)
        extra = {
            "model": str(model_path),
            "dataset": f"{dataset} at {root}",
            "split": args.split,
            "test-time flip": args.tta,
            "unreadable images skipped": len(table) - len(frame),
        }
        if detect:
            found = table["face_found"].iloc[predictions.indices]
            frame["face_found"] = found.to_numpy()
            metrics["detection"] = {"faces_found": int(found.sum()), "whole_image_used": int((~found).sum())}
            extra["no face found (whole image used)"] = int((~found).sum())
        out = (
            Path(args.out)
            if args.out
            else (
                run.evaluation_dir(dataset, args.split)
                if run
                else Path("runs") / f"eval-{dataset}-{args.split}"
            )
        )
        write_evaluation(frame, metrics, out, title=f"Evaluation of {model_path}", extra=extra)
    except (
        ConfigError,
        checkpoint.ModelFileError,
        DatasetNotFoundError,
        DetectorUnavailableError,
        ImageReadError,
        ValueError,
    ) as err:
        log.error("%s", err)
        return 2
    print(f"MAE {metrics['mae']:.2f} years on {metrics['count']:,} images; report in {out / 'evaluation.md'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="run folder, its best.safetensors, or default: the bundled model"
    )
    parser.add_argument("--dataset", choices=DATASETS, help="default: the run's dataset")
    parser.add_argument("--data-root", help="default: the run's data root")
    parser.add_argument("--meta", help="imdb-wiki: a metadata CSV built by build-meta")
    parser.add_argument(
        "--split",
        choices=("test", "all"),
        default="test",
        help="test: the run's saved test split; all: every image of the dataset",
    )
    parser.add_argument("--out", help="report folder (default: <run>/eval-<dataset>-<split>)")
    parser.add_argument("--min-age", type=float, default=0, help="--split all: youngest age evaluated")
    parser.add_argument("--max-age", type=float, default=100, help="--split all: oldest age evaluated")
    parser.add_argument("--limit", type=int, help="--split all: evaluate a random sample of N images")
    parser.add_argument(
        "--detect",
        action="store_true",
        help="photos are uncropped: detect the largest face and frame it as the model was trained (aligned)",
    )
    parser.add_argument("--detector", choices=("auto", "yunet", "haar"), default="auto")
    parser.add_argument("--detector-model", type=Path, help="YuNet ONNX file (default: downloaded once)")
    parser.add_argument(
        "--by",
        type=by_columns,
        default="",
        metavar="COLUMNS",
        help="comma list of label columns to break the error down by, e.g. gender,ethnicity",
    )
    parser.add_argument("--tta", action="store_true", help="average each prediction with its mirror image's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
