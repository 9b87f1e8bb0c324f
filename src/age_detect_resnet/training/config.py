"""Run settings as frozen dataclasses: defaults, then a config file, then command-line overrides.

Every field is one setting with a unique name across the groups, so a config file may use sections
(`[train] epochs = 5`, the layout of a run's `config.json`) and the command line uses the bare name
(`--epochs 5`). The defaults reproduce the seed: ResNet-50, MSE, AdamW lr 5e-5, 20 epochs, batch 128.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from age_detect_resnet.data.photo_shares import GREYSCALE_SHARE, LOW_RESOLUTION_SHARE, PhotoShares

DATASETS = ("imdb-wiki", "utkface", "csv")
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50_v1",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
HEADS = ("regression", "bins", "distribution")
LABEL_SPREADS = ("fixed", "proportional", "capped")  # heads.LABEL_SPREADS (this module does not import torch)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ALIGNMENT_VERSIONS = (1, 2)  # faces.align.ALIGNMENT_VERSIONS (this module does not import OpenCV)
# The seeds reach numpy (np.random.seed) and pandas (random_state), whose seeds are 32-bit.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message says which and what is allowed."""


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A setting's default and help; `choices`, or a range (`at_least`, `at_most`) that `_check_range`
    refuses values outside of, config files' as the command line's."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _setting(
        "imdb-wiki", "dataset adapter; given --data-root alone, the kind found there", choices=DATASETS
    )
    data_root: str = _setting(
        "data/raw", "dataset folder (imdb-wiki: holds imdb_crop/ and/or wiki_crop/; csv: the CSV file)"
    )
    meta: str | None = _setting(None, "prebuilt metadata CSV (imdb-wiki default: data/processed/meta.csv)")
    min_face_score: float | None = _setting(None, "imdb-wiki: drop faces scored below this")
    min_age: int = _setting(0, "youngest age kept for training and evaluation (the seed: 10)")
    max_age: int = _setting(100, "oldest age kept for training and evaluation (the seed: 75)")
    max_per_age: int | None = _setting(
        5000, "at most this many images per age (balancing); none = no cap", at_least=1
    )
    balance_by: str | None = _setting(
        None,
        "draw the training faces so that every value of this label column (e.g. ethnicity, gender) has "
        "the training split's age distribution, not its own (data/balance.py); none = each face once an "
        "epoch",
    )
    val_fraction: float = _setting(0.1, "share of images (whole persons) in the validation split")
    test_fraction: float = _setting(0.1, "share of images (whole persons) in the test split")
    limit: int | None = _setting(
        None, "use at most N images (quick runs), sampled before splitting", at_least=1
    )
    train_share: float = _setting(
        1.0,
        "train on this share of the training split, drawn within each age after splitting (learning "
        "curves: the validation and test splits stay whole and the same)",
    )
    split_seed: int | None = _setting(
        None,
        "seed of the balancing, --limit sample and person-disjoint split (default: --seed); fix it to "
        "train other seeds on one split",
        at_least=0,
        at_most=MAX_SEED,
    )
    image_size: int = _setting(224, "square input size in pixels")
    augment: str = _setting(
        "none",
        "training augmentation: light (flip, reframing, colour) or photo (for real photos: also rotation, "
        "blur, JPEG, greyscale, low resolution)",
        choices=("none", "light", "photo"),
    )
    occlusion: float = _setting(
        0.0,
        "--augment photo: share of training faces with a random patch hidden (as hands, cups, microphones "
        "or sunglasses hide part of a face in real photos); 0 = off",
    )
    low_resolution: float = _setting(
        LOW_RESOLUTION_SHARE,
        "--augment photo: share of training faces shrunk to a random smaller size (down to a quarter) "
        "and scaled back, as small faces in photos look",
    )
    greyscale: float = _setting(
        GREYSCALE_SHARE,
        "--augment photo: share of training faces shown in greyscale, as old prints and scanned photos are",
    )
    tight_cut: float = _setting(
        0.0,
        "--augment photo: share of training faces shown as if their photo were cut close around the face "
        "(the edge repeated outside a box up to a quarter inside the crop), as pre-aligned face sets are; "
        "0 = off",
    )
    yaw: float = _setting(
        0.0,
        "--augment photo: share of training faces shown as if turned a little about the vertical axis "
        "(one side pulled in and shortened), as the alignment leaves a turned head; 0 = off",
    )
    cache: bool = _setting(False, "decode and resize every image once into a memory-mapped cache")
    align: bool = _setting(
        False, "detect and align every training face by its landmarks, as at inference (needs --cache)"
    )
    alignment: int = _setting(
        1,
        "aligner of --align: 1 = least-squares fit of the five landmarks; 2 = eyes and mouth (a turned "
        "head's crop keeps the whole face: faces/align.py)",
        choices=ALIGNMENT_VERSIONS,
    )
    cache_dir: str = _setting("data/cache", "where prepared-image caches live")
    skip_bad_images: bool = _setting(
        False, "skip unreadable images (counted in the report) instead of stopping"
    )
    detector_model: str | None = _setting(
        None,
        "YuNet ONNX file to detect and frame the training faces (default: $AGE_DETECT_YUNET_MODEL, else the "
        "package's copy where the build includes it, else downloaded once)",
    )
    num_workers: int = _setting(4, "DataLoader worker processes (0 = load in the main process)", at_least=0)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _setting("resnet50", "torchvision backbone", choices=BACKBONES)
    head: str = _setting("regression", "output head", choices=HEADS)
    hidden_dim: int = _setting(256, "width of the head's hidden layer (seed: 256)", at_least=1)
    pretrained: bool = _setting(True, "start from ImageNet weights (download, or --weights FILE)")
    weights: str | None = _setting(None, "local ImageNet weights for the backbone (.safetensors or .pth)")
    init: str | None = _setting(
        None,
        "start from a trained age model instead of ImageNet: default (the bundled model), a run folder or "
        "a .safetensors file; its backbone and head replace --backbone/--head",
    )
    label_sigma: float = _setting(
        2.0, "distribution head: std (years) of the Gaussian label; 0 = one-hot CE", at_least=0
    )
    label_spread: str = _setting(
        "fixed",
        "distribution head: fixed = label_sigma at every age; proportional = label_sigma at 30, "
        "growing as 1 + age (0.13 y at 1, 4.6 y at 70); capped = proportional up to 30, fixed above",
        choices=LABEL_SPREADS,
    )
    expectation_weight: float = _setting(
        0.0, "distribution head: weight of an L1 loss on the expected age (DLDL-v2: 1); 0 = off", at_least=0
    )
    interval: float = _setting(0.8, "distribution head: nominal coverage of the predicted age interval")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _setting(5e-5, "AdamW learning rate (seed: 5e-5)")
    weight_decay: float = _setting(0.01, "AdamW weight decay (PyTorch's default)")
    schedule: str = _setting("constant", "learning-rate schedule", choices=("constant", "cosine"))
    warmup_epochs: float = _setting(0.0, "linear warm-up length in epochs", at_least=0)
    age_weighting: bool = _setting(False, "weight the loss by inverse age frequency (helps the rare ages)")
    age_weighting_power: float = _setting(
        1.0,
        "--age-weighting: exponent of the inverse frequency (1 = fully inverse, 0.5 = its square root)",
        at_least=0,
    )
    clip_grad_norm: float = _setting(
        0.0, "clip the gradients' total L2 norm to this before each step (0 = off)"
    )
    accumulate: int = _setting(
        1, "optimiser step every N batches (the effective batch is N x --batch-size; same memory)"
    )
    ema_decay: float = _setting(
        0.0,
        "keep an exponential moving average of the weights with this decay per step (e.g. 0.999); it is "
        "validated and saved as the best model (0 = off)",
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _setting(20, "maximum number of epochs (seed: 20)")
    batch_size: int = _setting(128, "images per optimisation step, summed over processes (seed: 128)")
    seed: int = _setting(0, "seed for the split, sampling and initialisation", at_least=0, at_most=MAX_SEED)
    out: str | None = _setting(None, "run folder (default: runs/<dataset>-<backbone>-<head>)")
    device: str = _setting("auto", "where to train", choices=("auto", "cpu", "cuda"))
    precision: str = _setting("auto", "auto = bf16 autocast where the hardware has it", choices=PRECISIONS)
    channels_last: bool = _setting(True, "NHWC memory layout (faster convolutions on CPU and GPU)")
    compile: bool = _setting(False, "torch.compile the model")
    min_delta: float = _setting(
        1e-5, "stop when the validation loss changes by less than this (seed rule; 0 = off)", at_least=0
    )
    patience: int = _setting(
        0, "stop after this many epochs without a better validation MAE (0 = off)", at_least=0
    )
    deterministic: bool = _setting(False, "deterministic kernels and data order (reproducible, slower)")
    tensorboard: bool = _setting(True, "write TensorBoard logs when tensorboard is installed")
    grid_size: int = _setting(16, "test photos in the prediction grid at the end (0 = none)", at_least=0)
    norm_batches: int = _setting(
        40,
        "after the last epoch, recompute the best model's batch-norm statistics on this many training "
        "batches and keep them where its validation MAE is no worse (0 = off)",
    )


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        if self.train.out:
            return Path(self.train.out)
        return Path("runs") / f"{self.data.dataset}-{self.model.backbone}-{self.model.head}"


GROUPS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def setting_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every setting by its (unique) name, with the group it belongs to."""
    found: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            found[f.name] = (group, f)
    return found


def resolve_config(
    config_files: Path | str | Sequence[Path | str] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Defaults, then each config file in order (TOML or JSON, sections or flat keys; a packaged
    recipe by name), then `overrides` by setting name: later sources win."""
    values: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    if isinstance(config_files, (str, Path)):
        config_files = [config_files]
    for config_file in config_files or []:
        _merge(values, read_config_file(Path(config_file)), source=str(config_file))
    _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None}, source="command line")
    return Config(**{group: GROUPS[group](**values[group]) for group in GROUPS})


def recipes() -> dict[str, Path]:
    """Recipes shipped with the package, usable as `--config NAME` (e.g. `--config cpu`)."""
    folder = Path(__file__).with_name("recipes")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file() and str(path) in recipes():
        path = recipes()[str(path)]
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (packaged recipes: {', '.join(recipes())})")
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {path} must end in .toml or .json")
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text) if path.suffix == ".json" else _toml_loads(text)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    return _settings_of(document, path)


def _settings_of(document: Any, path: Path) -> dict[str, Any]:
    """A config file's settings by name; valid JSON that is no object (`[1, 2]`, `null`, a number) holds
    none, so it is refused naming the file, not read as a mapping (TOML is always a table)."""
    if isinstance(document, dict):
        return document
    raise ConfigError(
        f"config file {path} must hold an object of settings, by section "
        f'({{"train": {{"epochs": 5}}}}, as a run\'s config.json) or flat ({{"epochs": 5}}); '
        f"it holds {json.dumps(document)[:60]}"
    )


def save_config(config: Config, path: Path) -> None:
    from age_detect_resnet.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(config.to_dict(), indent=2) + "\n")


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _merge(values: dict[str, dict[str, Any]], incoming: dict[str, Any], *, source: str) -> None:
    known = setting_fields()
    for key, value in incoming.items():
        if key in GROUPS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"section '{key}' in {source} must hold settings by name (as [{key}] in TOML), "
                    f"got {value!r}"
                )
            _merge(values, value, source=source)
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"unknown setting '{key}' in {source}; known settings: {', '.join(sorted(known))}"
            )
        group, f = known[name]
        values[group][name] = _typed(name, str(f.type), value, source)


def _typed(name: str, kind: str, value: Any, source: str) -> Any:
    """`value` as the setting's type (`kind`: "int", "float | None", ...), an int accepted for a float;
    anything else (e.g. `epochs = "two"` in a file) a `ConfigError` naming the setting and its source."""
    if value is None and kind.endswith("| None"):
        return None
    base = kind.split("|")[0].strip()
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if base == "float" and number:
        return float(value)
    if base == "int" and number and float(value).is_integer():  # 4 or 4.0, not 1.5
        return int(value)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str | os.PathLike):  # a Path given from Python: its text
        return os.fspath(value)
    raise ConfigError(f"setting '{name}' in {source} must be {kind.replace(' | None', '')}, got {value!r}")


def _check_photo_shares(data: DataConfig) -> None:
    """The photo augmentation's shares of the training faces (`PhotoShares`: `--occlusion`,
    `--low-resolution`, `--greyscale`, `--tight-cut`, `--yaw`): between 0 and 1, and left at their
    defaults by the other augmentations."""
    shares = PhotoShares.of(data)
    outside = shares.out_of_range()
    if outside:
        name, share = outside[0]
        raise ConfigError(
            f"{name.replace('_', ' ')} is a share of the training faces, between 0 and 1; got {share}"
        )
    unused = shares.unused_by(data.augment)
    if unused:
        raise ConfigError(unused)


def _check_range(f: dataclasses.Field, value: Any) -> None:
    """Refuse a number no setting can mean (NaN, infinity: argparse's float() and JSON accept them) or
    one outside the setting's declared range (`at_least`, `at_most`), naming the option and the range.
    None (no cap, no limit, the default seed) is no number and is left alone."""
    if value is None or isinstance(value, bool | str):
        return
    name = f.name
    option = f"--{name.replace('_', '-')}"
    if not math.isfinite(value):
        raise ConfigError(f"{option} ({name}) must be a finite number, got {value}")
    low, high = f.metadata.get("at_least"), f.metadata.get("at_most")
    if (low is None or value >= low) and (high is None or value <= high):
        return
    kind = "a whole number" if isinstance(value, int) else "a number"
    bounds = f"between {low} and {high}" if high is not None else f"of at least {low}"
    raise ConfigError(f"{option} ({name}) must be {kind} {bounds}, got {value}")


def _validate(config: Config) -> None:
    for group in GROUPS:
        section = getattr(config, group)
        for f in fields(section):
            choices = f.metadata.get("choices")
            value = getattr(section, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} = {value!r} is not one of {', '.join(map(str, choices))}")
            _check_range(f, value)
    data, train = config.data, config.train
    if not 0 <= data.min_age <= data.max_age <= 100:
        raise ConfigError(f"need 0 <= min_age <= max_age <= 100, got {data.min_age}..{data.max_age}")
    if data.val_fraction <= 0 or data.test_fraction <= 0 or data.val_fraction + data.test_fraction >= 1:
        raise ConfigError("val_fraction and test_fraction must be positive and sum to less than 1")
    if not 0 < data.train_share <= 1:
        raise ConfigError(f"train_share must be above 0 and at most 1, got {data.train_share}")
    if data.image_size < 32:
        raise ConfigError(f"image_size must be at least 32, got {data.image_size}")
    if train.epochs < 1 or train.batch_size < 1:
        raise ConfigError("epochs and batch_size must be at least 1")
    if not config.optim.lr >= 0 or not config.optim.weight_decay >= 0:  # lr 0: the start's weights, kept
        raise ConfigError(
            f"need lr >= 0 and weight_decay >= 0, got {config.optim.lr} and {config.optim.weight_decay}"
        )
    if train.norm_batches < 0:
        raise ConfigError(f"norm_batches is a number of batches, 0 or more; got {train.norm_batches}")
    if config.model.weights and not config.model.pretrained:
        raise ConfigError("--weights and --no-pretrained contradict each other; pass one of them")
    if data.align and not data.cache:
        raise ConfigError("--align prepares the aligned faces once, in the image cache: add --cache")
    if data.alignment != 1 and not data.align:
        raise ConfigError(f"--alignment {data.alignment} chooses the aligner of --align: add --align")
    _check_photo_shares(data)
    if not 0 < config.model.interval < 1:
        raise ConfigError(f"interval must be between 0 and 1, got {config.model.interval}")
    optim = config.optim
    if optim.accumulate < 1 or optim.clip_grad_norm < 0 or not 0 <= optim.ema_decay < 1:
        raise ConfigError(
            "need accumulate >= 1, clip_grad_norm >= 0 and 0 <= ema_decay < 1, got "
            f"{optim.accumulate}, {optim.clip_grad_norm}, {optim.ema_decay}"
        )


def add_config_arguments(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None) -> None:
    """One `--option` per setting (all of them, or those named in `only`); unset options stay None
    so that the config file's values are not overridden by argparse defaults."""
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        default=None,
        help=f"TOML/JSON settings file or packaged recipe ({', '.join(recipes())}); repeat to layer files",
    )
    for name, (group, f) in setting_fields().items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(GROUPS[group](), name)
        help_text = f"{f.metadata['help']} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = _argument_type(f)
        parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = setting_fields()
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _argument_type(f: dataclasses.Field) -> type:
    annotation = str(f.type)
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str
