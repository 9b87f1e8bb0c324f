"""The loops: `train_one_epoch` and `evaluate`, each returning a dict of metrics over samples.

No argparse, no globals: precision comes in as an autocast factory, cross-process reduction as a
function (identity in a single process), so the same loops serve CPU, GPU and DDP runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from age_detect_resnet.data.dataset import Batch
from age_detect_resnet.data.sources import DataError
from age_detect_resnet.modeling.model import AgeModel, raw_outputs
from age_detect_resnet.training.ema import ModelEma

Reduce = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message gives the epoch and step."""


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def to_device(images: torch.Tensor, device: torch.device, *, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=fmt)


def train_one_epoch(
    model: AgeModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    age_weights: torch.Tensor | None = None,
    channels_last: bool = True,
    reduce: Reduce = _no_reduce,
    progress: bool = True,
    module: AgeModel | None = None,
    clip_grad_norm: float = 0.0,
    accumulate: int = 1,
    ema: ModelEma | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean loss and MAE over all samples of all processes.

    `module` is the unwrapped model (for its head) when `model` is wrapped in DDP or compiled.
    `age_weights` (101,) weights each sample's loss by its age (inverse-frequency weighting).
    The optimiser steps every `accumulate` batches (and after the last), on the mean of their
    gradients, clipped to a total norm of `clip_grad_norm` (0: not clipped); under DDP the gradients
    are reduced across processes only on those steps (`no_sync`). `ema` is updated after every step.
    """
    unwrapped = module or model
    head = unwrapped.head
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, abs error sum, samples, skipped
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        batch: Batch
        totals[3] += (~batch.kept).sum()
        if batch.ages.numel() == 0:
            continue
        images = to_device(batch.images, device, channels_last=channels_last)
        ages = batch.ages.to(device, non_blocking=True)
        weights = (
            age_weights[ages.round().long().clamp(0, len(age_weights) - 1)]
            if age_weights is not None
            else None
        )
        steps_now = (step + 1) % accumulate == 0 or step + 1 == len(loader)
        sync = contextlib.nullcontext() if steps_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                outputs = model(images)
            loss = head.loss(outputs, ages, weights)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr or check the data "
                    "(the last good checkpoint is kept)"
                )
            (scaler.scale(loss / accumulate) if scaler is not None else loss / accumulate).backward()
        if steps_now:
            optimizer_step(optimizer, unwrapped, scaler, clip_grad_norm)
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(unwrapped)
        with torch.no_grad():
            n = ages.numel()
            totals[0] += loss.detach().double() * n
            totals[1] += (head.decode(outputs.detach()) - ages).abs().sum().double()
            totals[2] += n
        if progress and step % 10 == 0:
            bar.set_postfix(
                loss=f"{totals[0].item() / max(totals[2].item(), 1):.2f}",
                mae=f"{totals[1].item() / max(totals[2].item(), 1):.2f}",
            )
    totals = reduce(totals)
    count = max(totals[2].item(), 1.0)
    return {
        "loss": totals[0].item() / count,
        "mae": totals[1].item() / count,
        "images": totals[2].item(),
        "skipped": totals[3].item(),
        "seconds": time.perf_counter() - start,
    }


def check_images_read(metrics: dict[str, float], what: str, root: Path) -> None:
    """Stop where every image of a pass (`train_one_epoch`, `evaluate`) was skipped as unreadable
    (--skip-bad-images): its loss and MAE would read 0, and a model of no validation error be kept."""
    if not metrics["images"]:
        raise DataError(
            f"{what}: all {metrics['skipped']:,.0f} image(s) were unreadable and skipped "
            f"(--skip-bad-images); check that the dataset's image files are in {root} and can be opened"
        )


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float,
) -> None:
    """Clip (when asked), step and clear the gradients; with an fp16 scaler, unscaled first."""
    if scaler is not None:
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Predictions:
    """Per-sample results of `evaluate`, in dataset order, for the samples that could be read."""

    indices: np.ndarray  # (N,) dataset indices
    ages: np.ndarray  # (N,) true ages
    predicted: np.ndarray  # (N,) predicted ages
    outputs: np.ndarray  # (N, K) raw head outputs (float32)


@torch.inference_mode()
def evaluate(
    model: AgeModel,
    loader: DataLoader,
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    channels_last: bool = True,
    reduce: Reduce = _no_reduce,
    progress: bool = True,
    desc: str = "eval",
    module: AgeModel | None = None,
    tta_flip: bool = False,
) -> tuple[dict[str, float], Predictions]:
    """Loss and MAE over every sample of `loader` (summed across processes), and this process's
    predictions. `tta_flip` averages the raw outputs of each image and its mirror image."""
    head = (module or model).head
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    kept_masks, ages_all, predicted_all, outputs_all = [], [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        batch: Batch
        kept_masks.append(batch.kept)
        totals[3] += (~batch.kept).sum()
        if batch.ages.numel() == 0:
            continue
        images = to_device(batch.images, device, channels_last=channels_last)
        ages = batch.ages.to(device, non_blocking=True)
        with autocast():
            outputs = raw_outputs(model, images, tta_flip=tta_flip)
        predicted = head.decode(outputs)
        totals[0] += head.loss(outputs, ages).double() * ages.numel()
        totals[1] += (predicted - ages).abs().sum().double()
        totals[2] += ages.numel()
        ages_all.append(batch.ages)
        predicted_all.append(predicted.cpu())
        outputs_all.append(outputs.cpu())
    totals = reduce(totals)
    count = max(totals[2].item(), 1.0)
    metrics = {
        "loss": totals[0].item() / count,
        "mae": totals[1].item() / count,
        "images": totals[2].item(),
        "skipped": totals[3].item(),
    }
    order = np.asarray(list(iter(loader.sampler)))
    kept = torch.cat(kept_masks).numpy() if kept_masks else np.zeros(0, dtype=bool)
    predictions = Predictions(
        indices=order[: len(kept)][kept],
        ages=_concat(ages_all),
        predicted=_concat(predicted_all),
        outputs=torch.cat(outputs_all).numpy() if outputs_all else np.zeros((0, 1), dtype=np.float32),
    )
    return metrics, predictions


def _concat(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)
