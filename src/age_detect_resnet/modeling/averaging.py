"""Weight averaging of trained age models of one lineage: a model and the models fine-tuned from it
(the first and second stage of one recipe, say), each weight their weighted mean. Fine-tuning moves the
weights only a little, so the models lie in one basin and the average is a working model of the same
size and speed; it is often better than each of them on data unlike the training data (a "model soup",
and WiSE-FT's interpolation between a model and its fine-tuned self). Models that were not trained from
one another (two ImageNet starts) have no such average; compare them before trusting one.

`average_models` does the averaging; training/combined_run.py makes a run folder of it (the interval
calibrated on a run's validation split) and cli/average.py is the command, `age-detect average`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from age_detect_resnet.faces.align import FaceFraming, LandmarkFraming, MarginFraming, framing_of
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.model import AgeModel


class AveragingError(ValueError):
    """Models that cannot be averaged, or weights that are no mixture; the message says which."""


def mixture_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` (one per model, any positive scale) as fractions summing to 1; None: equal. One model
    is its own average (`age-detect average RUN` only recomputes its batch-norm statistics)."""
    if count < 1:
        raise AveragingError("averaging needs at least one model")
    if weights is None:
        return [1.0 / count] * count
    given, weights = list(weights), [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise AveragingError(f"weights {given} must be finite numbers (got inf or nan)")
    if len(weights) != count:
        raise AveragingError(f"{len(weights)} weights for {count} models; give one weight per model")
    if not all(w >= 0 for w in weights) or sum(weights) <= 0:
        raise AveragingError(f"weights {weights} must be zero or more with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


# How far two box framings' crop margins may differ and still count as one framing. The margins are
# fractions of the detector box, measured as medians over ~200 training faces: two runs of one recipe
# (a second seed, a stage fine-tuned from the first) measure them ~0.004 apart. 0.01 of the face size
# moves a crop edge by under a pixel at the models' input sizes, far below real framing changes (0.1+).
MARGIN_TOLERANCE = 0.01


def same_framing(first: FaceFraming, second: FaceFraming) -> bool:
    """Whether two framings cut the same crop: box framings whose margins agree within MARGIN_TOLERANCE
    (each run measures its own), else exactly equal (aligner template and version, or box vs aligned)."""
    return framing_difference(first, second) is None


def _framing_words(framing: FaceFraming) -> str:
    return (
        "aligned by five landmarks" if isinstance(framing, LandmarkFraming) else "cut from the detector box"
    )


def framing_difference(
    framing: FaceFraming, reference: FaceFraming, name: str = "the one", reference_name: str = "the other"
) -> str | None:
    """How `framing` (of `name`) cuts another crop than `reference` (of `reference_name`), in words for a
    message (the margins beyond MARGIN_TOLERANCE with their values, the aligner's version or template, box
    against aligned), or None where they cut the same crop."""
    if isinstance(framing, MarginFraming) and isinstance(reference, MarginFraming):
        mine, theirs = framing.margins, reference.margins
        if mine.keys() != theirs.keys():
            return (
                f"{name} has crop margins for {', '.join(sorted(mine))} and {reference_name} for "
                f"{', '.join(sorted(theirs))}"
            )
        apart = [side for side in mine if abs(mine[side] - theirs[side]) > MARGIN_TOLERANCE]
        if not apart:
            return None
        return (
            f"{name}'s crop margins {', '.join(f'{side} {mine[side]:.4f}' for side in apart)} against "
            f"{reference_name}'s {', '.join(f'{theirs[side]:.4f}' for side in apart)} (fractions of the "
            f"detector box) are more than the tolerance of {MARGIN_TOLERANCE:g} apart"
        )
    if isinstance(framing, LandmarkFraming) and isinstance(reference, LandmarkFraming):
        mine, theirs = framing.aligner, reference.aligner
        if mine.version != theirs.version:
            return (
                f"{name} is aligned by version {mine.version} and {reference_name} by version "
                f"{theirs.version}"
            )
        if mine != theirs:
            return f"{name} and {reference_name} are aligned onto other landmark templates"
        return None
    if framing == reference:
        return None
    return f"{name}'s faces are {_framing_words(framing)} and {reference_name}'s {_framing_words(reference)}"


def faces_difference(
    metadata: dict[str, Any], reference: dict[str, Any], name: str, reference_name: str
) -> str | None:
    """How the faces a model takes (its `metadata`: input size, framing) differ from those of the model
    described by `reference`, in words naming both (`framing_difference`), or None where one crop of a face
    feeds both."""
    size, reference_size = image_size_of(metadata), image_size_of(reference)
    if size != reference_size:
        return f"{name} takes {size} px faces and {reference_name} {reference_size} px"
    return framing_difference(framing_of(metadata), framing_of(reference), name, reference_name)


def _architecture(model: AgeModel) -> dict[str, Any]:
    """What must match for two models' weights to correspond one to one: the backbone, the head's kind
    and every tensor's name and shape, and the input normalisation. The head's loss settings (label
    spread, L1 weight) and calibrated interval may differ: the average keeps the last model's."""
    described = model.describe()
    return {
        "backbone": described["backbone"],
        "head": described["head"]["kind"],
        "mean": described["mean"],
        "std": described["std"],
        "tensors": {key: tuple(value.shape) for key, value in model.state_dict().items()},
    }


def check_same_faces(
    models: Sequence[AgeModel], names: Sequence[str], error: type[ValueError] = AveragingError
) -> None:
    """Refuse models that see faces differently (another input size, framing or aligner:
    `faces_difference`, which the message gives): one crop of a face cannot feed them all, so neither
    their average nor their ensemble would mean anything. The combined model keeps one model's margins
    (the metadata's: see its caller)."""
    first, first_name = models[0], names[0]
    for model, name in zip(models[1:], names[1:], strict=True):
        difference = faces_difference(model.metadata, first.metadata, name, first_name)
        if difference is not None:
            raise error(
                f"{name} and {first_name} take faces of a different size or framing: {difference}; "
                "combining models needs models trained on the same crops"
            )


def check_averageable(models: Sequence[AgeModel], names: Sequence[str]) -> None:
    """Refuse models whose weights do not correspond one to one (another backbone or head) or that see
    faces differently (`check_same_faces`): their average would mean nothing. An ensemble is refused
    too: its members' weights are not one network's."""
    from age_detect_resnet.modeling.ensemble import AgeEnsemble  # it imports this module

    for model, name in zip(models, names, strict=True):
        if isinstance(model, AgeEnsemble):
            raise AveragingError(
                f"{name} is an ensemble of {len(model.members)} networks; average takes single networks: "
                "write a member out as a model of its own with `python experiments/ensemble_member.py "
                f"{name} MEMBER OUT.safetensors` (MEMBER from 1) and average that"
            )
    first, first_name = models[0], names[0]
    expected = _architecture(first)
    for model, name in zip(models[1:], names[1:], strict=True):
        if _architecture(model) != expected:
            raise AveragingError(
                f"{name} ({model.describe()['backbone']}, {model.describe()['head']['kind']} head) and "
                f"{first_name} ({first.describe()['backbone']}, {first.describe()['head']['kind']} head) "
                "do not have the same architecture; only models of one backbone and head, fine-tuned "
                "from one another, can be averaged (models of different architectures can be combined "
                "by their predictions: `age-detect ensemble`)"
            )
    check_same_faces(models, names)


def average_models(
    models: Sequence[AgeModel], weights: Sequence[float] | None = None, names: Sequence[str] | None = None
) -> AgeModel:
    """A new model whose every floating-point weight and statistic is the weighted mean of the models'
    (in float32, stored in the last model's dtype); counters (batch-norm's batches seen) are the last
    model's, and so is the metadata (its crop margins too, where box framings differ within
    MARGIN_TOLERANCE). The head's interval level is averaged too: recalibrate it
    (`head.calibrate`) before trusting the intervals. `names` label the models in errors."""
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(models))]
    fractions = mixture_weights(weights, len(models))
    check_averageable(models, names)
    states = [model.state_dict() for model in models]
    averaged: dict[str, torch.Tensor] = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(
                f * state[key].detach().float().cpu() for f, state in zip(fractions, states, strict=True)
            )
            averaged[key] = total.to(last.dtype)
        else:
            averaged[key] = last.detach().clone()
    result = copy.deepcopy(models[-1]).cpu()
    result.load_state_dict(averaged, strict=True)
    result.metadata = copy.deepcopy(models[-1].metadata)
    return result.eval()
