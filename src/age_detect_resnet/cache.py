"""Prepared-image cache: every image decoded and resized once into a memory-mapped uint8 array.

Epochs then read (S, S, 3) bytes instead of decoding JPEGs: data loading stops being a cost.
A cache lives in `<cache_dir>/<key>/` where the key hashes the image list (path, size, mtime), the
image size and the cache format, so changing any input builds a new cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.dataset import to_input_tensor
from age_detect_resnet.images import ImageReadError, load_rgb

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_CHUNK = 256


def cache_key(root: Path, paths: Sequence[str], image_size: int) -> str:
    digest = hashlib.sha1(f"format={CACHE_FORMAT};size={image_size};root={Path(root).resolve()}".encode())
    for rel in paths:
        path = Path(root) / rel
        try:
            stat = path.stat()
            digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}|missing\n".encode())
    return digest.hexdigest()[:20]


class CachedImages:
    """Images of a prepared cache, addressed by the row order they were prepared in.

    The memory map opens lazily in each process, so DataLoader workers share the page cache
    instead of receiving a pickled copy of the whole array.
    """

    def __init__(self, folder: Path, rows: Sequence[int] | None = None) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        self.image_size: int = index["image_size"]
        self.paths: list[str] = index["paths"]
        self.errors: dict[str, str] = index["errors"]  # row -> message, for images that failed to decode
        self.rows = list(range(len(self.paths))) if rows is None else list(rows)
        self._array: np.ndarray | None = None

    def subset(self, rows: Sequence[int]) -> CachedImages:
        view = CachedImages.__new__(CachedImages)
        view.__dict__.update(self.__dict__, rows=[self.rows[r] for r in rows], _array=None)
        return view

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return self.paths[self.rows[index]]

    def _map(self) -> np.ndarray:
        if self._array is None:
            size = self.image_size
            self._array = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r").reshape(
                -1, size, size, 3
            )
        return self._array

    def load(self, index: int) -> torch.Tensor:
        row = self.rows[index]
        error = self.errors.get(str(row))
        if error is not None:
            raise ImageReadError(error)
        # (S, S, 3) -> (3, S, S); the copy detaches the sample from the map.
        return torch.from_numpy(np.array(self._map()[row])).permute(2, 0, 1)

    def load_many(self, indices: Sequence[int]) -> torch.Tensor | None:
        """Images `indices` as one uint8 (n, 3, S, S) tensor read in a single pass over the map, or
        None when one of them failed to decode (the caller then loads them one by one)."""
        rows = np.fromiter((self.rows[i] for i in indices), dtype=np.int64, count=len(indices))
        if self.errors and any(str(row) in self.errors for row in rows.tolist()):
            return None
        return torch.from_numpy(self._map()[rows]).permute(0, 3, 1, 2)


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    path, size = job
    try:
        return to_input_tensor(load_rgb(path), size).permute(1, 2, 0).numpy()
    except ImageReadError as err:
        return str(err)


def prepare_cache(
    root: Path, paths: Sequence[str], *, image_size: int, cache_dir: Path, workers: int = 2
) -> CachedImages:
    """Build (or reuse) the cache of `paths` under `root` at `image_size`; unreadable images are
    recorded, not fatal (the dataset raises or skips them as configured)."""
    if not paths:
        raise ValueError("no images to prepare")
    folder = Path(cache_dir) / cache_key(root, paths, image_size)
    if (folder / "index.json").is_file():
        log.info("using the prepared image cache %s", folder)
        return CachedImages(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, errors = len(paths), {}
    jobs = [(str(Path(root) / p), image_size) for p in paths]
    with atomic_path(folder / "images.u8") as tmp:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, image_size, image_size, 3))
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(_decode, jobs, chunksize=_CHUNK)
            for row, result in enumerate(
                tqdm(results, total=n, desc="preparing image cache", unit="img", disable=None)
            ):
                if isinstance(result, str):
                    errors[str(row)] = result
                else:
                    array[row] = result
        array.flush()
        del array
    write_text_atomic(
        folder / "index.json",
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "image_size": image_size,
                "root": str(root),
                "paths": list(paths),
                "errors": errors,
            }
        ),
    )
    if errors:
        log.warning("%d of %d images could not be decoded while preparing the cache", len(errors), n)
    return CachedImages(folder)
