"""Batch-norm statistics recomputed for a model's final weights: every BatchNorm's running mean and
variance reset, then set to the plain mean over some training batches seen in train mode (no gradient;
no weight changes). After weight averaging the statistics are averages too and no longer those of
the averaged network (SWA's `update_bn` does the same); and the running statistics that training leaves
are an exponential average of the last batches' (momentum 0.1), each under slightly different weights.
Measured on the bundled model's stages: README, "Batch-norm statistics".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from age_detect_resnet.modeling.model import AgeModel


@torch.no_grad()
def recompute_norm_statistics(
    model: AgeModel, batches: Iterable[torch.Tensor], *, limit: int, device: torch.device | None = None
) -> int:
    """Recompute `model`'s batch-norm statistics on at most `limit` batches of uint8 images (B, 3, S, S),
    as training feeds them (augmented); returns the number of images seen (0: the model has no batch
    norm, nothing changed). The model's mode and the norms' momentum are restored. ValueError where
    `batches` yields no image: the old statistics are then gone, so callers must not save the model."""
    norms = [layer for layer in model.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    device = device or next(model.parameters()).device
    momenta = [layer.momentum for layer in norms]
    was_training = model.training
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over all batches, not an exponential one
    model.train()
    seen = 0
    try:
        for index, images in enumerate(batches):
            if index >= limit:
                break
            model(images.to(device, memory_format=torch.channels_last))
            seen += len(images)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("no training images to recompute the batch-norm statistics on")
    return seen
