"""The optimiser, its learning-rate schedule, and per-age loss weights, from the run's settings."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from age_detect_resnet.training.config import Config


def create_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, as the seed (lr 5e-5 by default)."""
    return torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)


def optimizer_steps_per_epoch(config: Config, batches: int) -> int:
    """Optimiser steps in an epoch of `batches` batches (one per --accumulate batches, and the last)."""
    return math.ceil(batches / config.optim.accumulate)


def create_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step: see `lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch))


def lr_lambda(config: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr per step: linear warm-up, then constant (seed) or cosine to zero."""
    warmup = int(config.optim.warmup_epochs * steps_per_epoch)
    total = max(1, config.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.optim.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def inverse_frequency_weights(ages: np.ndarray, max_weight: float = 10.0, power: float = 1.0) -> torch.Tensor:
    """(101,) loss weight per age: inverse of the age's frequency (smoothed over +-2 years) raised to
    `power` (1: fully inverse; 0.5: its square root, a milder tilt), normalised to mean 1 over the
    training samples and capped, so rare ages count more."""
    classes = np.clip(np.round(ages).astype(int), 0, 100)
    counts = np.bincount(classes, minlength=101).astype(float)
    smoothed = np.convolve(counts, np.ones(5) / 5, mode="same")
    weights = np.maximum(smoothed, 1.0) ** -power
    weights /= weights[classes].mean()
    return torch.tensor(np.minimum(weights, max_weight), dtype=torch.float32)
