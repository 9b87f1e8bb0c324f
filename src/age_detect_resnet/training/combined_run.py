"""Run folders made by combining trained models: `age-detect average` (one network, the weights from
modeling/averaging.py, its batch-norm statistics recomputed on the run's training faces as training feeds
them, modeling/norm_statistics.py) and `age-detect ensemble` (the models side by side,
modeling/ensemble.py). Either way the result's age interval is calibrated on a run's validation split
through `predict`'s detect -> align path (evaluation/evaluate.py: `predict_images`), and that run's data
settings and split are copied beside it, so that evaluate, export and predict use the result as any run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from age_detect_resnet.atomic import unwritable_reason, write_text_atomic
from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.evaluation.evaluate import evaluation_table, predict_images
from age_detect_resnet.faces.align import Aligner
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.averaging import average_models, faces_difference, mixture_weights
from age_detect_resnet.modeling.ensemble import AgeEnsemble
from age_detect_resnet.modeling.norm_statistics import recompute_norm_statistics
from age_detect_resnet.run_folder import (
    RunFolder,
    SavedSplit,
    named_in_lineage,
    recorded_path,
    trace_lineage,
)
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
    augmentation; its data root where `RunFolder.data_root` finds it) and saved split, shuffled in a
    fixed order (`seed`), batch by batch."""
    config = resolve_config(run.config, {"num_workers": num_workers, "data_root": str(run.data_root)})
    prepared = load_split(run.split, image_root(config.data.dataset, config.data.data_root))
    loaders, _ = build_loaders(prepared, config, Distributed(device=torch.device("cpu")))
    loaders["train"].generator.manual_seed(seed)
    return (batch.images for batch in loaders["train"])


def _validation_table(calibration: RunFolder) -> tuple[Any, Path]:
    """The validation images of `calibration` (ConfigError if there are none, or if they are not where
    its config.json says its data is: these commands have no --data-root) and their folder."""
    saved = calibration.saved_split()
    prepared = saved.load()
    images = prepared.split("val")
    missing = [path for path in images["path"] if not (prepared.root / path).is_file()]
    if missing:
        recorded = str(calibration.data_settings.get("data_root"))
        relative = not Path(recorded).is_absolute()
        raise ConfigError(
            f"{len(missing):,} of the {len(images):,} validation images of {calibration.path} are not in "
            f"{prepared.root} (e.g. {missing[0]}), where its config.json puts its data (data_root "
            f"{recorded}{', relative to the folder it was trained in' if relative else ''}): "
            f"{'run the command from that folder, or ' if relative else ''}set data_root in "
            f"{calibration.config} to where its {saved.dataset} data is now"
        )
    table, root, _ = evaluation_table(
        saved,
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


def check_calibration_faces(metadata: dict[str, Any], calibration: RunFolder) -> None:
    """Refuse (ConfigError) a calibration run trained on other faces (input size, framing, alignment:
    `faces_difference`) than the combined model, whose `metadata` says its own: the average's batch-norm
    statistics would be recomputed on crops it never takes, and the result's config.json, the calibration
    run's, would describe other faces than its best.json. Its input size is config.json's (what its
    training faces are cut to); its framing best.json's, or where it has none (a folder of config.json
    and split.csv only, as the README's runs/utkface-split0), config.json's --align and --alignment."""
    settings = calibration.data_settings
    try:
        reference = checkpoint.read_metadata(calibration.best)
    except (checkpoint.ModelFileError, OSError):
        reference = _framing_of_settings(settings, metadata)
    if settings.get("image_size") is not None:
        reference = {**reference, "image_size": settings["image_size"]}
    difference = faces_difference(metadata, reference, "the combined model", str(calibration.path))
    if difference is not None:
        raise ConfigError(
            f"--calibrate-on {calibration.path} was trained on other faces than the models: {difference}; "
            "calibrate on a run trained on the models' crops (the same --image-size, framing and --align)"
        )


def _framing_of_settings(settings: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The framing a run's data settings say (aligned, by which version), as model metadata; what they do
    not say (box margins, measured with the model; an aligner's template) taken from `metadata`."""
    if not settings.get("align"):
        return {k: v for k, v in metadata.items() if k == "crop"}
    version = settings.get("alignment", 1)
    aligner = Aligner.from_metadata(metadata)
    return {
        "alignment": (
            dataclasses.replace(aligner, version=version) if aligner else Aligner(version=version)
        ).to_metadata()
    }


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
    write_text_atomic(run.config, json.dumps(_settings_of(calibration), indent=2) + "\n")
    shutil.copyfile(calibration.split, run.split)
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


def _settings_of(calibration: RunFolder) -> dict[str, Any]:
    """The calibration run's config.json for the combined run, with its paths as found from here (its data
    root, its --init): the combined run lies elsewhere, and a path relative to where the calibration run
    was trained would be read from the wrong folder."""
    settings = json.loads(json.dumps(calibration.saved_config))  # a deep copy
    if "data_root" in settings.get("data", {}):
        settings["data"]["data_root"] = str(Path(calibration.data_root).resolve())
    init = settings.get("model", {}).get("init")
    if init:
        found = calibration.find_source(str(init)).path
        settings["model"]["init"] = recorded_path(found) if found is not None else init
    return settings


def _sources(models: Sequence[str | Path], loaded: Sequence[Any], fractions: Sequence[float]) -> list[dict]:
    """The combined models as best.json records them (`averaged_from`, `ensemble_of`): each path as
    `recorded_path` records it (absolute, so that `lineage` finds it from any folder), its SHA-256 (which
    tells it from another model at that path) and its weight."""
    return [
        {"model": recorded_path(path), "sha256": model.metadata.get("sha256"), "weight": fraction}
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
    check_calibration_faces(averaged.metadata, calibration)
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
    lineage (`trace_lineage`) is checked. Images are compared as files (`SavedSplit.shared`; by name
    against the bundled model's split). A model without a saved split (a loose file, a run folder that is
    gone), or a source recorded relative that is not found, cannot be checked: a warning says so, as it
    does where a source found may not be the one recorded."""
    held_out = calibration.saved_split()
    for model in models:
        traced = trace_lineage(model)
        for recorded, doubt in traced.doubts:
            log.warning(
                "%s %s: make sure it never trained on the validation and test images of %s",
                named_in_lineage(recorded, model),
                doubt,
                calibration.path,
            )
        for source in traced.models:
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
            seen = held_out.shared(("val", "test"), saved, ("train",))
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
    `ensemble_of`) with `val_images`, `calibrated_on`, `mirror` and `members` (`_members`: those run, with
    their real weights). Raises ConfigError (also where a member
    trained on the calibration run's held-out images: `check_held_out`), EnsembleError and the errors of
    loading the models or the validation images; nothing is written unless all of it succeeds."""
    run = _new_run(out)
    calibration = calibration_run(models, calibrate_on)
    check_held_out(models, calibration)
    device = device or torch.device("cpu")
    loaded = [checkpoint.load_model(model, "cpu") for model in models]
    ensemble = AgeEnsemble(loaded, weights, names=[str(m) for m in models], mirror=mirror).to(device)
    check_calibration_faces(ensemble.metadata, calibration)
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
    return {**saved, "mirror": ensemble.mirror, "members": _members(models, loaded, ensemble)}


def _members(models: Sequence[str | Path], loaded: Sequence[Any], ensemble: AgeEnsemble) -> list[dict]:
    """The ensemble's members as it runs them, with their real weights: an ensemble given as a model is
    taken apart into its members (modeling/ensemble.py), each named after it (`e1 member 2 (resnet18)`)."""
    names = []
    for path, model in zip(models, loaded, strict=True):
        if isinstance(model, AgeEnsemble):
            names += [f"{path} member {i + 1} ({m.backbone_name})" for i, m in enumerate(model.members)]
        else:
            names.append(str(path))
    return [{"model": n, "weight": float(w)} for n, w in zip(names, ensemble.weights, strict=True)]
