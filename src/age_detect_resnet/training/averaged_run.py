"""A run folder made by averaging trained models (`age-detect average`): the weights from
modeling/averaging.py, the batch-norm statistics recomputed on the run's training faces as training
feeds them (modeling/norm_statistics.py), the age interval calibrated on its validation split through
`predict`'s detect -> align path (evaluation/evaluate.py: `predict_images`), and the run's data
settings and split copied beside it, so that evaluate, export and predict use the result as any run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.evaluation.evaluate import evaluation_table, predict_images
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.averaging import average_models, mixture_weights
from age_detect_resnet.modeling.norm_statistics import recompute_norm_statistics
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.training.config import ConfigError, resolve_config
from age_detect_resnet.training.distributed import Distributed
from age_detect_resnet.training.loaders import build_loaders

log = logging.getLogger(__name__)

# Metadata of the last model that describes its own training and not the average's (which records
# its sources in `averaged_from` instead of an `init`).
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
)


def calibration_run(models: Sequence[str | Path], given: str | Path | None) -> RunFolder:
    """The run folder whose validation split calibrates the average: `given`, else the last model that
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
        "--calibrate-on RUN, a run trained on the same data, to calibrate the average's age interval"
    )


def training_images(run: RunFolder, *, num_workers: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The training faces of `run` as its training fed them: its data settings (framing, cache,
    augmentation) and saved split, shuffled in a fixed order (`seed`), batch by batch."""
    config = resolve_config(run.config, {"num_workers": num_workers})
    prepared = load_split(run.split, image_root(config.data.dataset, config.data.data_root))
    loaders, _ = build_loaders(prepared, config, Distributed(device=torch.device("cpu")))
    loaders["train"].generator.manual_seed(seed)
    return (batch.images for batch in loaders["train"])


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
    `calibrated_on`. Raises ConfigError, AveragingError and the errors of loading the models or the
    training and validation images; nothing is written unless all of it succeeds."""
    run = RunFolder(out)
    if run.best.exists():
        raise ConfigError(f"{run.best} already exists; choose another --out (nothing was changed)")
    fractions = mixture_weights(weights, len(models))
    calibration = calibration_run(models, calibrate_on)
    device = device or torch.device("cpu")
    loaded = [checkpoint.load_model(model, "cpu") for model in models]
    averaged = average_models(loaded, fractions, names=[str(m) for m in models]).to(device)
    table, root, _ = evaluation_table(
        calibration,
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
        raise ConfigError(f"{calibration.split} has no validation images to calibrate the average on")
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
    log.info("calibrating the average on the %d validation images of %s", len(table), calibration.path)
    _, predictions = predict_images(
        averaged,
        table,
        root,
        detector=detector,
        detector_model=detector_model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    averaged = averaged.cpu()
    averaged.head.calibrate(torch.from_numpy(predictions.outputs), torch.from_numpy(predictions.ages).float())
    metadata = {k: v for k, v in loaded[-1].metadata.items() if k not in OWN_METADATA}
    metadata["val_mae"] = float(abs(predictions.predicted - predictions.ages).mean())
    metadata["norm_statistics"] = {"recomputed_on_training_images": norm_images}
    metadata["averaged_from"] = [
        {"model": str(path), "sha256": model.metadata.get("sha256"), "weight": fraction}
        for path, model, fraction in zip(models, loaded, fractions, strict=True)
    ]
    run.path.mkdir(parents=True, exist_ok=True)
    for part in (calibration.config, calibration.split):
        shutil.copyfile(part, run.path / part.name)
    checkpoint.save_model(averaged, run.best, metadata)
    return {**metadata, "val_images": len(predictions.ages), "calibrated_on": str(calibration.path)}
