"""The run's data loaders: per split, the images (files, or views into the prepared cache) as batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from age_detect_resnet.data.balance import WeightedEpochSampler, balancing_weights
from age_detect_resnet.data.cache import CacheAlignment, prepare_cache
from age_detect_resnet.data.dataset import FileImages, ImageSource, ShardSampler, build_datasets, make_loader
from age_detect_resnet.data.photo_shares import PhotoShares
from age_detect_resnet.data.sources import with_columns
from age_detect_resnet.data.splits import PreparedData
from age_detect_resnet.faces.align import Aligner
from age_detect_resnet.training.config import Config, ConfigError
from age_detect_resnet.training.distributed import Distributed

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The training loader's sampler where it has one, whose epoch is set before each epoch.
EpochSampler = DistributedSampler | WeightedEpochSampler


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


def balanced_sampler(
    prepared: PreparedData, config: Config, dist: Distributed
) -> WeightedEpochSampler | None:
    """With --balance-by COLUMN, the sampler that gives each of the column's values the training
    split's age distribution (data/balance.py); None without it."""
    column = config.data.balance_by
    if not column:
        return None
    data = config.data
    train = with_columns(
        prepared.split("train"), [column], data.dataset, data.data_root, data.meta, option="--balance-by"
    )
    weights = balancing_weights(train["age"].to_numpy(), train[column].to_numpy())
    log.info(
        "--balance-by %s: training faces drawn with weights %.2f to %.2f (%d values)",
        column,
        weights.min(),
        weights.max(),
        train[column].nunique(dropna=False),
    )
    return WeightedEpochSampler(weights, seed=config.train.seed, rank=dist.rank, world=dist.world)


def build_loaders(
    prepared: PreparedData, config: Config, dist: Distributed
) -> tuple[dict[str, DataLoader], EpochSampler | None]:
    """Train (shuffled, sharded across processes), val (sharded) and test (rank 0) loaders, and the
    training sampler to set the epoch on (under DDP, or drawing the faces by --balance-by)."""
    data, train = config.data, config.train
    balanced = balanced_sampler(prepared, config, dist)
    datasets = build_datasets(
        {s: prepared.split(s) for s in SPLITS},
        image_sources(prepared, config, dist),
        image_size=data.image_size,
        augment=data.augment,
        shares=PhotoShares.of(data),
        skip_bad_images=data.skip_bad_images,
    )
    per_process = max(1, train.batch_size // dist.world)
    train_sampler: EpochSampler | None = balanced
    if balanced is None and dist.enabled:
        train_sampler = DistributedSampler(
            datasets["train"], num_replicas=dist.world, rank=dist.rank, seed=train.seed, drop_last=True
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
