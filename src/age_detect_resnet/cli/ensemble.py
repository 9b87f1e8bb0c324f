"""`age-detect ensemble`: trained models of any backbones that take the same face crop, run side by side,
their predictions combined by weight (modeling/ensemble.py; the run folder: training/combined_run.py):

    age-detect ensemble runs/resnet runs/mobilenet --out runs/ensemble                 # equal weights
    age-detect ensemble default runs/mobilenet --weights 3,1 --calibrate-on runs/mobilenet --out runs/ens
    age-detect ensemble runs/ens --mirror --out runs/ens-mirror    # each face and its mirror image, mixed

The result is a run folder like training's: one best.safetensors (every member inside) + .json, and the
data's config.json and split.csv, copied from the calibration run (--calibrate-on, default: the last
model given as a run folder), so that `evaluate --split test`, `export` and `predict` use it as any run.
The ensemble's age interval is calibrated on that run's validation split, through the same detect ->
align path as `predict`; its validation MAE is recorded and printed. Check first that the members were
trained on one split: an ensemble evaluated on a test split that a member trained on is not honest.
`--mirror` makes every member also see each face's mirror image (the flip averaging of `--tta`, inside
the model, so that every command and an ONNX export run it; twice the model's time); with it one MODEL is
enough. A MODEL that is itself an ensemble is taken apart into its members, and its mirror views are kept
unless `--no-mirror` is given (`age-detect ensemble default --no-mirror --calibrate-on RUN --out NEW`: the
bundled model without them, twice as fast in the model).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from age_detect_resnet.cli.average import add_combining_arguments
from age_detect_resnet.cli.common import command_main, user_errors, user_message

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_combining_arguments(parser, "the first one's face framing is the ensemble's")
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        help="every member also sees each face's mirror image, the two mixed half and half (as --tta); "
        "default: as the MODELs that are ensembles themselves (--no-mirror turns that off)",
    )


def run(args: argparse.Namespace) -> int:
    from age_detect_resnet.modeling.ensemble import EnsembleError
    from age_detect_resnet.runtime import select_device
    from age_detect_resnet.training.combined_run import write_ensemble_run

    try:
        metadata = write_ensemble_run(
            args.models,
            args.out,
            weights=args.weights,
            mirror=args.mirror,
            calibrate_on=args.calibrate_on,
            detector=args.detector,
            detector_model=args.detector_model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=select_device(args.device),
        )
    except (*user_errors(), EnsembleError) as err:
        log.error("%s", user_message(err))
        return 2
    # The members as the ensemble runs them: an ensemble given as a MODEL is taken apart into its own.
    members = "; ".join(f"{member['model']}: {member['weight']:.3f}" for member in metadata["members"])
    count = len(metadata["members"])
    print(
        f"ensemble of {count} member{'s' if count > 1 else ''} ({members}"
        f"{'; each face and its mirror image' if metadata['mirror'] else ''}) in "
        f"{args.out / 'best.safetensors'}: "
        f"validation MAE {metadata['val_mae']:.2f} on {metadata['val_images']:,} images of "
        f"{metadata['calibrated_on']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect ensemble", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
