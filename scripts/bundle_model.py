"""Make the bundled default model from a finished run (maintainers, before a release):

    .venv/bin/python scripts/bundle_model.py runs/utkface-aligned-dldl [--data-root DATASET_FOLDER]

Writes src/age_detect_resnet/assets/age_model.safetensors (fp16 backbone weights) + .json and the run's
split beside it (age_model_split.csv.gz: the faces it never saw, for `evaluate --split test`), and prints
the SHA-256s to pin as `AGE_MODEL_SHA256` and `AGE_MODEL_SPLIT_SHA256` in
src/age_detect_resnet/modeling/bundled.py. The bundle is first written to temporary files and checked
there: it must give the run's ages on the run's own validation faces (their mean difference under
`TOLERANCE_YEARS`). Only then does it replace the shipped files, which a run that cannot be bundled or
checked (no best model, no split, its images not on this machine) leaves as they were. Exit status: 0
bundled; 1 the check failed (nothing replaced); 2 the run or the options cannot be used (one line says
why).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from age_detect_resnet.cli.common import command_main, user_errors, user_message
from age_detect_resnet.export.graph import ExportError
from age_detect_resnet.export.verify import check_batch, labelled_split_images
from age_detect_resnet.inference.predictor import TorchRunner
from age_detect_resnet.modeling import bundled, checkpoint
from age_detect_resnet.modeling.model import AgeModel

log = logging.getLogger("bundle_model")

# The fp16 bundle's ages may differ from the run's float32 ones by this much on average (years).
TOLERANCE_YEARS = 0.05
# Validation faces the check runs on.
CHECK_IMAGES = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="the finished run folder (its best.safetensors and split.csv)")
    parser.add_argument(
        "--data-root",
        type=Path,
        help="the folder of the run's dataset, where it is no longer where config.json says",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the bundle's weights file (default: the package's {bundled.AGE_MODEL.name}); its .json and "
        "split are written beside it",
    )


def bundle_files(model_file: Path) -> list[Path]:
    """The files a bundle is: the weights, their metadata, the split (bundled.py's names)."""
    return [model_file, model_file.with_suffix(".json"), bundled.split_file_of(model_file)]


def check_bundle(original: AgeModel, bundle_file: Path, batch: torch.Tensor) -> dict[str, Any]:
    """The bundle's ages against the run's model's, both in float32, on `batch`: {'count', 'mean',
    'max'} of the absolute differences in years."""
    bundle = checkpoint.load_model(bundle_file, "cpu")
    ages = [TorchRunner(m, precision="fp32")(batch)["age"] for m in (original, bundle)]
    difference = np.abs(ages[0] - ages[1])
    return {"count": len(batch), "mean": float(difference.mean()), "max": float(difference.max())}


def bundle_run(run: Path, out: Path, *, data_root: Path | None = None) -> int:
    # What the check needs, before anything is written: the run's model and validation faces.
    original = checkpoint.load_model(run, "cpu")
    images = labelled_split_images(run, "val", limit=CHECK_IMAGES, data_root=data_root)
    batch, _ = check_batch(list(images), original.metadata, limit=len(images))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the shipped files, so that each is replaced by a rename on the same file system.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".bundle-") as folder:
        candidate = Path(folder) / out.name
        metadata = bundled.write_bundled_model(run, candidate)
        check = check_bundle(original, candidate, batch)
        verdict = (
            f"fp16 bundle vs the run on {check['count']} validation faces: mean |age diff| "
            f"{check['mean']:.3f} y, max {check['max']:.3f} y"
        )
        if not check["mean"] < TOLERANCE_YEARS:  # also catches NaN
            log.error("%s, over the limit of %s: %s was not changed", verdict, TOLERANCE_YEARS, out)
            return 1
        for written, final in zip(bundle_files(candidate), bundle_files(out), strict=True):
            written.replace(final)
    print(verdict)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, sha256 {metadata['sha256']}")
    print(f"{bundled.split_file_of(out)}: sha256 {metadata['split_sha256']}")
    return 0


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else bundled.AGE_MODEL
    try:
        return bundle_run(args.run, out, data_root=args.data_root)
    except (bundled.BundledModelError, ExportError, *user_errors()) as err:
        log.error("%s", user_message(err))
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("bundle_model.py", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
