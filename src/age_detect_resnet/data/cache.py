"""Prepared-image cache: every image decoded and resized once into a memory-mapped uint8 array.

Epochs then read (S, S, 3) bytes instead of decoding JPEGs: data loading stops being a cost.
A cache lives in `<cache_dir>/<key>/` where the key hashes the image list (path, size, mtime), the
image size, the alignment and the cache format, so changing any input builds a new cache instead of
reusing a stale one.

With an `CacheAlignment`, each image goes through the face detector and the aligner (align.py) exactly
as photos do at inference, and is stored with a border of context around the aligned crop (for
augmentation; `CachedImages.centre` reads the aligned crop alone). An image where no face is found is
aligned with the median landmarks of the images where one was (the dataset's typical face position) and
counted in the cache's index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from age_detect_resnet.atomic import write_text_atomic
from age_detect_resnet.data.dataset import to_input_tensor
from age_detect_resnet.data.sources import DataError
from age_detect_resnet.faces import detection as faces
from age_detect_resnet.faces.align import Aligner
from age_detect_resnet.faces.detection import LANDMARK_METHOD, largest_face
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.progress import progress

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
_CHUNK = 256


@dataclass(frozen=True)
class CacheAlignment:
    """How to frame training images like photos at inference: detector + aligner, plus a border."""

    aligner: Aligner
    detector_model: str | None = None  # YuNet file (None: $AGE_DETECT_YUNET_MODEL or the cached download)
    context: float = 1.25  # stored side / model input side

    def key(self) -> str:
        described = {
            "alignment": self.aligner.to_metadata(),
            "context": self.context,
            "landmarks": LANDMARK_METHOD,
        }
        return json.dumps(described, sort_keys=True)


def cache_key(
    root: Path, paths: Sequence[str], image_size: int, framing: CacheAlignment | None = None
) -> str:
    described = framing.key() if framing is not None else "resize"
    digest = hashlib.sha1(
        f"format={CACHE_FORMAT};size={image_size};framing={described};root={Path(root).resolve()}".encode()
    )
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
        self.stored_size: int = index["stored_size"]
        self.image_size: int = self.stored_size  # the side that `load` returns (see `centre`)
        self.paths: list[str] = index["paths"]
        self.errors: dict[str, str] = index["errors"]  # row -> message, for images that failed to decode
        self.alignment: dict | None = index.get("alignment")  # faces found / aligned by fallback
        self.rows = list(range(len(self.paths))) if rows is None else list(rows)
        self._array: np.ndarray | None = None

    def subset(self, rows: Sequence[int]) -> CachedImages:
        view = CachedImages.__new__(CachedImages)
        view.__dict__.update(self.__dict__, rows=[self.rows[r] for r in rows], _array=None)
        return view

    def centre(self, size: int) -> CachedImages:
        """A view that reads the centre (size, size) of each stored image: the aligned crop alone."""
        if size > self.stored_size or (self.stored_size - size) % 2:
            raise ValueError(f"cannot take a centred {size} px crop of {self.stored_size} px images")
        view = self.subset(range(len(self)))
        view.image_size = size
        return view

    def _window(self) -> slice:
        border = (self.stored_size - self.image_size) // 2
        return slice(border, border + self.image_size)

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return self.paths[self.rows[index]]

    def _map(self) -> np.ndarray:
        if self._array is None:
            size = self.stored_size
            self._array = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r").reshape(
                -1, size, size, 3
            )
        return self._array

    def load(self, index: int) -> torch.Tensor:
        row = self.rows[index]
        error = self.errors.get(str(row))
        if error is not None:
            raise ImageReadError(error)
        window = self._window()
        # (S, S, 3) -> (3, S, S); the copy detaches the sample from the map.
        return torch.from_numpy(np.array(self._map()[row, window, window])).permute(2, 0, 1)

    def load_many(self, indices: Sequence[int]) -> torch.Tensor | None:
        """Images `indices` as one uint8 (n, 3, S, S) tensor read in a single pass over the map, or
        None when one of them failed to decode (the caller then loads them one by one)."""
        rows = np.fromiter((self.rows[i] for i in indices), dtype=np.int64, count=len(indices))
        if self.errors and any(str(row) in self.errors for row in rows.tolist()):
            return None
        images = self._map()[rows]
        if self.image_size != self.stored_size:
            window = self._window()
            images = np.ascontiguousarray(images[:, window, window])
        return torch.from_numpy(images).permute(0, 3, 1, 2)


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    path, size = job
    try:
        return to_input_tensor(load_rgb(path), size).permute(1, 2, 0).numpy()
    except ImageReadError as err:
        return str(err)


_worker: tuple[faces.FaceDetector, CacheAlignment] | None = None


def _init_aligning_worker(framing: CacheAlignment) -> None:
    global _worker
    _worker = (faces.create_detector("yunet", framing.detector_model), framing)


def _align(job: tuple[str, int, list | None]) -> tuple[np.ndarray | str | None, list | None]:
    """(aligned image, normalised landmarks) of one file; (None, None) when no face is found and no
    fallback landmarks are given; (message, None) when the file cannot be decoded."""
    path, size, fallback = job
    detector, framing = _worker
    try:
        image = load_rgb(path)
    except ImageReadError as err:
        return str(err), None
    width, height = image.size
    if fallback is not None:
        points = np.asarray(fallback) * (width, height)
        return framing.aligner.warp(image, points, size, context=framing.context), None
    # A training image is a face crop, which its own face fills: the largest is that face. (Photos are
    # judged by `subject_face`; the cache keeps this rule so that prepared caches stay valid.)
    face = largest_face([f for f in detector.detect(image) if f.landmarks is not None])
    if face is None:
        return None, None
    points = np.asarray(face.landmarks)
    normalised = (points / (width, height)).tolist()
    return framing.aligner.warp(image, points, size, context=framing.context), normalised


# Images prepared between two saves of an unfinished cache's progress: a preparation stopped part way
# (Ctrl-C, a crash, the end of a session) goes on from its last save when the same cache is asked for.
SAVE_EVERY = 4096


class _PartialCache:
    """A cache being prepared: its images (and, when aligning, each image's landmarks, NaN where no face
    was found) in memory maps beside `progress.json`, which says how many rows are done and which failed.
    `finish` turns it into the cache's `images.u8` and `index.json`."""

    def __init__(self, folder: Path, n: int, stored: int, *, aligned: bool) -> None:
        self.folder, self.n, self.stored = folder, n, stored
        self.progress_file = folder / "progress.json"
        images, landmarks = folder / "images.u8.partial", folder / "landmarks.f64.partial"
        self.done, self.errors = 0, {}
        shape = (n, stored, stored, 3)
        saved = self._saved()
        resume = (
            saved is not None
            and saved.get("n") == n
            and saved.get("stored") == stored
            and images.is_file()
            and images.stat().st_size == int(np.prod(shape))
            and (not aligned or (landmarks.is_file() and landmarks.stat().st_size == n * 10 * 8))
        )
        if resume:
            self.done, self.errors = int(saved["done"]), dict(saved["errors"])
        mode = "r+" if resume else "w+"
        self.images = np.memmap(images, dtype=np.uint8, mode=mode, shape=shape)
        self.landmarks = None
        if aligned:
            self.landmarks = np.memmap(landmarks, dtype=np.float64, mode=mode, shape=(n, 5, 2))
            if not resume:
                self.landmarks[:] = np.nan

    def _saved(self) -> dict | None:
        try:
            return json.loads(self.progress_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, done: int) -> None:
        self.images.flush()
        if self.landmarks is not None:
            self.landmarks.flush()
        self.done = done
        progress_json = {"n": self.n, "stored": self.stored, "done": done, "errors": self.errors}
        write_text_atomic(self.progress_file, json.dumps(progress_json))

    def fill(
        self,
        files: Sequence[str],
        run: Callable[[Sequence[str]], Iterable[Any]],
        desc: str,
        keep: Callable[[int, Any], None],
    ) -> None:
        """`keep(row, result)` for each file from the first row not yet done, `run` mapping a block of
        files to their results; the progress is saved after each block."""
        if self.done:
            log.info(
                "going on with the image cache %s from image %d of %d", self.folder, self.done + 1, self.n
            )
        results = (
            (start + offset, result)
            for start in range(self.done, self.n, SAVE_EVERY)
            for offset, result in enumerate(self._block(run, files, start))
        )
        for row, result in progress(results, total=self.n - self.done, desc=desc, unit="img"):
            keep(row, result)

    def _block(
        self, run: Callable[[Sequence[str]], Iterable[Any]], files: Sequence[str], start: int
    ) -> Iterator[Any]:
        """The results of one block of files, the progress saved once they are all kept."""
        end = min(start + SAVE_EVERY, self.n)
        yield from run(files[start:end])
        # Reached when the consumer asks for the next block, i.e. after it kept this block's last row.
        self.save(end)

    def finish(self, index: dict) -> None:
        self.images.flush()
        del self.images
        (self.folder / "images.u8.partial").replace(self.folder / "images.u8")
        write_text_atomic(self.folder / "index.json", json.dumps(index))
        self.progress_file.unlink(missing_ok=True)
        self.landmarks = None
        (self.folder / "landmarks.f64.partial").unlink(missing_ok=True)


def prepare_cache(
    root: Path,
    paths: Sequence[str],
    *,
    image_size: int,
    cache_dir: Path,
    workers: int = 2,
    framing: CacheAlignment | None = None,
) -> CachedImages:
    """Build (or reuse) the cache of `paths` under `root` at `image_size`; unreadable images are
    recorded, not fatal (the dataset raises or skips them as configured). With `framing`, faces are
    detected and aligned, and the stored images carry its context border (see the module docstring).
    A preparation that was stopped goes on from its last saved block (`SAVE_EVERY`)."""
    if not paths:
        raise ValueError("no images to prepare")
    folder = Path(cache_dir) / cache_key(root, paths, image_size, framing)
    if (folder / "index.json").is_file():
        log.info("using the prepared image cache %s", folder)
        return CachedImages(folder)
    if framing is not None:
        faces.create_detector("yunet", framing.detector_model)  # fail here with the detector's message
    folder.mkdir(parents=True, exist_ok=True)
    with _preparing(folder):
        if (folder / "index.json").is_file():  # another process prepared it while this one waited
            log.info("using the prepared image cache %s", folder)
            return CachedImages(folder)
        return _prepare(folder, root, paths, image_size, workers, framing)


@contextlib.contextmanager
def _preparing(folder: Path) -> Iterator[None]:
    """One process at a time prepares a cache (runs of a sweep started together share it): the others
    wait, then find it ready. Where the OS has no file locks (fcntl), no waiting."""
    lock = folder / "prepare.lock"
    with lock.open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if (folder / "index.json").is_file():
                lock.unlink(missing_ok=True)  # later processes find index.json before they lock


def _prepare(
    folder: Path,
    root: Path,
    paths: Sequence[str],
    image_size: int,
    workers: int,
    framing: CacheAlignment | None,
) -> CachedImages:
    stored = framing.aligner.output_size(image_size, framing.context) if framing else image_size
    files = [str(Path(root) / p) for p in paths]
    partial = _PartialCache(folder, len(files), stored, aligned=framing is not None)
    alignment = None
    if framing is None:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:

            def keep(row: int, result: np.ndarray | str) -> None:
                if isinstance(result, str):
                    partial.errors[str(row)] = result
                else:
                    partial.images[row] = result

            partial.fill(
                files,
                lambda block: pool.map(_decode, [(f, image_size) for f in block], chunksize=_CHUNK),
                "preparing image cache",
                keep,
            )
    else:
        alignment = _prepare_aligned(partial, files, image_size, framing, workers)
    index = {
        "format": CACHE_FORMAT,
        "image_size": image_size,
        "stored_size": stored,
        "root": str(root),
        "paths": list(paths),
        "errors": partial.errors,
        "alignment": alignment,
    }
    partial.finish(index)
    if partial.errors:
        log.warning(
            "%d of %d images could not be decoded while preparing the cache", len(partial.errors), len(files)
        )
    return CachedImages(folder)


def _prepare_aligned(
    partial: _PartialCache, files: list[str], image_size: int, framing: CacheAlignment, workers: int
) -> dict:
    """Detect + align every file into the cache; a second pass aligns the faceless ones by the median
    landmarks. Returns the counts for the index (and the run report)."""
    landmarks = partial.landmarks

    def keep(row: int, job_result: tuple[np.ndarray | str | None, list | None]) -> None:
        result, points = job_result
        if isinstance(result, str):
            partial.errors[str(row)] = result
        elif result is not None:
            partial.images[row] = result
            landmarks[row] = points

    with ProcessPoolExecutor(
        max_workers=max(1, workers), initializer=_init_aligning_worker, initargs=(framing,)
    ) as pool:
        partial.fill(
            files,
            lambda block: pool.map(_align, [(f, image_size, None) for f in block], chunksize=32),
            "detecting and aligning faces",
            keep,
        )
        has_face = ~np.isnan(np.asarray(landmarks)).any(axis=(1, 2))
        found = np.asarray(landmarks)[has_face]
        missing = [r for r in np.flatnonzero(~has_face).tolist() if str(r) not in partial.errors]
        if missing and not len(found):
            raise DataError(
                f"no face was found in any of the {len(files)} training images (e.g. {files[0]}); "
                "train without --align, or check the images"
            )
        median = np.median(found, axis=0).tolist() if len(found) else None
        if missing:
            redo = pool.map(_align, [(files[r], image_size, median) for r in missing], chunksize=32)
            for row, (result, _) in zip(missing, redo, strict=True):
                partial.images[row] = result
    if missing:
        log.warning(
            "no face found in %d of %d training images; they are aligned with the median landmarks of the "
            "others (their usual face position)",
            len(missing),
            len(files),
        )
    return {
        "faces_found": int(has_face.sum()),
        "no_face_median_landmarks": len(missing),
        "no_face_examples": [files[r] for r in missing[:20]],
        "median_landmarks": median,
    }
