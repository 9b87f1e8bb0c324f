"""The training state: everything `--resume` needs to continue a run as if it had not stopped.

Like timm's CheckpointSaver, one object captures and restores the model, optimiser, scheduler, gradient
scaler, EMA weights, random-number generators, the epoch, the best validation MAE and the history. The
head's calibrated settings are buffers of the model, so they travel with its state_dict. The file
(last.pt, see run_folder.py) is written atomically and read with `weights_only=True`: no pickled code.
A continued run keeps the settings it was trained with (`check_same_settings`), so that its config.json,
report and model say what was really trained.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from age_detect_resnet.atomic import atomic_path
from age_detect_resnet.modeling.checkpoint import ModelFileError
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.training.config import Config, ConfigError, setting_fields
from age_detect_resnet.training.ema import ModelEma

log = logging.getLogger(__name__)

# The settings a continued run may change: the number of epochs (a run is resumed with another --epochs
# to fit a session), and those that say where and how it runs but not what it learns or measures (the
# hardware and its arithmetic, the folders of files, speed, logging and the report's picture);
# --skip-bad-images too, the way on after a run stopped at an unreadable image (its skips are reported).
# Every other setting, the data and its split, model, optimiser, stopping rules and the best model's
# batch-norm statistics, must stay as config.json says.
FREE_ON_RESUME = frozenset(
    {
        "epochs",
        "out",
        "device",
        "precision",
        "channels_last",
        "compile",
        "deterministic",
        "num_workers",
        "cache_dir",
        "detector_model",
        "skip_bad_images",
        "tensorboard",
        "grid_size",
    }
)


class TrainingState:
    def __init__(
        self,
        model: AgeModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        scaler: torch.amp.GradScaler | None = None,
        ema: ModelEma | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = (
            model,
            optimizer,
            scheduler,
            scaler,
            ema,
        )
        self.epoch = 0
        self.best_mae = math.inf
        self.history: list[dict[str, float]] = []

    @property
    def evaluated_model(self) -> AgeModel:
        """The weights that are validated and saved as the best model: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, row: dict[str, float]) -> bool:
        """Add an epoch's row (it has `epoch` and `val_mae`); True when its validation MAE is the best."""
        self.history.append(row)
        self.epoch = int(row["epoch"])
        improved = row["val_mae"] < self.best_mae
        if improved:
            self.best_mae = row["val_mae"]
        return improved

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "best_mae": self.best_mae,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # Runs saved before the head's interval level was a buffer kept it beside the model.
        if "interval_quantile_level" in state and hasattr(self.model.head, "interval_quantile_level"):
            self.model.head.interval_quantile_level = state["interval_quantile_level"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a continued run: start the average at the current weights
                self.ema.module.load_state_dict(self.model.state_dict())
        set_rng_state(state["rng"])
        self.epoch, self.best_mae, self.history = state["epoch"], state["best_mae"], list(state["history"])

    def save(self, path: Path) -> None:
        write_state(path, self.state_dict())

    def restore(self, path: Path, saved: dict[str, Any] | None = None) -> None:
        """Continue from the state in `path` (`saved`: what it holds, where already read). A state that
        does not fit this model and optimiser (config.json edited, or not this run's) is a ModelFileError
        that names it, not a traceback."""
        try:
            self.load_state_dict(read_state(path) if saved is None else saved)
        except (RuntimeError, ValueError, KeyError) as err:
            # load_state_dict says what it loads first, then each mismatch: the first mismatch tells most.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            raise ModelFileError(
                f"{path} does not fit the model and optimiser of the settings in config.json beside it "
                f"({lines[min(1, len(lines) - 1)]}); train into a new --out"
            ) from err


# Settings that name a file or folder: the same place however it is written (a trailing slash, a
# relative path), compared resolved.
PATH_SETTINGS = frozenset({"data_root", "meta", "weights"})


def check_same_settings(
    saved: Config, requested: Config, config_file: Path, *, split_file: Path | None = None
) -> None:
    """Refuse (ConfigError) to continue the run of `config_file` (its settings `saved`) with `requested`
    where a setting not in FREE_ON_RESUME differs; each is named with both values. Paths are compared as
    the places they name; a --data-root elsewhere is accepted where it holds every image of the run's
    `split_file` (the dataset moved): those images, by name, are what the run trains on."""
    changed = []
    for name, (group, _) in setting_fields().items():
        before, now = getattr(getattr(saved, group), name), getattr(getattr(requested, group), name)
        if name in FREE_ON_RESUME or same_setting(name, before, now):
            continue
        if name == "data_root" and split_file is not None:
            missing = images_missing(split_file, requested)
            if not missing:
                log.info(
                    "the run's images are all in %s now (they were in %s): continuing there", now, before
                )
                continue
            changed.append(
                f"--data-root {before!r} saved, {now!r} requested (it lacks {len(missing):,} of the run's "
                f"images in {split_file.name}, e.g. {missing[0]})"
            )
            continue
        changed.append(f"--{name.replace('_', '-')} {before!r} saved, {now!r} requested")
    if changed:
        raise ConfigError(
            f"--resume continues the run of {config_file} with the settings it was trained with, but these "
            f"differ: {'; '.join(changed)}. Rerun without changing them (--epochs and options such as "
            "--num-workers may change), or train into a new --out (nothing was changed)"
        )


def same_setting(name: str, before: Any, now: Any) -> bool:
    """Whether a setting's saved and requested values are the same: for a path, the same place."""
    if before == now:
        return True
    if name in PATH_SETTINGS and before is not None and now is not None:
        return Path(before).resolve() == Path(now).resolve()
    return False


def images_missing(split_file: Path, requested: Config) -> list[str]:
    """The images of a run's split (split.csv, paths relative to the dataset's folder) that are not
    under the data root of `requested`."""
    import pandas as pd

    from age_detect_resnet.data.sources import image_root

    root = image_root(requested.data.dataset, Path(requested.data.data_root))
    paths = pd.read_csv(split_file, usecols=["path"], dtype={"path": str})["path"]
    return [path for path in paths if not (root / path).is_file()]


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and CUDA's) generators, as tensors and lists `weights_only` loads."""
    _, keys, position, *_ = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_position": int(position),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"], 0, 0.0)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def read_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"nothing to resume: {path} does not exist (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals and corrupt archives raise many types
        raise ModelFileError(
            f"{path} is not a training state this project wrote ({err}); {way_on(path)}"
        ) from err
    if not isinstance(state, dict):
        raise ModelFileError(
            f"{path} is not a training state this project wrote (it holds a {type(state).__name__}); "
            f"{way_on(path)}"
        )
    return state


def way_on(path: Path) -> str:
    """What to do with a run whose training state `path` cannot be read: it cannot be continued, and a
    new run into its folder is refused while the run's files are there (RunFolder.check_new)."""
    best = path.with_name("best.safetensors")
    start = f"from its best model with --init {path.parent} or afresh" if best.is_file() else "afresh"
    kept = f"{path.name} and {best.name}" if best.is_file() else path.name
    return (
        f"the run cannot be continued: train into a new --out, {start}; or, to start over in "
        f"{path.parent}, move {kept} out of it"
    )
