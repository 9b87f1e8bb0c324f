"""Ensembles: trained age models of any backbones that take the same face crop, run side by side, their
predictions combined by weight. Where weight averaging (averaging.py) needs one lineage and gives one
network, an ensemble takes models trained apart (another backbone, another start) and costs the sum of
their forward passes; independent errors partly cancel.

An `AgeEnsemble` is an `AgeModel` to every consumer (the runtime backends, evaluation, export, the
bundle): `forward` returns one set of raw head outputs, its members' combined by their head
(`AgeHead.combine`: the weighted mean for regression, the weighted mixture of the predicted
distributions for the probabilistic heads, so the age is the weighted mean of the members' ages and the
interval comes from the mixture), and `head` reads them out. That head is a readout only: its own
layers are never run (1 feature wide, so it adds no weight); its interval level is the ensemble's own,
calibrated on validation faces (`age-detect ensemble`, training/ensemble_run.py).

With `mirror`, every member also sees each face's mirror image, and the two views are mixed half and
half (the flip test-time augmentation of `--tta`, made part of the model, so every consumer, an ONNX
export included, runs it); one model alone may form such an ensemble. An ensemble given as a member is
taken apart into its own members (weights multiplied), so ensembles stay one level deep and the members'
weights keep their names (`members.N.`); unless `mirror` is given, the result is mirrored where such a
member was (`mirror=False` turns a mirrored ensemble's views off again).

Saved like any model (checkpoint.py): one safetensors file, members under `members.N.`, and the
description {"members": [...], "weights": [...], "head": ..., ["mirror": true]} in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from age_detect_resnet.modeling.averaging import check_same_faces, mixture_weights
from age_detect_resnet.modeling.heads import create_head
from age_detect_resnet.modeling.model import AgeModel, model_from_description

# The two views of a small batch go through each member as one batch of twice the size, while that stays
# at most this many images: one photo end to end takes 88.5 ms with the bundled model against 114.6 with
# the views in batches of their own (benchmarks/bench_photos.py, median, 2 Xeon cores, bf16). Timing the
# bundled model's forward pass alone on 1-32 faces there, one batch was faster up to 8 faces and as fast
# or slower from 16 on.
SHARED_VIEWS_MAX_BATCH = 16


def _graph_capture() -> bool:
    """Whether the forward pass is being traced or exported: the graph then takes the branch that holds
    for any batch size."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class EnsembleError(ValueError):
    """Models that cannot form an ensemble, or weights that are no mixture; the message says which."""


def _readout_key(model: AgeModel) -> tuple[Any, ...]:
    """What must match for two heads' raw outputs to be combined: the head's kind and what each output
    means (the same classes)."""
    head = model.head
    centres = getattr(head, "centres", None)
    return head.kind, tuple(centres.tolist()) if centres is not None else None


class AgeEnsemble(AgeModel):
    """Members (AgeModels taking the same crop, heads of one kind and classes) and their weights."""

    weights: torch.Tensor

    def __init__(
        self,
        members: Sequence[AgeModel],
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
        readout: dict[str, Any] | None = None,
        mirror: bool | None = None,
    ) -> None:
        nn.Module.__init__(self)  # no backbone of its own: AgeModel's constructor builds one
        names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(members))]
        try:
            fractions = mixture_weights(weights, len(members))
        except ValueError as err:
            raise EnsembleError(str(err)) from err
        members, fractions, names, mirror = _taken_apart(members, fractions, names, mirror)
        if not members or (len(members) < 2 and not mirror):
            raise EnsembleError(
                "an ensemble needs at least two models, or one with its mirror image (--mirror)"
            )
        self.mirror = mirror
        first = _readout_key(members[0])
        for member, name in zip(members[1:], names[1:], strict=True):
            if _readout_key(member) != first:
                raise EnsembleError(
                    f"{name} ({member.head.kind} head) and {names[0]} ({members[0].head.kind} head) do "
                    "not predict the same outputs; an ensemble needs heads of one kind over the same ages"
                )
        check_same_faces(members, names, EnsembleError)
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(fractions, dtype=torch.float32), persistent=False)
        description = dict(readout or members[0].head.describe())
        kind = description.pop("kind")
        self.head = create_head(kind, 1, **{**description, "hidden_dim": 1})
        self.backbone_name = " + ".join(member.backbone_name for member in members)
        self.metadata = dict(members[0].metadata)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K) combined outputs
        if not self.mirror:
            outputs, weights = [member(images) for member in self.members], self.weights
        else:  # per member: the faces' outputs, then their mirror images'; each view half the weight
            weights = self.weights.repeat_interleave(2) / 2
            mirrored = images.flip(-1)
            if 2 * images.shape[0] <= SHARED_VIEWS_MAX_BATCH and not _graph_capture():
                both = torch.cat([images, mirrored])
                outputs = [part for member in self.members for part in member(both).chunk(2)]
            else:
                outputs = [member(view) for member in self.members for view in (images, mirrored)]
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.head.combine([output.float() for output in outputs], weights)

    def describe(self) -> dict[str, Any]:
        description = {
            "backbone": self.backbone_name,
            "head": self.head.describe(),
            "members": [member.describe() for member in self.members],
            "weights": [float(w) for w in self.weights],
        }
        return {**description, "mirror": True} if self.mirror else description


def _taken_apart(
    members: Sequence[AgeModel], fractions: Sequence[float], names: Sequence[str], mirror: bool | None
) -> tuple[list[AgeModel], list[float], list[str], bool]:
    """Members with every ensemble among them replaced by its own members (their weights multiplied by the
    ensemble's), and whether the result is mirrored (`mirror`; where None, whether any such ensemble was)."""
    flat_members, flat_fractions, flat_names = [], [], []
    inherited = False
    for member, fraction, name in zip(members, fractions, names, strict=True):
        if isinstance(member, AgeEnsemble):
            inherited = inherited or member.mirror
            for index, (inner, weight) in enumerate(zip(member.members, member.weights, strict=True)):
                if not getattr(inner, "metadata", None):  # members loaded from a file have none of their own
                    inner.metadata = dict(member.metadata)  # they see the ensemble's faces
                flat_members.append(inner)
                flat_fractions.append(fraction * float(weight))
                flat_names.append(f"{name} (member {index + 1}, {inner.backbone_name})")
        else:
            flat_members.append(member)
            flat_fractions.append(fraction)
            flat_names.append(name)
    return flat_members, flat_fractions, flat_names, inherited if mirror is None else mirror


def main_member(description: dict[str, Any]) -> int:
    """The index of the member with the largest weight (the first of equals) in an ensemble's description:
    the one a training run started from the ensemble (`--init`) fine-tunes, an ensemble not being
    trained as one network."""
    weights = description["weights"]
    return max(range(len(weights)), key=lambda i: (weights[i], -i))


def ensemble_from_description(description: dict[str, Any]) -> AgeEnsemble:
    """Rebuild the ensemble recorded by `AgeEnsemble.describe()` (weights are loaded separately)."""
    members = [model_from_description(member) for member in description["members"]]
    return AgeEnsemble(
        members, description["weights"], readout=description["head"], mirror=description.get("mirror", False)
    )
