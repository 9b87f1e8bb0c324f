"""Data loading speed: the prepared uint8 image cache (project) against decoding every JPEG every
epoch (seed).

    python benchmarks/bench_data.py                                   # 512 UTKFace images, 224 px, 2 epochs
    python benchmarks/bench_data.py --images 4096 --workers 2 --epochs 3

Reference: a Dataset that opens each JPEG with PIL and applies Resize, ToTensor and Normalize (float32)
on every access, in a DataLoader. Project: `prepare_cache` once (its one-off time is printed apart), then
`CachedImages` through the project's `AgeDataset` and `make_loader`, yielding uint8 batches (read whole
batches in the main process: `make_loader` drops the workers there). The last column is the training
loader, the cache with the `light` augmentation in the worker processes, to set against the training
step's images/s (bench_train.py): loading must never be what training waits for.
Both loaders get the same batch size, requested workers and images; images/s counts every epoch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import UTKFACE, age_of, machine, print_table, seed_transform, utkface_files
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from age_detect_resnet.data.cache import prepare_cache
from age_detect_resnet.data.dataset import AgeDataset, make_loader, train_transform


class SeedDataset(Dataset):
    """The seed's data path: decode, resize and normalise the JPEG on every access."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.transform = files, seed_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(self.files[index]).convert("RGB")
        return self.transform(image), torch.tensor(age_of(self.files[index]))


def images_per_second(loader: DataLoader, epochs: int) -> float:
    """Images delivered per second over `epochs` full passes (worker start-up included, as in training)."""
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += len(batch[0])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="UTKFace images to load")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers (both paths; also cache build)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="full passes timed per path")
    args = parser.parse_args()

    files = utkface_files(args.images)
    reference = DataLoader(
        SeedDataset(files, args.image_size),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    reference_speed = images_per_second(reference, args.epochs)

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = prepare_cache(
            UTKFACE,
            [f.name for f in files],
            image_size=args.image_size,
            cache_dir=Path(cache_dir),
            workers=max(1, args.workers),
        )
        build_seconds = time.perf_counter() - start
        dataset = AgeDataset(cache, [age_of(f) for f in files])
        project = make_loader(
            dataset,
            batch_size=args.batch_size,
            train=True,
            num_workers=args.workers,
            device=torch.device("cpu"),
        )
        project_speed = images_per_second(project, args.epochs)
        augmented = AgeDataset(
            cache, [age_of(f) for f in files], transform=train_transform("light", args.image_size)
        )
        training = make_loader(
            augmented,
            batch_size=args.batch_size,
            train=True,
            num_workers=args.workers,
            device=torch.device("cpu"),
        )
        training_speed = images_per_second(training, args.epochs)

    settings = (
        f"{len(files)} images, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
        f"{args.epochs} epochs"
    )
    print_table(
        "Data loading (bench_data.py)",
        [
            "seed: decode every epoch (img/s)",
            "project: prepared cache (img/s)",
            "speed-up",
            "one-off cache build (s)",
            "training loader: cache + light augmentation (img/s)",
        ],
        [
            [
                reference_speed,
                project_speed,
                f"{project_speed / reference_speed:.1f}x",
                build_seconds,
                training_speed,
            ]
        ],
        machine=machine(torch.device("cpu")),
        settings=settings,
    )


if __name__ == "__main__":
    main()
