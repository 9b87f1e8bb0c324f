"""`age-detect export`: a trained model to ONNX or TorchScript, checked before it is kept (export/)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli.common import command_main, user_message
from age_detect_resnet.export.exporter import export_model
from age_detect_resnet.export.graph import FORMATS, ExportError
from age_detect_resnet.export.verify import (
    INT8_CALIBRATION_IMAGES,
    INT8_CHECK_IMAGES,
    INT8_TOLERANCE_YEARS,
    describe_check,
    run_split_images,
)
from age_detect_resnet.inference.backends import metadata_path
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.run_folder import RunFolder

log = logging.getLogger(__name__)


def default_out(model: Path, fmt: str) -> Path:
    """`age_model.onnx` / `age_model.torchscript.pt` in the model's run folder (or beside the file)."""
    return RunFolder(model if model.is_dir() else model.parent).export(fmt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        type=Path,
        help="run folder, its best.safetensors, or default: the bundled model",
    )
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format of the export")
    parser.add_argument(
        "--out",
        type=Path,
        help="exported file; its metadata goes to the same name with .json "
        "(default: <run>/age_model.onnx or age_model.torchscript.pt; for the bundled model, in the current "
        "folder)",
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
    parser.add_argument(
        "--data-root",
        type=Path,
        help="the folder of the dataset the model's split names (default: the run's; the bundled model's "
        "split is of UTKFace: your copy of it), for the check on its test and validation faces",
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
            test_limit = INT8_CHECK_IMAGES if int8 else 32
            check_ages = run_split_images(args.model, "test", limit=test_limit, data_root=args.data_root)
            check_images = list(check_ages)
            if int8:
                calibration = run_split_images(
                    args.model, "val", limit=INT8_CALIBRATION_IMAGES, data_root=args.data_root
                )
                calibration_images = list(calibration)
        if not check_images:
            log.warning(
                "checking the export on random pixels: the run's test images are not on this machine; "
                "pass --check-images with a folder of face crops to check it on real faces (or, for the "
                "bundled model, --data-root with your copy of UTKFace)"
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
        log.error("%s", user_message(err))
        return 2
    print(
        f"wrote {out} and {metadata_path(out).name}: outputs {', '.join(metadata['outputs'])}; "
        + describe_check(metadata["check"])
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect export", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
