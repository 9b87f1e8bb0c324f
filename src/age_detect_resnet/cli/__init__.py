"""`age-detect`: one command with a subcommand per job; each subcommand is also its module's `main`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

from age_detect_resnet.extras import missing_extra_message

# subcommand -> (module, one-line help); modules are imported only when their command runs.
COMMANDS = {
    "build-meta": ("age_detect_resnet.cli.build_meta", "build the IMDB-WIKI metadata table"),
    "train": ("age_detect_resnet.cli.train", "train, evaluate on the test split, write the report"),
    "evaluate": ("age_detect_resnet.cli.evaluate", "evaluate a trained model on a dataset"),
    "pipeline": (
        "age_detect_resnet.cli.pipeline",
        "the whole job on a dataset folder: metadata, training, report",
    ),
    "predict": ("age_detect_resnet.cli.predict", "ages of the faces in photos (files, folders, globs)"),
    "serve": ("age_detect_resnet.cli.serve", "a web page and JSON API for age estimation"),
    "average": (
        "age_detect_resnet.cli.average",
        "one model from the averaged weights of models fine-tuned from one another",
    ),
    "ensemble": (
        "age_detect_resnet.cli.ensemble",
        "one model from trained models of any backbones run side by side, predictions combined",
    ),
    "export": ("age_detect_resnet.cli.export", "export a trained model to ONNX or TorchScript"),
    "compare": ("age_detect_resnet.cli.compare", "a Markdown table comparing finished runs"),
}


def versions() -> str:
    """What a bug report needs: this package's version, the bundled model's and the libraries' that
    decide the ages."""
    import cv2
    import onnxruntime
    import torch

    from age_detect_resnet import __version__
    from age_detect_resnet.modeling.bundled import AGE_MODEL_SHA256
    from age_detect_resnet.runtime import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    return (
        f"age-detect {__version__} (bundled model {AGE_MODEL_SHA256[:12]}; python {sys.version.split()[0]}, "
        f"torch {torch.__version__} ({precision} on this CPU), opencv {cv2.__version__}, "
        f"onnxruntime {onnxruntime.__version__})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(versions())
        return 0
    parser = argparse.ArgumentParser(prog="age-detect", description="Age estimation from face photos.")
    parser.add_argument(
        "-V", "--version", action="store_true", help="print the versions of the package, model and libraries"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage or the unknown-command error and exits
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        module = import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    except ImportError as err:
        message = missing_extra_message(err, f"age-detect {argv[0]}")
        if message is None:
            raise
        logging.getLogger(__name__).error(message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
