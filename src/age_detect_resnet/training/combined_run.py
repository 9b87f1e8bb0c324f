"""Run folders made by combining trained models: `age-detect average` (one network, the weights from
modeling/averaging.py, its batch-norm statistics recomputed on the run's training faces as training feeds
them, modeling/norm_statistics.py) and `age-detect ensemble` (the models side by side,
modeling/ensemble.py). Either way the result's age interval is calibrated on a run's validation split
through `predict`'s detect -> align path (evaluation/evaluate.py: `predict_images`), and that run's data
settings and split are copied beside it, so that evaluate, export and predict use the result as any run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from age_detect_resnet.atomic import unwritable_reason
from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.evaluation.evaluate import evaluation_table, predict_images
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.averaging import average_models, mixture_weights
from age_detect_resnet.modeling.ensemble import AgeEnsemble
from age_detect_resnet.modeling.norm_statistics import recompute_norm_statistics
from age_detect_resnet.run_folder import RunFolder, SavedSplit, lineage, named_in_lineage
from age_detect_resnet.training.config import ConfigError, resolve_config
from age_detect_resnet.training.distributed import Distributed
from age_detect_resnet.training.loaders import build_loaders

log = logging.getLogger(__name__)

# Metadata of a source model that describes its own training and not the combined model's (which
# records its sources in `averaged_from` or `ensemble_of` instead of an `init`).
OWN_METADATA = (
    "format",
    "model",
    "sha256",
    "init",
    "epoch",
    "val_mae",
    "bundled_from",
    "averaged_from",
    "norm_statistics",
    "ensemble_of",
)


def calibration_run(models: Sequence[str | Path], given: str | Path | None) -> RunFolder:
    """The run folder whose validation split calibrates the combined model: `given`, else the last model that
    is a run folder with its split (ConfigError if there is none)."""
    if given is not None:
        run = RunFolder.of(given)
        if run is None or not run.split.is_file():
            raise ConfigError(f"--calibrate-on {given} is not a run folder with config.json and split.csv")
        return run
    for model in reversed(models):
        run = RunFolder.of(model)
        if run is not None and run.split.is_file():
            return run
    raise ConfigError(
        "no MODEL is a run folder with a validation split (config.json and split.csv): pass "
        "--calibrate-on RUN, a run trained on the same data, to calibrate the combined model's age interval"
    )


def training_images(run: RunFolder, *, num_workers: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The training faces of `run` as its training fed them: its data settings (framing, cache,
    augmentation) and saved split, shuffled in a fixed order (`seed`), batch by batch."""
    config = resolve_config(run.config, {"num_workers": num_workers})
    prepared = load_split(run.split, image_root(config.data.dataset, config.data.data_root))
    loaders, _ = build_loaders(prepared, config, Distributed(device=torch.device("cpu")))
    loaders["train"].generator.manual_seed(seed)
    return (batch.images for batch in loaders["train"])


def _validation_table(calibration: RunFolder) -> tuple[Any, Path]:
    """The validation images of `calibration` (ConfigError if there are none) and their folder."""
    table, root, _ = evaluation_table(
        calibration.saved_split(),
        dataset=None,
        data_root=None,
        meta=None,
        split="val",
        by=(),
        min_age=0,
        max_age=100,
        limit=None,
    )
    if table.empty:
        raise ConfigError(f"{calibration.split} has no validation images to calibrate the model on")
    return table, root


def _calibrate_and_save(
    model: torch.nn.Module,
    metadata: dict[str, Any],
    calibration: RunFolder,
    table: Any,
    root: Path,
    run: RunFolder,
    *,
    detector: str,
    detector_model: Path | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, Any]:
    """Calibrate `model`'s interval on the validation images `table`, record its validation MAE in
    `metadata`, copy the calibration run's config and split into `run` and save the model there."""
    log.info("calibrating on the %d validation images of %s", len(table), calibration.path)
    _, predictions = predict_images(
        model,
        table,
        root,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    model = model.cpu()
    model.head.calibrate(torch.from_numpy(predictions.outputs), torch.from_numpy(predictions.ages).float())
    metadata["val_mae"] = float(abs(predictions.predicted - predictions.ages).mean())
    run.path.mkdir(parents=True, exist_ok=True)
    for part in (calibration.config, calibration.split):
        shutil.copyfile(part, run.path / part.name)
    checkpoint.save_model(model, run.best, metadata)
    return {**metadata, "val_images": len(predictions.ages), "calibrated_on": str(calibration.path)}


def _new_run(out: str | Path) -> RunFolder:
    """The run folder `out`, refused (ConfigError) before any work where it holds a model or cannot be
    made: a file there, or a file or unwritable folder above it, would fail only when saving."""
    run = RunFolder(out)
    run.check_new()
    reason = unwritable_reason(run.path)
    if reason is not None:
        raise ConfigError(f"--out {out}: {reason}; choose another --out")
    return run


def _sources(models: Sequence[str | Path], loaded: Sequence[Any], fractions: Sequence[float]) -> list[dict]:
    return [
        {"model": str(path), "sha256": model.metadata.get("sha256"), "weight": fraction}
        for path, model, fraction in zip(models, loaded, fractions, strict=True)
    ]


def write_averaged_run(
    models: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    calibrate_on: str | Path | None = None,
    norm_batches: int = 40,
    detector: str = "auto",
    detector_model: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Average `models` (run folders, weight files or "default", in lineage order) with `weights`
    (default: equal) into the run folder `out`, which must not hold a model yet; recompute the batch-norm
    statistics on `norm_batches` training batches of the calibration run (0: keep the averaged ones).
    Returns the saved metadata (`val_mae`, `averaged_from`, `norm_statistics`) with `val_images` and
    `calibrated_on`. Raises ConfigError (also where a model trained on the calibration run's held-out
    images: `check_held_out`), AveragingError and the errors of loading the models or the training and
    validation images; nothing is written unless all of it succeeds."""
    run = _new_run(out)
    fractions = mixture_weights(weights, len(models))
    device = device or torch.device("cpu")
    # The models first: one that cannot be averaged (an ensemble) is the error to report, whatever else.
    loaded = [checkpoint.load_model(model, "cpu") for model in models]
    averaged = average_models(loaded, fractions, names=[str(m) for m in models]).to(device)
    calibration = calibration_run(models, calibrate_on)
    check_held_out(models, calibration)
    table, root = _validation_table(calibration)
    norm_images = 0
    if norm_batches > 0:
        log.info(
            "recomputing the batch-norm statistics on %d training batches of %s",
            norm_batches,
            calibration.path,
        )
        batches = training_images(calibration, num_workers=num_workers)
        try:
            norm_images = recompute_norm_statistics(averaged, batches, limit=norm_batches, device=device)
        except ValueError as err:
            raise ConfigError(
                f"{calibration.split}: {err}; pass --norm-batches 0 to keep the averaged statistics"
            ) from err
    metadata = {k: v for k, v in loaded[-1].metadata.items() if k not in OWN_METADATA}
    metadata["norm_statistics"] = {"recomputed_on_training_images": norm_images}
    metadata["averaged_from"] = _sources(models, loaded, fractions)
    return _calibrate_and_save(
        averaged,
        metadata,
        calibration,
        table,
        root,
        run,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )


def check_held_out(models: Sequence[str | Path], calibration: RunFolder) -> None:
    """Refuse a model to average or ensemble that trained on images of the calibration run's validation or
    test split (ConfigError): the result is calibrated, and its test MAE measured, on them. So did a
    model that started from (`--init`), averaged or ensembled a model that trained on them: each model's
    `lineage` is checked. A model without a saved split (a loose file, a run folder that is gone) cannot be
    checked: a warning says so."""
    held_out = calibration.saved_split().paths("val", "test")
    for model in models:
        for source in lineage(model):
            name = named_in_lineage(source, model)
            saved = SavedSplit.of(source)
            if saved is None:
                log.warning(
                    "%s has no split.csv beside it: make sure it never trained on the validation and test "
                    "images of %s",
                    name,
                    calibration.path,
                )
                continue
            seen = held_out & saved.paths("train")
            if seen:
                raise ConfigError(
                    f"{name} trained on {len(seen):,} of the validation and test images of "
                    f"{calibration.path} (e.g. {sorted(seen)[0]}); combine models trained on one split "
                    "(train them with the same --split-seed), or pass --calibrate-on a run whose held-out "
                    "images none of them saw"
                )


def write_ensemble_run(
    models: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    mirror: bool | None = None,
    calibrate_on: str | Path | None = None,
    detector: str = "auto",
    detector_model: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """An ensemble of `models` (run folders, weight files or "default"; the first one's face framing and
    data description are the ensemble's) with `weights` (default: equal) as the run folder `out`, which
    must not hold a model yet (`mirror`: each face and its mirror image, see modeling/ensemble.py; None:
    as the ensembles among `models`, which are taken apart into their members); its interval is
    calibrated on the calibration run's validation split. Returns the saved metadata (`val_mae`,
    `ensemble_of`) with `val_images`, `calibrated_on` and `mirror`. Raises ConfigError (also where a member
    trained on the calibration run's held-out images: `check_held_out`), EnsembleError and the errors of
    loading the models or the validation images; nothing is written unless all of it succeeds."""
    run = _new_run(out)
    calibration = calibration_run(models, calibrate_on)
    check_held_out(models, calibration)
    device = device or torch.device("cpu")
    loaded = [checkpoint.load_model(model, "cpu") for model in models]
    ensemble = AgeEnsemble(loaded, weights, names=[str(m) for m in models], mirror=mirror).to(device)
    table, root = _validation_table(calibration)
    metadata = {k: v for k, v in loaded[0].metadata.items() if k not in OWN_METADATA}
    metadata["ensemble_of"] = _sources(models, loaded, mixture_weights(weights, len(models)))
    saved = _calibrate_and_save(
        ensemble,
        metadata,
        calibration,
        table,
        root,
        run,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    return {**saved, "mirror": ensemble.mirror}
