"""What every command's `main` shares: logging, its parser, and one list of user errors."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

DETECTOR_MODEL_HELP = (
    "YuNet ONNX file (default: $AGE_DETECT_YUNET_MODEL, else the package's copy where the build includes "
    "it, else downloaded once and checksum verified)"
)


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """The face detector's options (predict, serve and evaluate)."""
    parser.add_argument(
        "--detector",
        choices=("auto", "yunet", "haar"),
        default="auto",
        help="face detector; auto: YuNet where its file is found or downloaded, else OpenCV's Haar cascade",
    )
    parser.add_argument("--detector-model", type=Path, help=DETECTOR_MODEL_HELP)


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """How a dataset's images are fed to the model (evaluate, average, ensemble)."""
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per model batch")
    parser.add_argument(
        "--num-workers", type=non_negative_int, default=2, help="processes reading images beside the model"
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Where the model runs (every command that runs one)."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs; auto: a CUDA GPU where one is visible, else the CPU",
    )


def user_errors() -> tuple[type[BaseException], ...]:
    """Problems a user can fix from the message alone: logged as one line, exit status 2, no traceback.
    Anything else is a bug and keeps its traceback. Imported when asked for, not with this module, so
    that a command without a model (build-meta) does not load torch to start."""
    from age_detect_resnet.data.csv_table import CsvTableError
    from age_detect_resnet.data.imdb_wiki import MetaError
    from age_detect_resnet.data.sources import DataError, DatasetNotFoundError
    from age_detect_resnet.faces.detection import DetectorUnavailableError
    from age_detect_resnet.images import ImageReadError
    from age_detect_resnet.modeling.checkpoint import ModelFileError
    from age_detect_resnet.modeling.model import WeightsError
    from age_detect_resnet.run_folder import RunFolderError
    from age_detect_resnet.runtime import DeviceError
    from age_detect_resnet.training.config import ConfigError

    return (
        ConfigError,
        DataError,
        DatasetNotFoundError,
        CsvTableError,
        MetaError,
        ImageReadError,
        ModelFileError,
        RunFolderError,
        WeightsError,
        DetectorUnavailableError,
        DeviceError,
    )


# How PyTorch re-raises, in the main process, an error raised in a DataLoader worker: the same type,
# its message replaced by "Caught X in DataLoader worker process N." and the worker's traceback.
_WORKER_WRAPPER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def user_message(err: BaseException) -> str:
    """The message of a user error for its one log line: for one raised in a DataLoader worker (an
    image that cannot be read while evaluating), the original message, not the worker's traceback."""
    text = str(err)
    if not _WORKER_WRAPPER.match(text):
        return text
    original = list(re.finditer(rf"^(?:\w+\.)*{re.escape(type(err).__name__)}: ", text, flags=re.MULTILINE))
    return text[original[-1].end() :].strip() if original else text


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (`--limit`, `--batch-size`)."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type for counts where 0 means none (`--norm-batches`)."""
    return _count(text, 0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command's description as written, and each option's default where its help does not say it
    already (as `train --help` does for every setting)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unstated = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unstated:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def command_main(
    prog: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    *,
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
) -> int:
    """Parse `argv` with the command's options (its module docstring's first paragraph as the
    description, and the next where the first introduces it with a colon), let `check` refuse
    combinations argparse cannot (through `parser.error`), and run it: a file error or Ctrl-C it does
    not handle itself is one line (exit status 2, or 130 for Ctrl-C)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    paragraphs = (doc or "").split("\n\n")
    description = paragraphs[0]
    if description.rstrip().endswith(":") and len(paragraphs) > 1:
        description += "\n\n" + paragraphs[1]  # the examples it introduces
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if check is not None:
        check(parser, args)
    try:
        return run(args)
    except OSError as err:  # a file or folder it was told to read or write, named in the message
        logging.getLogger(prog).error("%s", user_message(err))
        return 2
    except KeyboardInterrupt:
        # Ctrl-C where the command keeps nothing to go on from (loading the model, say): one line, as for
        # any user error, and the shell's status for it. Commands that keep work (train, predict's
        # journal) catch it themselves and say how to go on.
        logging.getLogger(prog).error("interrupted")
        return 130
