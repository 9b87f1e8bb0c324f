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
from collections.abc import Sequence
from typing import Any

import torch

from age_detect_resnet.faces.align import framing_of
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
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise AveragingError(f"{len(weights)} weights for {count} models; give one weight per model")
    if not all(w >= 0 for w in weights) or sum(weights) <= 0:
        raise AveragingError(f"weights {weights} must be zero or more with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


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
    """Refuse models that see faces differently (another input size, framing or aligner): one crop of a
    face cannot feed them all, so neither their average nor their ensemble would mean anything."""
    first, first_name = models[0], names[0]
    expected_size, expected_framing = image_size_of(first), framing_of(first.metadata)
    for model, name in zip(models[1:], names[1:], strict=True):
        if image_size_of(model) != expected_size or framing_of(model.metadata) != expected_framing:
            raise error(
                f"{name} and {first_name} take faces of a different size or framing; combining models "
                "needs models trained on the same crops"
            )


def check_averageable(models: Sequence[AgeModel], names: Sequence[str]) -> None:
    """Refuse models whose weights do not correspond one to one (another backbone or head) or that see
    faces differently (`check_same_faces`): their average would mean nothing."""
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
    model's, and so is the metadata. The head's interval level is averaged too: recalibrate it
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
