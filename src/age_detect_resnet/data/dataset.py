"""Datasets, transforms and DataLoader factories.

Images travel as uint8 tensors (3, H, W) already resized to the model's input size; the model
normalises them itself (see `model.AgeModel`), so loaders move 4x fewer bytes and every consumer
(training, inference, export) shares one normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from age_detect_resnet.data.photo_shares import DEFAULT_SHARES, LOW_RESOLUTION_SHARE, PhotoShares
from age_detect_resnet.images import ImageReadError, load_rgb

if TYPE_CHECKING:
    from age_detect_resnet.faces.align import FaceFraming
    from age_detect_resnet.faces.detection import Face

log = logging.getLogger(__name__)


def to_input_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB picture as the model's input: resized to (size, size), uint8 (3, size, size).

    The one resize used by training, the cache and inference, so they all see identical pixels.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def pixels_to_input(pixels: np.ndarray) -> torch.Tensor:
    """A (S, S, 3) uint8 array (an aligned or cropped face) as the model's uint8 (3, S, S) input."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


class RandomLowResolution:
    """With probability `p`, shrink the image to a random side in [min_side, its side) and scale it
    back: the blur and blockiness of a small face in a photo."""

    def __init__(self, *, p: float = LOW_RESOLUTION_SHARE, min_side: int = 24) -> None:
        self.p, self.min_side = p, min_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, S, S) uint8
        side = image.shape[-1]
        if side <= self.min_side or torch.rand(()) >= self.p:
            return image
        small = int(torch.randint(self.min_side, side, ()))
        shrunk = v2.functional.resize(image, [small, small], antialias=True)
        return v2.functional.resize(shrunk, [side, side], antialias=True)


class RandomJpeg:
    """With probability `p`, re-compress the image as JPEG at a random quality in `quality`: the
    artefacts of photos saved, shared and re-saved."""

    def __init__(self, *, p: float = 0.3, quality: tuple[int, int] = (30, 95)) -> None:
        self.p, self.quality = p, quality

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, S, S) uint8 RGB
        if torch.rand(()) >= self.p:
            return image
        quality = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[:, :, ::-1])  # OpenCV's order
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            return image
        decoded = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])
        return torch.from_numpy(decoded).permute(2, 0, 1)


class RandomOcclusion:
    """With probability `p`, hide a random rectangle of the face (`area`: its share of the image,
    `aspect`: height / width) under a flat random colour with some grain: the hands, cups, microphones,
    sunglasses and hair that cover part of a face in real photos."""

    def __init__(
        self,
        *,
        p: float = 0.5,
        area: tuple[float, float] = (0.02, 0.25),
        aspect: tuple[float, float] = (0.3, 3.3),
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"occlusion probability must be between 0 and 1, got {p}")
        self.p, self.area, self.aspect = p, area, aspect

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, H, W) uint8
        if torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        share = float(torch.empty(()).uniform_(*self.area))
        log_aspect = torch.empty(()).uniform_(float(np.log(self.aspect[0])), float(np.log(self.aspect[1])))
        aspect = float(torch.exp(log_aspect))
        h = min(height, max(1, round((share * height * width * aspect) ** 0.5)))
        w = min(width, max(1, round((share * height * width / aspect) ** 0.5)))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        colour = torch.randint(0, 256, (3, 1, 1)).float()
        grain = torch.randn(3, h, w) * float(torch.empty(()).uniform_(0.0, 20.0))
        out = image.clone()
        out[:, top : top + h, left : left + w] = (colour + grain).clamp(0, 255).to(torch.uint8)
        return out


class RandomYaw:
    """With probability `p`, the face as if turned a little about its vertical axis: one side of the
    image pulled in by up to `strength` x 0.3 of its width and shortened by up to `strength` x 0.5 of
    its height (a perspective warp): the aligner undoes a turn in the photo's plane, not this one. As a
    stand-in for people looking past the camera it made every real-photo set worse (README, Tight cuts),
    so `--yaw` is off unless asked for.

    Works on the aligned crop with its context border (cache.py: a quarter of the crop wider), which the
    pulled-in side's empty margin stays within at the default strength."""

    def __init__(self, *, p: float, strength: float = 0.3) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"yaw probability must be between 0 and 1, got {p}")
        self.p, self.strength = p, strength

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, H, W) uint8
        if torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        amount = float(torch.empty(()).uniform_(0.0, self.strength))
        dx, dy = amount * 0.3 * width, amount * 0.25 * height  # each far corner moves by dy
        right, bottom = width - 1, height - 1
        start = [[0, 0], [right, 0], [right, bottom], [0, bottom]]
        if torch.rand(()) < 0.5:  # the right side turned away
            end = [[0, 0], [right - dx, dy], [right - dx, bottom - dy], [0, bottom]]
        else:
            end = [[dx, dy], [right, 0], [right, bottom], [dx, bottom - dy]]
        return v2.functional.perspective(image, start, end, interpolation=v2.InterpolationMode.BILINEAR)


class RandomTightCut:
    """With probability `p`, show the face as if its photo had been cut close around it, as pre-aligned
    face sets are: outside a random box the pixels repeat the box's edge, which is what the aligner's
    replicated border (faces/align.py) shows of a photo that ends near the face.

    Works on the aligned crop with its context border (`image_size`: the crop's side, centred in the
    image). Each side of the box is cut in from the crop's edge by a share of the crop's side: one share
    drawn in `cut` for the whole box (photos are cut about evenly round the face), each side moved by up
    to `jitter` from it; a negative share keeps some of the context border."""

    def __init__(
        self,
        *,
        p: float,
        image_size: int,
        cut: tuple[float, float] = (0.0, 0.25),
        jitter: float = 0.05,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"tight-cut probability must be between 0 and 1, got {p}")
        if not 0.0 <= cut[0] <= cut[1] < 0.5:
            raise ValueError(f"tight cuts are shares of the crop's side in [0, 0.5), got {cut}")
        self.p, self.image_size, self.cut, self.jitter = p, image_size, cut, jitter

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, S', S') uint8, S' >= image_size
        if torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        share = float(torch.empty(()).uniform_(*self.cut))
        sides = share + torch.empty(4).uniform_(-self.jitter, self.jitter)  # top, bottom, left, right
        bounds = []
        for length, near, far in ((height, sides[0], sides[1]), (width, sides[2], sides[3])):
            border = (length - self.image_size) / 2
            first = max(0, round(border + float(near) * self.image_size))
            last = min(length - 1, round(length - 1 - border - float(far) * self.image_size))
            bounds.append(torch.arange(length).clamp(first, max(first, last)))
        rows, cols = bounds
        return image[:, rows][:, :, cols]


def train_transform(
    augment: str, image_size: int, shares: PhotoShares = DEFAULT_SHARES
) -> v2.Transform | None:
    """Augmentation on uint8 (3, S', S') tensors; None for the seed's plain resize.

    `photo` takes the aligned crop with its context border (S' > S, see cache.py) and ends with the
    centre (S, S): shifts, scaling and rotation then show real surroundings, not black corners.
    `shares` (photo only) are the shares of faces with a random patch hidden (RandomOcclusion), shrunk
    and scaled back (RandomLowResolution), made grey, shown as if cut close round them (RandomTightCut)
    and as if turned a little about the vertical axis (RandomYaw)."""
    unused = shares.unused_by(augment)
    if unused:
        raise ValueError(unused)
    if augment == "none":
        return None
    if augment == "photo":
        occluder = [RandomOcclusion(p=shares.occlusion)] if shares.occlusion else []
        cutter = [RandomTightCut(p=shares.tight_cut, image_size=image_size)] if shares.tight_cut else []
        turner = [RandomYaw(p=shares.yaw)] if shares.yaw else []
        return v2.Compose(
            [
                *cutter,  # first: the photo is cut before the aligner's jitter below
                *turner,
                v2.RandomHorizontalFlip(),
                # Landmark alignment leaves a few degrees and percent of jitter on real photos; cover it.
                v2.RandomAffine(degrees=10, translate=(0.04, 0.04), scale=(0.9, 1.1)),
                v2.CenterCrop(image_size),
                v2.RandomApply(
                    [v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.8
                ),
                v2.RandomGrayscale(p=shares.greyscale),
                RandomLowResolution(p=shares.low_resolution, min_side=max(16, image_size // 4)),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.15),
                RandomJpeg(p=0.3, quality=(30, 95)),
                *occluder,
            ]
        )
    if augment == "light":
        return v2.Compose(
            [
                # Mild reframing only: the face must stay framed as at inference (centred, same margin).
                v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            ]
        )
    raise ValueError(f"unknown augmentation {augment!r}; use none, light or photo")


class ImageSource(Protocol):
    """Where the i-th input image comes from: the files themselves, or a prepared cache."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def load(self, index: int) -> torch.Tensor: ...


class FileImages:
    """Decode and resize the image file on every access (the reference data path); where `faces`
    gives a detected face for an image, the model's input is cut around it by `framing` (align.py)."""

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        image_size: int,
        faces: Sequence[Face | None] | None = None,
        framing: FaceFraming | None = None,
    ) -> None:
        self.root, self.paths, self.image_size = Path(root), list(paths), image_size
        self.faces = list(faces) if faces is not None else [None] * len(self.paths)
        if framing is None and any(face is not None for face in self.faces):
            raise ValueError("FileImages needs a framing to crop the detected faces")
        self.framing = framing

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def load(self, index: int) -> torch.Tensor:
        image, face = load_rgb(self.name(index)), self.faces[index]
        if face is None:
            return to_input_tensor(image, self.image_size)
        pixels, _ = self.framing.crop(image, face, self.image_size)
        return pixels_to_input(pixels)


class AgeDataset(Dataset):
    """`(image, age)` pairs: image uint8 (3, S, S), age float32 in years.

    With `skip_bad_images`, an unreadable image yields None (dropped by `collate_batch` and
    counted) instead of stopping the run with an `ImageReadError` that names the file.
    """

    def __init__(
        self,
        images: ImageSource,
        ages: Sequence[float],
        *,
        transform: v2.Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if len(images) != len(ages):
            raise ValueError(f"{len(images)} images but {len(ages)} ages")
        self.images = images
        self.ages = torch.as_tensor(np.asarray(ages, dtype=np.float32))
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image = self.images.load(index)
        except ImageReadError as err:
            if not self.skip_bad_images:
                raise ImageReadError(f"{err} (pass --skip-bad-images to skip such files)") from err
            log.warning("skipping %s", err)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.ages[index]

    @property
    def reads_batches(self) -> bool:
        """Whether whole batches come from memory in one read (a prepared cache, no augmentation)."""
        return self.transform is None and hasattr(self.images, "load_many")

    def __getitems__(self, indices: list[int]) -> Batch | list[tuple[torch.Tensor, torch.Tensor] | None]:
        """A whole batch at once (the DataLoader calls this instead of `__getitem__` per sample):
        from a cache without augmentation, one read of all the images, already collated."""
        if self.reads_batches:
            images = self.images.load_many(indices)
            if images is not None:
                return Batch(images, self.ages[indices], torch.ones(len(indices), dtype=torch.bool))
        return [self[index] for index in indices]


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) uint8
    ages: torch.Tensor  # (B,) float32
    kept: torch.Tensor  # (n,) bool: which of the sampled items were readable (B = kept.sum())


def collate_batch(items: Batch | list[tuple[torch.Tensor, torch.Tensor] | None]) -> Batch:
    if isinstance(items, Batch):  # read as one batch by `AgeDataset.__getitems__`
        return items
    kept = torch.tensor([item is not None for item in items], dtype=torch.bool)
    good = [item for item in items if item is not None]
    if not good:
        return Batch(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0), kept)
    images, ages = zip(*good, strict=True)
    return Batch(torch.stack(images), torch.stack(ages), kept)


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, in order, without the padding DistributedSampler adds:
    evaluation shards cover each sample exactly once, so metrics summed over ranks are exact."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    device: torch.device,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    persistent: bool = True,
) -> DataLoader:
    """The project's DataLoader settings: pinned memory on CUDA, prefetching workers that persist
    across epochs (unless `persistent` is off, which makes augmentation reproducible per epoch).

    A dataset that `reads_batches` is read in this process: a batch is then one copy out of the page
    cache (~10x faster than shipping it from a worker process through shared memory)."""
    workers = 0 if getattr(dataset, "reads_batches", False) else max(0, num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_batch,
        pin_memory=device.type == "cuda",
        drop_last=train,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )


def build_datasets(
    frames: dict[str, pd.DataFrame],
    images_for: dict[str, ImageSource],
    *,
    image_size: int,
    augment: str = "none",
    shares: PhotoShares = DEFAULT_SHARES,
    skip_bad_images: bool = False,
) -> dict[str, AgeDataset]:
    """One dataset per split; only `train` is augmented."""
    return {
        split: AgeDataset(
            images_for[split],
            frame["age"].to_numpy(),
            transform=train_transform(augment, image_size, shares) if split == "train" else None,
            skip_bad_images=skip_bad_images,
        )
        for split, frame in frames.items()
    }


def create_dataloaders(
    frames: dict[str, pd.DataFrame],
    root: Path,
    *,
    image_size: int = 224,
    batch_size: int = 128,
    num_workers: int = 4,
    augment: str = "none",
    skip_bad_images: bool = False,
    device: torch.device | None = None,
    seed: int = 0,
) -> dict[str, DataLoader]:
    """Loaders over image files for each split in `frames` (`train` shuffled and augmented)."""
    device = device or torch.device("cpu")
    images = {split: FileImages(root, frame["path"].tolist(), image_size) for split, frame in frames.items()}
    datasets = build_datasets(
        frames, images, image_size=image_size, augment=augment, skip_bad_images=skip_bad_images
    )
    generator = torch.Generator().manual_seed(seed)
    return {
        split: make_loader(
            dataset,
            batch_size=batch_size,
            train=split == "train",
            num_workers=num_workers,
            device=device,
            generator=generator if split == "train" else None,
        )
        for split, dataset in datasets.items()
    }
