"""`age-detect train` (= `python -m age_detect_resnet.train`): train, keep the best model by validation
MAE, evaluate it on the test split, write the report. The run itself is training/run.py's."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli.common import command_main, user_errors, user_message
from age_detect_resnet.data.sources import dataset_at
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.training.config import (
    Config,
    ConfigError,
    add_config_arguments,
    overrides_from_args,
    resolve_config,
)
from age_detect_resnet.training.distributed import cleanup_distributed
from age_detect_resnet.training.engine import NonFiniteLossError
from age_detect_resnet.training.models import adopt_init_architecture
from age_detect_resnet.training.run import train

log = logging.getLogger(__name__)


def config_for_run(args: argparse.Namespace) -> Config:
    """Defaults, the config file, the command line; on --resume the run's saved config replaces the
    defaults and file, so a continued run keeps its settings (command-line values still apply)."""
    overrides = overrides_from_args(args)
    config = resolve_config(args.config, overrides)
    if "data_root" in overrides and "dataset" not in overrides and config.data.meta is None:
        found = dataset_at(Path(config.data.data_root), config.data.dataset)
        if found != config.data.dataset:
            overrides["dataset"] = found
            config = resolve_config(args.config, overrides)
    saved = RunFolder(config.run_dir()).config
    if args.resume and saved.is_file():
        config = resolve_config(saved, overrides)
    adopted = adopt_init_architecture(config)
    # A recipe's backbone and head give way to --init's; ones typed beside --init contradict it.
    contradicted = [
        f"--{name} {overrides[name]} (the model is {getattr(adopted.model, name)})"
        for name in ("backbone", "head")
        if name in overrides and overrides[name] != getattr(adopted.model, name)
    ]
    if contradicted:
        raise ConfigError(
            f"--init {config.model.init} fine-tunes its own backbone and head, so "
            f"{' and '.join(contradicted)} cannot apply: leave it out, or train from ImageNet without --init"
        )
    return adopted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def run(
    args: argparse.Namespace, argv: Sequence[str] | None = None, *, prog: str = "age-detect train"
) -> int:
    config = None
    try:
        config = config_for_run(args)
        command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
        train(config, resume=args.resume, progress=not args.no_progress, command=command)
    except KeyboardInterrupt:
        log.error("%s", interrupted_message(config, resume=args.resume))
        return 130
    except (*user_errors(), NonFiniteLossError) as err:
        log.error("%s", user_message(err))
        return 2
    finally:
        cleanup_distributed()
    return 0


def interrupted_message(config: Config | None, *, resume: bool) -> str:
    """What Ctrl-C left: the last finished epoch to continue from (last.pt), or, before the first epoch
    finished, nothing that --resume could continue."""
    last = RunFolder(config.run_dir()).last if config is not None else None
    if last is None or not last.is_file():
        return "interrupted before an epoch finished: nothing was saved to resume; run the same command again"
    again = "the same command again" if resume else "the same command plus --resume"
    return f"interrupted; the last finished epoch is saved in {last}: continue with {again}"


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect train", __doc__, add_arguments, lambda args: run(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
