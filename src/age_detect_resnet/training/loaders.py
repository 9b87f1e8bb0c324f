"""The run's data loaders: per split, the images (files, or views into the prepared cache) as batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from age_detect_resnet.data.cache import CacheAlignment, prepare_cache
from age_detect_resnet.data.dataset import FileImages, ImageSource, ShardSampler, build_datasets, make_loader
from age_detect_resnet.data.photo_shares import PhotoShares
from age_detect_resnet.data.splits import PreparedData
from age_detect_resnet.faces.align import Aligner
from age_detect_resnet.training.config import Config, ConfigError
from age_detect_resnet.training.distributed import Distributed

SPLITS = ("train", "val", "test")


def image_sources(prepared: PreparedData, config: Config, dist: Distributed) -> dict[str, ImageSource]:
    """Per split: the files themselves, or views into the prepared cache (built once, by rank 0)."""
    data = config.data
    if not data.cache:
        return {
            s: FileImages(prepared.root, prepared.split(s)["path"].tolist(), data.image_size) for s in SPLITS
        }
    paths = prepared.table["path"].tolist()
    alignment = cache_alignment(config)
    if dist.is_main:
        prepare_cache(
            prepared.root,
            paths,
            image_size=data.image_size,
            cache_dir=Path(data.cache_dir),
            workers=max(1, data.num_workers),
            framing=alignment,
        )
    dist.barrier()
    cache = prepare_cache(
        prepared.root, paths, image_size=data.image_size, cache_dir=Path(data.cache_dir), framing=alignment
    )
    views = {s: cache.subset(np.flatnonzero(prepared.table["split"].to_numpy() == s)) for s in SPLITS}
    # Only `photo` augmentation uses the context border; every other reader sees the aligned crop.
    return {
        s: view if (s == "train" and data.augment == "photo") else view.centre(data.image_size)
        for s, view in views.items()
    }


def cache_alignment(config: Config) -> CacheAlignment | None:
    """How the cache frames training faces: detector + aligner (--align), or a plain resize."""
    if not config.data.align:
        return None
    return CacheAlignment(Aligner(version=config.data.alignment), detector_model=config.data.detector_model)


def build_loaders(
    prepared: PreparedData, config: Config, dist: Distributed
) -> tuple[dict[str, DataLoader], DistributedSampler | None]:
    """Train (shuffled, sharded across processes), val (sharded) and test (rank 0) loaders, and the
    training sampler to set the epoch on under DDP."""
    data, train = config.data, config.train
    datasets = build_datasets(
        {s: prepared.split(s) for s in SPLITS},
        image_sources(prepared, config, dist),
        image_size=data.image_size,
        augment=data.augment,
        shares=PhotoShares.of(data),
        skip_bad_images=data.skip_bad_images,
    )
    per_process = max(1, train.batch_size // dist.world)
    train_sampler = (
        DistributedSampler(
            datasets["train"], num_replicas=dist.world, rank=dist.rank, seed=train.seed, drop_last=True
        )
        if dist.enabled
        else None
    )
    common = {"num_workers": data.num_workers, "device": dist.device}
    loaders = {
        "train": make_loader(
            datasets["train"],
            batch_size=per_process,
            train=True,
            sampler=train_sampler,
            generator=torch.Generator(),
            persistent=not train.deterministic,
            **common,
        ),
        "val": make_loader(
            datasets["val"],
            batch_size=per_process,
            train=False,
            sampler=ShardSampler(len(datasets["val"]), dist.rank, dist.world),
            **common,
        ),
        "test": make_loader(datasets["test"], batch_size=per_process, train=False, **common),
    }
    if len(loaders["train"]) == 0:
        raise ConfigError(
            f"the training split has {len(datasets['train'])} images, fewer than one batch of "
            f"{per_process}; lower --batch-size or use more data"
        )
    return loaders, train_sampler
