"""`age-detect train` (= `python -m age_detect_resnet.train`): train, keep the best model by validation
MAE, evaluate it on the test split, write the report. The run itself is training/run.py's."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from age_detect_resnet.cli.common import command_main, user_errors, user_message
from age_detect_resnet.data.sources import dataset_at
from age_detect_resnet.run_folder import RunFolder, recorded_path
from age_detect_resnet.training.config import (
    Config,
    ConfigError,
    add_config_arguments,
    overrides_from_args,
    resolve_config,
)
from age_detect_resnet.training.distributed import cleanup_distributed
from age_detect_resnet.training.engine import NonFiniteLossError
from age_detect_resnet.training.models import INIT_SETTINGS, adopt_init_architecture
from age_detect_resnet.training.run import train

log = logging.getLogger(__name__)


def config_for_run(args: argparse.Namespace) -> Config:
    """Defaults, the config files, the command line; on --resume the run's saved config replaces the
    defaults, so a continued run keeps its settings: the config files and the command line still apply
    over it, alike, and training refuses any of their changes but those a continued run may make.
    A new run with --init takes that model's architecture (`adopt_init_architecture`); a continued one
    has it in config.json already, and last.pt its weights, so it never reads its start, which may have
    moved since (`same_init_as_saved`)."""
    overrides = overrides_from_args(args)
    config = resolve_config(args.config, overrides)
    if "data_root" in overrides and "dataset" not in overrides and config.data.meta is None:
        found = dataset_at(Path(config.data.data_root), config.data.dataset)
        if found != config.data.dataset:
            overrides["dataset"] = found
            config = resolve_config(args.config, overrides)
    saved = RunFolder(config.run_dir()).config
    if args.resume:
        if not saved.is_file():  # training says what is missing
            return config
        kept = resolve_config(saved)
        if kept.model.init:  # ImageNet weights typed again beside --init: overruled, as in the new run
            overrides = {k: v for k, v in overrides.items() if k not in ("weights", "pretrained")}
        config = resolve_config([saved, *(args.config or [])], overrides)
        return same_init_as_saved(config, kept, typed=overrides)
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


def same_init_as_saved(config: Config, saved: Config, *, typed: dict[str, Any]) -> Config:
    """`config` (a continued run's) with the run's saved --init where the one it has (typed again,
    perhaps as another path to the same place) names the same model: config.json records it absolute
    (`recorded_path`), so a relative --init typed beside --resume is not taken for a change. Another
    model stays, for training to refuse as a change (training/state.py). A run started from --init keeps
    the architecture it took from it (`INIT_SETTINGS`) over a recipe's in a --config file, as the new
    run did (`train --config cpu --init M` plus --resume), and over the command line's, which --init
    overruled then too, except a typed --backbone or --head (`typed`): compared, and refused if changed."""
    given, kept = config.model.init, saved.model.init
    model = config.model
    same_place = given is not None and kept is not None and recorded_path(given) == recorded_path(kept)
    if same_place and given != kept:
        model = dataclasses.replace(model, init=kept)
    if kept is not None:
        model = dataclasses.replace(
            model,
            **{
                name: getattr(saved.model, name)
                for name in INIT_SETTINGS
                if name not in typed or name not in ("backbone", "head")
            },
        )
    return dataclasses.replace(config, model=model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def run(
    args: argparse.Namespace, argv: Sequence[str] | None = None, *, prog: str = "age-detect train"
) -> int:
    config = None
    try:
        with sigterm_as_interrupt():
            config = config_for_run(args)
            command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
            train(config, resume=args.resume, progress=not args.no_progress, command=command)
    except KeyboardInterrupt as err:
        if is_main_process():  # under torchrun every process is interrupted: one says so
            log.error("%s", interrupted_message(config, resume=args.resume, by=err))
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    except NonFiniteLossError as err:
        log.error("%s", non_finite_message(err, config))
        return 2
    except user_errors() as err:
        log.error("%s", user_message(err))
        return 2
    finally:
        cleanup_distributed()
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, as cluster schedulers and `kill` send it, raised where Ctrl-C raises KeyboardInterrupt:
    either way the last finished epoch is kept and the message says how to continue. The exit status
    is the shell's for the signal (143; Ctrl-C: 130)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM raises `Terminated` (PyTorch's DataLoader workers, forked with this
    handler, treat it as the KeyboardInterrupt it is). Only the main thread can set handlers: elsewhere
    (a caller's thread) SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_main_process() -> bool:
    """Rank 0 under torchrun (its RANK, as training/distributed.py reads it), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def interrupted_message(config: Config | None, *, resume: bool, by: BaseException | None = None) -> str:
    """What Ctrl-C or SIGTERM (`by`) left: the last finished epoch to continue from (last.pt), or, before
    the first epoch finished, nothing that --resume could continue."""
    last = RunFolder(config.run_dir()).last if config is not None else None
    interrupted = "interrupted by SIGTERM" if isinstance(by, Terminated) else "interrupted"
    if last is None or not last.is_file():
        return (
            f"{interrupted} before an epoch finished: nothing was saved to resume; run the same command again"
        )
    again = "the same command again" if resume else "the same command plus --resume"
    return f"{interrupted}; the last finished epoch is saved in {last}: continue with {again}"


def non_finite_message(err: NonFiniteLossError, config: Config | None) -> str:
    """Where a diverged run can go on. Before its first epoch finished nothing was kept, and the same
    command with a lower --lr starts it again. After, its last good epoch is kept, but --resume keeps the
    run's --lr: a lower one needs a new --out, from the kept best model (--init) or from the start."""
    what = str(err).split(";")[0]  # the loss, epoch and step (engine.py); its advice is given here
    run = RunFolder(config.run_dir()) if config is not None else None
    if run is None or not run.last.is_file():
        return (
            f"{what}: no epoch had finished, so nothing was kept; run the same command with a lower --lr, "
            "or check the data"
        )
    return (
        f"{what}: the last good epoch is kept in {run.last} and {run.best}, but --resume keeps the run's "
        f"--lr, so train into a new --out with a lower --lr, from this run's best model with --init "
        f"{run.path} or from the start; or check the data"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect train", __doc__, add_arguments, lambda args: run(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
