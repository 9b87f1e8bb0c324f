"""Reading any user or dataset image into an upright 8-bit RGB picture, or a clear error naming it."""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from age_detect_resnet.extras import install_command

# 50 megapixels (e.g. 8660x5770) covers every camera photo; larger files are almost always broken or
# hostile (decompression bombs) and would need gigabytes of memory to decode.
MAX_IMAGE_PIXELS = 50_000_000
# HEIC/HEIF, iPhones' default photo format: read where the optional pillow-heif is installed
# (`pip install 'age-detect-resnet[heic]'`, `heif_support`).
HEIF_SUFFIXES = (".heic", ".heif")
# The one list of photo files every command looks for in a folder (datasets, predict, export checks):
# everything PIL reads that cameras, phones and scanners write.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", *HEIF_SUFFIXES)
# The brands of an ISO media file's `ftyp` box (bytes 8-12) that mark a HEIF still image.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
# Files `age-detect predict` treats as videos (read frame by frame with OpenCV, see video/reader.py).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv")


@functools.cache
def heif_support() -> bool:
    """Whether HEIC/HEIF photos can be read: the optional pillow-heif, where installed, is registered
    with PIL once."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _is_heif(source: Path | str | bytes) -> bool:
    """Whether the file (or its bytes) starts as a HEIF still image does."""
    if isinstance(source, bytes):
        head = source[:12]
    else:
        with Path(source).open("rb") as file:
            head = file.read(12)
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


class ImageReadError(ValueError):
    """An image that cannot be used; the message names it and says what to do."""


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than the decoder is allowed to allocate."""


def load_rgb(
    source: Path | str | bytes, *, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode `source` (a path or the file's bytes) to an upright RGB image.

    EXIF rotation is applied, transparency is composited onto white, and greyscale, palette, CMYK
    and 16-bit images are converted, so every caller sees the same kind of picture.
    """
    if not isinstance(source, str | bytes | os.PathLike):
        raise TypeError(
            f"expected an image file's path or its bytes, got {type(source).__name__} "
            "(age_detect_resnet.analyze also takes PIL images and arrays)"
        )
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    heif_support()
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageReadError(f"{label} is empty (0 bytes)")
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageReadError(f"{label} does not exist or is not a file")
            if path.stat().st_size == 0:
                raise ImageReadError(f"{label} is empty (0 bytes); re-download or remove it")
            image = Image.open(path)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{label} is {width}x{height} pixels, over the {max_pixels // 1_000_000} MP limit; "
                "downscale it before predicting"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        if _is_heif(source) and not heif_support():
            raise ImageReadError(
                f"{label} is a HEIC/HEIF photo (iPhones' default format), which needs pillow-heif: "
                f"{install_command('heic')} (or pillow-heif), or convert it to JPEG"
            ) from err
        raise ImageReadError(f"{label} is not an image file PIL can read (JPEG, PNG, WebP, ...)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses huge headers itself in Image.open, before our own size check can run.
        raise ImageTooLargeError(
            f"{label} is over the {max_pixels // 1_000_000} MP limit ({err}); downscale it before use"
        ) from err
    except Exception as err:
        # PIL's decoders raise many types on hostile bytes (NotImplementedError, OverflowError, ...).
        raise ImageReadError(f"{label} is truncated or corrupt ({err}); re-download or remove it") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PIL reads some as 32-bit "I"): 0-65535 to 0-255, as PIL does for 16-bit colour, so
        # a dark photo stays as dark as its 8-bit copy; a 32-bit image beyond 16 bits by its own peak
        array = np.asarray(image, dtype=np.float64)
        peak = max(65535.0, array.max()) if array.size else 65535.0
        image = Image.fromarray(np.round(np.clip(array, 0, None) * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image
