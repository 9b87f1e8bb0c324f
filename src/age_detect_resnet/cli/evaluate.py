"""`age-detect evaluate`: a trained model on its test split or any dataset (evaluation/evaluate.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from age_detect_resnet.cli.common import (
    add_detector_arguments,
    add_device_argument,
    add_loader_arguments,
    command_main,
    positive_int,
    user_errors,
    user_message,
)
from age_detect_resnet.evaluation import evaluate
from age_detect_resnet.training.config import DATASETS

log = logging.getLogger(__name__)


def by_columns(text: str | None) -> list[str]:
    """`--by gender,ethnicity` as a list of column names, in order, without repeats."""
    names = [name.strip() for name in (text or "").split(",")]
    return list(dict.fromkeys(name for name in names if name))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="run folder, its best.safetensors, or default: the bundled model"
    )
    parser.add_argument("--dataset", choices=DATASETS, help="default: the run's dataset")
    parser.add_argument(
        "--data-root",
        help="default: the run's data root (the bundled model's split is of UTKFace: name your copy)",
    )
    parser.add_argument("--meta", help="imdb-wiki: a metadata CSV built by build-meta")
    parser.add_argument(
        "--split",
        choices=(*evaluate.SAVED_SPLITS, "all"),
        default="test",
        help="test or val: the test or validation split the model was trained with (its run's split.csv, or "
        "the bundled model's); all: every image of the dataset",
    )
    parser.add_argument(
        "--out",
        help="report folder (default: <run>/eval-<dataset>-<split>, with a CSV's name, tta and the backend "
        "where used, e.g. eval-csv-photos-all-onnx)",
    )
    # No defaults here (evaluate_model's are 0 and 100): given with --split test|val they are refused,
    # as that split is evaluated whole.
    parser.add_argument("--min-age", type=float, help="--split all: youngest age evaluated (default 0)")
    parser.add_argument("--max-age", type=float, help="--split all: oldest age evaluated (default 100)")
    parser.add_argument(
        "--limit", type=positive_int, help="--split all: evaluate a random sample of N images"
    )
    parser.add_argument(
        "--detect",
        action="store_true",
        help="photos are uncropped: detect the face each is of (large and central faces first) and "
        "frame it as the model was trained (aligned)",
    )
    add_detector_arguments(parser)
    parser.add_argument(
        "--by",
        type=by_columns,
        default="",
        metavar="COLUMNS",
        help="comma list of label columns to break the error down by, e.g. gender,ethnicity; with "
        "--detect also head_pose (frontal or turned sideways, from the landmarks)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each prediction with its mirror image's (built into a mirrored ensemble already)",
    )
    add_loader_arguments(parser)
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted)")
    add_device_argument(parser)
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: evaluate the model as exported (an .onnx file from `age-detect export`, a run folder "
        "holding age_model.onnx, or default: the bundle's export), on ONNX Runtime",
    )


def run(args: argparse.Namespace) -> int:
    try:
        metrics, out = evaluate.evaluate_model(
            args.model,
            dataset=args.dataset,
            data_root=args.data_root,
            meta=args.meta,
            split=args.split,
            out=args.out,
            min_age=args.min_age,
            max_age=args.max_age,
            limit=args.limit,
            detect=args.detect,
            detector=args.detector,
            detector_model=args.detector_model,
            by=args.by,
            tta=args.tta,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            skip_bad_images=args.skip_bad_images,
            device=args.device,
            backend=args.backend,
        )
    except (*user_errors(), ValueError) as err:  # ValueError: a table or image it cannot use
        log.error("%s", user_message(err))
        return 2
    print(f"MAE {metrics['mae']:.2f} years on {metrics['count']:,} images; report in {out / 'evaluation.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect evaluate", evaluate.__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
