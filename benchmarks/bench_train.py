"""Training step speed: the project's step (uint8 input, channels_last, bf16/fp16 autocast, the engine's
`train_one_epoch`) against the seed's (normalised float32 NCHW, eager fp32), same model and batches.

    python benchmarks/bench_train.py                                  # ResNet-50, 224 px, batch 32, 5 steps
    python benchmarks/bench_train.py --image-size 128 --batch-size 64 --steps 10
    python benchmarks/bench_train.py --device cuda                    # on a GPU: AMP + channels_last

Data loading is left out (see bench_data.py): both paths train on the same real UTKFace batches held in
memory. Each path starts from the same weights and takes one untimed warm-up step.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import (
    add_model_arguments,
    age_of,
    benchmark_model,
    machine,
    print_table,
    project_batch,
    seed_batch,
    seed_forward,
    utkface_files,
)
from torch.nn import functional as F

from age_detect_resnet.data.dataset import Batch
from age_detect_resnet.runtime import autocast_factory, resolve_precision, select_device
from age_detect_resnet.training.engine import train_one_epoch


def seed_steps(
    model, images: torch.Tensor, ages: torch.Tensor, *, batch_size: int, steps: int, device: torch.device
) -> float:
    """Seconds for `steps` seed-style training steps (after one warm-up step)."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)

    def step(i: int) -> None:
        start = (i * batch_size) % len(images)
        x = images[start : start + batch_size].to(device)
        y = ages[start : start + batch_size].to(device)
        loss = F.mse_loss(seed_forward(model, x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)
    _sync(device)
    begin = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    _sync(device)
    return time.perf_counter() - begin


def project_steps(
    model,
    images: torch.Tensor,
    ages: torch.Tensor,
    *,
    batch_size: int,
    steps: int,
    device: torch.device,
    precision: str,
) -> float:
    """Seconds for `steps` steps of the project's `train_one_epoch` (after a one-step warm-up epoch)."""
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    batches = []
    for i in range(steps + 1):
        start = (i * batch_size) % len(images)
        chunk = slice(start, start + batch_size)
        batches.append(Batch(images[chunk], ages[chunk], torch.ones(len(ages[chunk]), dtype=torch.bool)))
    common = {
        "device": device,
        "autocast": autocast_factory(device, precision),
        "scaler": scaler,
        "progress": False,
    }
    train_one_epoch(model, batches[:1], optimizer, epoch=0, **common)
    _sync(device)
    begin = time.perf_counter()
    train_one_epoch(model, batches[1:], optimizer, epoch=1, **common)
    _sync(device)
    return time.perf_counter() - begin


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    device = select_device(args.device)
    model = benchmark_model(args)
    size = int(model.metadata["image_size"])
    files = utkface_files(args.batch_size * min(args.steps + 1, 4))  # a few distinct batches, reused
    normalised = seed_batch(files, size)  # (N, 3, S, S) float32, the seed's input
    raw = project_batch(files, size)  # (N, 3, S, S) uint8, the project's input
    ages = torch.tensor([age_of(f) for f in files])
    precision = resolve_precision("auto", device)

    seed_seconds = seed_steps(
        copy.deepcopy(model), normalised, ages, batch_size=args.batch_size, steps=args.steps, device=device
    )

    def project_seconds_at(chosen: str) -> float:
        return project_steps(
            copy.deepcopy(model),
            raw,
            ages,
            batch_size=args.batch_size,
            steps=args.steps,
            device=device,
            precision=chosen,
        )

    project_seconds = project_seconds_at(precision)
    images = args.batch_size * args.steps
    seed_speed, project_speed = images / seed_seconds, images / project_seconds
    headers = [
        "seed: fp32 NCHW eager (img/s)",
        f"project: {precision} autocast + channels_last (img/s)",
        "speed-up",
    ]
    row = [seed_speed, project_speed, f"{project_speed / seed_speed:.2f}x"]
    if device.type == "cpu" and precision != "bf16":  # what auto avoids: bf16 without bf16 instructions
        forced_seconds = project_seconds_at("bf16")
        headers.append("project, bf16 forced (img/s)")
        row.append(images / forced_seconds)
    settings = f"{model.backbone_name}, {size} px, batch {args.batch_size}, {args.steps} steps, {device.type}"
    print_table(
        "Training step (bench_train.py)",
        headers,
        [row],
        machine=machine(device),
        settings=settings,
    )


if __name__ == "__main__":
    main()
