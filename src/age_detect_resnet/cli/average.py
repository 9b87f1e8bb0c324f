"""`age-detect average`: one model from the weighted mean of the weights of trained models of one lineage
(modeling/averaging.py; the run folder: training/combined_run.py), e.g. a first stage and the second
stage fine-tuned from it:

    age-detect average runs/stage1 runs/stage2 --out runs/averaged              # equal weights
    age-detect average runs/stage1 runs/stage2 --weights 1,3 --out runs/averaged
    age-detect average runs/mine --out runs/mine-bn          # one model: its batch-norm statistics only

The result is a run folder like training's: best.safetensors + .json, and the data's config.json and
split.csv, copied from the calibration run (--calibrate-on, default: the last model given as a run
folder), so that `evaluate --split test`, `export` and `predict` use it as any run. The average's age
batch-norm statistics are recomputed on that run's training faces, as its training fed them
(--norm-batches), and its age interval is calibrated on the run's validation split, through the same
detect -> align path as `predict`; its validation MAE is recorded and printed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli.common import (
    add_detector_arguments,
    add_device_argument,
    add_loader_arguments,
    command_main,
    non_negative_int,
    user_errors,
    user_message,
)

log = logging.getLogger(__name__)


def weight_list(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers, e.g. 1,1") from err
    if not all(math.isfinite(w) for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r} holds a weight that is not a finite number, e.g. 1,3")
    return weights


def add_combining_arguments(parser: argparse.ArgumentParser, order: str) -> None:
    """The arguments `average` and `ensemble` share: the models, --out, --weights, --calibrate-on, the
    detector and the loader; `order` says how the models are listed."""
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help=f"run folders, .safetensors files or default, {order}",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the new run folder (must not hold a model yet)"
    )
    parser.add_argument(
        "--weights", type=weight_list, help="one weight per model, e.g. 1,3 (scaled to sum 1; default: equal)"
    )
    parser.add_argument(
        "--calibrate-on",
        type=Path,
        metavar="RUN",
        help="run folder whose validation split calibrates the interval and whose data settings and split "
        "the result keeps (default: the last MODEL that is a run folder)",
    )
    add_detector_arguments(parser)
    add_loader_arguments(parser)
    add_device_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_combining_arguments(parser, "in lineage order")
    parser.add_argument(
        "--norm-batches",
        type=non_negative_int,
        default=40,
        metavar="N",
        help="recompute the batch-norm statistics on N training batches of the calibration run, augmented "
        "as in its training (default 40; 0 = keep the averaged statistics)",
    )


def run(args: argparse.Namespace) -> int:
    from age_detect_resnet.modeling.averaging import AveragingError
    from age_detect_resnet.runtime import select_device
    from age_detect_resnet.training.combined_run import write_averaged_run

    try:
        metadata = write_averaged_run(
            args.models,
            args.out,
            weights=args.weights,
            calibrate_on=args.calibrate_on,
            norm_batches=args.norm_batches,
            detector=args.detector,
            detector_model=args.detector_model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=select_device(args.device),
        )
    except (*user_errors(), AveragingError) as err:
        log.error("%s", user_message(err))
        return 2
    weights = ", ".join(f"{source['weight']:.2f}" for source in metadata["averaged_from"])
    recomputed = metadata["norm_statistics"]["recomputed_on_training_images"]
    statistics = (
        f"batch-norm statistics of {recomputed:,} training images" if recomputed else "averaged statistics"
    )
    print(
        f"averaged {len(args.models)} model{'s' if len(args.models) > 1 else ''} ({weights}) into "
        f"{args.out / 'best.safetensors'} "
        f"({statistics}): validation MAE {metadata['val_mae']:.2f} on {metadata['val_images']:,} images "
        f"of {metadata['calibrated_on']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect average", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
