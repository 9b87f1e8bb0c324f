"""The model a run starts from: ImageNet-pretrained backbone + a new head, or a trained age model
(`--init`), and the metadata its saved checkpoints carry."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from age_detect_resnet.data.splits import PreparedData
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.ensemble import AgeEnsemble, main_member
from age_detect_resnet.modeling.model import AgeModel, create_model
from age_detect_resnet.run_folder import recorded_path
from age_detect_resnet.training.config import Config, ConfigError
from age_detect_resnet.training.loaders import cache_alignment

log = logging.getLogger(__name__)


def build_model(
    config: Config, train_ages: np.ndarray, device: torch.device, *, resume: bool = False
) -> AgeModel:
    """The model to train, on `device` (channels_last when configured). On `resume` only its
    architecture (config.json's, which holds --init's): last.pt restores every weight, so a continued
    run needs neither its start (an --init model moved or deleted since) nor ImageNet weights."""
    m = config.model
    model = (
        start_from_trained(config, device)
        if m.init and not resume
        else create_model(
            m.backbone,
            m.head,
            pretrained=m.pretrained and not resume,
            weights=Path(m.weights) if m.weights and not resume else None,
            hidden_dim=m.hidden_dim,
            init_age=float(train_ages.mean()),
            min_age=config.data.min_age,
            max_age=config.data.max_age,
            label_sigma=m.label_sigma,
            label_spread=m.label_spread,
            expectation_weight=m.expectation_weight,
            interval=m.interval,
        )
    ).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def start_from_trained(config: Config, device: torch.device) -> AgeModel:
    """The trained age model named by --init, in training mode: the two-stage recipe (a large dataset
    first, then one's own). Its architecture is the run's (see `adopt_init_architecture`)."""
    model = checkpoint.load_model(config.model.init, device)
    if isinstance(model, AgeEnsemble):
        index = main_member(model.describe())
        log.info(
            "%s is an ensemble (%s): fine-tuning its member %d, %s, which has the largest weight",
            config.model.init,
            model.backbone_name,
            index + 1,
            model.members[index].backbone_name,
        )
        model = model.members[index]
    model = model.train()
    val_mae = model.metadata.get("val_mae")
    log.info(
        "starting from the trained model %s (%s + %s head%s)",
        config.model.init,
        model.backbone_name,
        model.head.kind,
        f", validation MAE {val_mae:.2f} on its own split" if isinstance(val_mae, int | float) else "",
    )
    model.metadata = {}
    return model


# The head's settings a run with --init takes from its start (where the start records them).
HEAD_SETTINGS = ("hidden_dim", "label_sigma", "label_spread", "expectation_weight", "interval")
# Every model setting --init decides: what a continued run keeps from its config.json (`cli/train.py`).
INIT_SETTINGS = ("backbone", "head", "pretrained", "weights", *HEAD_SETTINGS)


def adopt_init_architecture(config: Config) -> Config:
    """With --init, the backbone and head settings are the trained model's, so config.json says what
    was really trained, and --init is recorded as `recorded_path` (run_folder.py) records it; without
    it, `config` unchanged.

    A bins head's classes are the age range it was trained for: a run over another --min-age/--max-age
    is refused (ConfigError), not adapted. Adopting the head's range would silently change which faces
    the run trains and is tested on (and overrule a range typed or set by a recipe); keeping the run's
    would clamp every age outside the head's range into its end bins and score them as placed. The
    other heads carry no range (distribution: ages 0-100; regression: any), so any range fits them."""
    if not config.model.init:
        return config
    init = recorded_path(config.model.init)
    description = checkpoint.read_metadata(checkpoint.resolve_model_path(init))["model"]
    if "members" in description:  # an ensemble: its main member is what training starts from
        description = description["members"][main_member(description)]
    head = description["head"]
    check_head_age_range(config, head)
    adopted = {
        "backbone": description["backbone"],
        "head": head["kind"],
        "pretrained": False,
        "weights": None,
    }
    for name in HEAD_SETTINGS:
        if name in head:
            adopted[name] = head[name]
    changed = {k: v for k, v in adopted.items() if getattr(config.model, k) != v}
    if changed:
        log.info("--init %s sets %s", config.model.init, ", ".join(f"{k}={v}" for k, v in changed.items()))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, init=init, **adopted))


def check_head_age_range(config: Config, head: dict[str, Any]) -> None:
    """Refuse (ConfigError) to fine-tune a head whose classes cover another age range than the run's
    --min-age/--max-age (see `adopt_init_architecture`: only bins heads have one)."""
    if "min_age" not in head or "max_age" not in head:
        return
    covered, kept = (head["min_age"], head["max_age"]), (config.data.min_age, config.data.max_age)
    if covered != kept:
        raise ConfigError(
            f"--init {config.model.init} has a {head['kind']} head for ages {covered[0]}-{covered[1]}, but "
            f"this run keeps ages {kept[0]}-{kept[1]}: pass --min-age {covered[0]} --max-age {covered[1]}, "
            f"or train a {head['kind']} head for {kept[0]}-{kept[1]} without --init"
        )


def model_metadata(
    config: Config,
    prepared: PreparedData,
    framing: dict[str, Any],
    aligned_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What the saved model needs at inference (image size, framing, alignment template) and where it
    came from (dataset, training images, --init)."""
    metadata = {
        "image_size": config.data.image_size,
        "age_range": [config.data.min_age, config.data.max_age],
        "dataset": config.data.dataset,
        "crop": framing,
        "train_images": int((prepared.table["split"] == "train").sum()),
    }
    alignment = cache_alignment(config)
    if alignment is not None:
        metadata["alignment"] = alignment.aligner.to_metadata()
        if aligned_counts:
            metadata["alignment"]["training_images"] = {
                k: v for k, v in aligned_counts.items() if k in ("faces_found", "no_face_median_landmarks")
            }
    if config.model.init:
        metadata["init"] = recorded_path(config.model.init)
    return metadata
