"""Backbone and head factories: a torchvision backbone, its ImageNet weights, and an age head."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn

from age_detect_resnet.modeling.heads import AgeHead, create_head

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _strip_fc(model: nn.Module) -> nn.Module:
    model.fc = nn.Identity()
    return model


def _strip_classifier(model: nn.Module) -> nn.Module:
    model.classifier = nn.Identity()
    return model


def _strip_last_linear(model: nn.Module) -> nn.Module:
    model.classifier[-1] = nn.Identity()  # ConvNeXt: keep the LayerNorm and Flatten before the Linear
    return model


def _stride_in_1x1(model: nn.Module) -> nn.Module:
    """ResNet v1 (the original Caffe ResNet-50): the first block of layer2-4 downsamples in its 1x1
    convolution, where torchvision's v1.5 does it in the 3x3. Weights trained as v1 (converted from
    Caffe or Keras) only compute their features in this layout."""
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return model


class BackboneSpec(NamedTuple):
    builder: str  # torchvision.models function
    download: str | None  # torchvision weights enum offering its ImageNet weights (None: local file only)
    features: int  # width of the features once the classifier is stripped
    strip: Callable[[nn.Module], nn.Module]
    adapt: Callable[[nn.Module], nn.Module] | None = None  # layout change applied before loading weights


_BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", "ResNet18_Weights", 512, _strip_fc),
    "resnet34": BackboneSpec("resnet34", "ResNet34_Weights", 512, _strip_fc),
    "resnet50": BackboneSpec("resnet50", "ResNet50_Weights", 2048, _strip_fc),
    "resnet50_v1": BackboneSpec("resnet50", None, 2048, _strip_fc, _stride_in_1x1),
    "resnet101": BackboneSpec("resnet101", "ResNet101_Weights", 2048, _strip_fc),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", "MobileNet_V2_Weights", 1280, _strip_classifier),
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large", "MobileNet_V3_Large_Weights", 960, _strip_classifier
    ),
    "efficientnet_b0": BackboneSpec("efficientnet_b0", "EfficientNet_B0_Weights", 1280, _strip_classifier),
    "convnext_tiny": BackboneSpec("convnext_tiny", "ConvNeXt_Tiny_Weights", 768, _strip_last_linear),
}


class WeightsError(RuntimeError):
    """ImageNet weights could not be obtained; the message says how to fix it."""


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `.pth`/`.pt` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch.load raise many types for foreign files
        raise WeightsError(
            f"{path} is not a readable state dict ({err}); use a .safetensors or .pth state dict"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def create_backbone(
    name: str, *, pretrained: bool = True, weights: Path | None = None
) -> tuple[nn.Module, int]:
    """A torchvision classifier without its last layer, and the width of the features it returns.

    ImageNet weights come from `weights` (a local state dict of the full classifier) when given,
    else from torchvision's download when `pretrained`.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(_BACKBONES)}")
    spec = _BACKBONES[name]
    builder = getattr(torchvision.models, spec.builder)
    adapt = spec.adapt or (lambda model: model)
    if weights is not None:
        model = adapt(builder(weights=None))
        state = load_state_dict_file(Path(weights))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"{weights} does not match torchvision's {name}: {str(err)[:300]}") from err
        log.info("loaded ImageNet weights for %s from %s", name, weights)
    elif pretrained:
        if spec.download is None:
            raise WeightsError(
                f"{name} has no ImageNet download; pass --weights FILE (v1 weights converted "
                "from Caffe/Keras) or --no-pretrained"
            )
        enum = getattr(torchvision.models, spec.download).DEFAULT
        try:
            model = builder(weights=enum)
        except Exception as err:  # URLError, SSL errors, timeouts: any failure to download
            raise WeightsError(
                f"could not download the ImageNet weights of {name} ({err.__class__.__name__}: {err}). "
                f"Pass --weights FILE with a local torchvision state dict (.safetensors or .pth), "
                f"or --no-pretrained to train from random initialisation"
            ) from err
    else:
        model = adapt(builder(weights=None))
    return spec.strip(model), spec.features


def raw_outputs(model: nn.Module, images: torch.Tensor, *, tta_flip: bool = False) -> torch.Tensor:
    """(B, K) float32 head outputs of `model` (an AgeModel, or one wrapped in DDP or compiled); with
    `tta_flip` the mean of the image's and its mirror image's (test-time augmentation), unless the model
    already mixes in each face's mirror image itself (a mirrored ensemble: flipping again changes nothing)."""
    outputs = model(images).float()
    if tta_flip and not getattr(model, "mirror", False):
        outputs = (outputs + model(images.flip(-1)).float()) / 2
    return outputs


class AgeModel(nn.Module):
    """Backbone + head, taking uint8 or [0, 1] float images (B, 3, H, W) and normalising them itself,
    so every caller (training, inference, exported models) feeds the same raw pixels."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        head: AgeHead,
        *,
        backbone_name: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone, self.head, self.backbone_name = backbone, head, backbone_name
        # What a trained model needs at inference (image size, crop margin, ...): see checkpoint.py.
        self.metadata: dict[str, Any] = {}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K) raw head outputs
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        features = self.backbone(x)  # (B, F)
        # The head runs in float32 even under autocast: bf16 would round ages to 0.25-year steps.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> the head's readout, {name: (B,)} (see `AgeHead.predict`)."""
        return self.head.predict(self(images))

    def predict_ages(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B,) ages in years."""
        return self.head.decode(self(images))

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "head": self.head.describe(),
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
        }


def create_model(
    backbone: str = "resnet50",
    head: str = "regression",
    *,
    pretrained: bool = True,
    weights: Path | None = None,
    **head_options: Any,
) -> AgeModel:
    """An age model; `head_options` go to `heads.create_head` (hidden_dim, init_age, min_age, ...)."""
    features, width = create_backbone(backbone, pretrained=pretrained, weights=weights)
    return AgeModel(features, create_head(head, width, **head_options), backbone_name=backbone)


def create_resnet50_regressor(
    pretrained: bool = True, *, weights: Path | None = None, init_age: float | None = None
) -> AgeModel:
    """The seed's model: ResNet-50 with the head Linear(2048, 256) -> ReLU -> Linear(256, 1)."""
    return create_model("resnet50", "regression", pretrained=pretrained, weights=weights, init_age=init_age)


def model_from_description(description: dict[str, Any]) -> AgeModel:
    """Rebuild the architecture recorded by `AgeModel.describe()` (weights are loaded separately); an
    ensemble's (`AgeEnsemble.describe()`, with its members) too."""
    if "members" in description:
        from age_detect_resnet.modeling.ensemble import ensemble_from_description

        return ensemble_from_description(description)
    head_options = dict(description["head"])
    kind = head_options.pop("kind")
    features, width = create_backbone(description["backbone"], pretrained=False)
    return AgeModel(
        features,
        create_head(kind, width, **head_options),
        backbone_name=description["backbone"],
        mean=tuple(description.get("mean", IMAGENET_MEAN)),
        std=tuple(description.get("std", IMAGENET_STD)),
    )


def folded_for_inference(model: AgeModel) -> AgeModel:
    """A copy of `model` for inference (evaluation mode) in which every backbone's batch norms are
    folded into the convolutions before them: the same function to float32 rounding, without the batch
    norms' own passes over memory (1.12x photos/s end to end in fp32 on 2 CPU cores: README, Speed).
    The model passed in is not changed, so it can still be trained or saved; a backbone that
    torch.fx cannot trace is copied as it is."""
    import copy

    folded = copy.deepcopy(model).eval()
    # An ensemble has no backbone of its own: its members' are folded.
    owners = [m for m in folded.modules() if isinstance(getattr(m, "backbone", None), nn.Module)]
    for owner in owners:
        try:
            from torch.fx.experimental.optimization import fuse

            owner.backbone = fuse(owner.backbone)
        except Exception as err:  # an optimisation only: the unfolded backbone gives the same ages
            log.debug("batch norms of %s not folded: %s", getattr(owner, "backbone_name", "a backbone"), err)
    return folded
