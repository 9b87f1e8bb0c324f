"""EMA weights: an exponential moving average of the model's parameters, updated after every step.

The average of the last few thousand steps' weights generalises a little better than the last
step's and is less sensitive to when training stops (Polyak averaging; timm's ModelEmaV2 and
torchvision's reference scripts offer the same). Normalisation statistics (BatchNorm's running mean
and variance) follow the trained model's, copied at every step; every other buffer (the head's
calibrated interval level) is the average's own: it is calibrated on the averaged model's validation
outputs and must not be overwritten by the trained model's value.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from age_detect_resnet.modeling.model import AgeModel


class ModelEma:
    """`module` holds the averaged weights (an AgeModel in eval mode, never trained directly).

    Early in training the average would be dominated by the random head, so the decay used at step n
    is min(decay, (1 + n) / (10 + n)): short runs average over their own length."""

    def __init__(self, model: AgeModel, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module: AgeModel = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.parameter_names = {name for name, _ in self.module.named_parameters()}
        self.followed_buffers = {
            f"{module_name}.{buffer_name}" if module_name else buffer_name
            for module_name, module in self.module.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            for buffer_name, _ in module.named_buffers(recurse=False)
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model` (the unwrapped AgeModel, not its DDP wrapper)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = self.module.state_dict(), model.state_dict()
        for name, value in current.items():
            target = averaged[name]
            if name in self.parameter_names:
                target.lerp_(value.detach().to(target.dtype), 1 - decay)
            elif name in self.followed_buffers:
                target.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.decay = int(state["updates"]), float(state["decay"])
        self.module.load_state_dict(state["module"])
