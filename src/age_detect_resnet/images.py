"""Reading any user or dataset image into an upright 8-bit RGB picture, or a clear error naming it."""

from __future__ import annotations

import functools
import io
import os
import urllib.error
import urllib.request
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
# What a Python caller may hand over as a photo (`as_rgb`): a path, an http(s) address, a PIL image, an array.
ImageInput = str | Path | Image.Image | np.ndarray
# A photo at an http(s) address: the most `as_rgb` downloads, and how long it waits for the server.
MAX_DOWNLOAD_BYTES = 50_000_000
DOWNLOAD_TIMEOUT_S = 30
# The colour orders an array may come in: RGB, or OpenCV's cv2.imread order.
CHANNEL_ORDERS = ("rgb", "bgr")
_EXIF_ORIENTATION = 0x0112
# Files `age-detect predict` treats as videos (read frame by frame with OpenCV, see video/reader.py).
# .3gp: older phones; .mts/.m2ts: camcorders (AVCHD); .ts: MPEG transport streams (broadcast recordings).
VIDEO_SUFFIXES = (
    *(".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"),
    *(".3gp", ".mts", ".m2ts", ".ts", ".flv", ".ogv"),
)


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
        raise ImageTooLargeError(  # PIL's message names its own, higher limit: not repeated here
            f"{label} is over the {max_pixels // 1_000_000} MP limit; downscale it before use"
        ) from err
    except Exception as err:
        # PIL's decoders raise many types on hostile bytes (NotImplementedError, OverflowError, ...).
        raise ImageReadError(f"{label} is truncated or corrupt ({err}); re-download or remove it") from err


def _grey_to_8_bit(array: np.ndarray, mode: str) -> np.ndarray:
    """PIL's wide grey modes to 0-255. 16-bit grey (PIL reads some as 32-bit "I"): 0-65535 to 0-255, as
    PIL does for 16-bit colour, so that a dark photo stays as dark as its 8-bit copy; beyond 16 bits, by
    its own peak. An "I" or "F" image within 0-255 (`convert("I")` of an 8-bit one) is kept as it is, and
    an "F" image within 0-1 is taken as 0-1 brightness: scaled as 16-bit, both came out black."""
    array = np.nan_to_num(array, posinf=0.0, neginf=0.0)
    peak = float(array.max()) if array.size else 0.0
    if mode == "F" and peak <= 1.0:
        scale = 255.0
    elif mode in ("I", "F") and peak <= 255:
        scale = 1.0
    else:
        scale = 255.0 / max(65535.0, peak)
    return np.round(np.clip(array * scale, 0, 255)).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_grey_to_8_bit(np.asarray(image, dtype=np.float64), image.mode), mode="L")
    if image.mode in ("P", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha, as RGBa
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image


def download(url: str) -> bytes:
    """The bytes at an http(s) address, or an ImageReadError that names it and says what to do."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ImageReadError(
            f"could not download {url} ({err}); check the address and the network, or save the photo "
            "and pass its file"
        ) from err
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageReadError(f"{url} is larger than {MAX_DOWNLOAD_BYTES // 1_000_000} MB; not a photo")
    return data


def as_rgb(image: ImageInput | bytes, channels: str = "rgb") -> Image.Image:
    """An upright RGB PIL image from any photo a Python caller holds: a path (or its bytes), an http(s)
    address (downloaded), a PIL image (EXIF rotation applied, as a path's file gets it) or a uint8 array,
    (H, W) or (H, W, 1) grey, (H, W, 3) colour or (H, W, 4) colour with alpha (composited onto white, as
    `load_rgb` does for files), its colours in `channels` order. Anything else is a TypeError or
    ValueError that says what is taken."""
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be 'rgb' or 'bgr' (OpenCV's cv2.imread order), not {channels!r}")
    if isinstance(image, Image.Image):
        if image.mode == "RGB" and image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image  # already what the model reads (every photo the commands decode): no copy
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
        return load_rgb(download(image), name=image)
    if not isinstance(image, np.ndarray):
        if image is None:
            raise TypeError(
                "image is None: cv2.imread returns None for a file it cannot read; check the path, or pass "
                "the path itself for an error that says what is wrong with the file"
            )
        if not isinstance(image, str | bytes | os.PathLike):
            raise TypeError(
                "image must be a path, an http(s) address, a PIL image or a uint8 array, not "
                f"{type(image).__name__}"
            )
        return load_rgb(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        hint = (
            "; a float image in 0-1: (image * 255).round().astype(np.uint8), in 0-255: "
            "image.round().astype(np.uint8)"
            if image.dtype.kind == "f"
            else ""
        )
        raise ValueError(
            "an array image must be uint8 RGB (H, W, 3), or grey (H, W), or with alpha (H, W, 4), got "
            f"{image.dtype} {image.shape}{hint}"
        )
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"the array is {image.shape[1]}x{image.shape[0]} pixels, over the "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP limit; downscale it first"
        )
    if image.ndim == 2 or image.shape[2] == 1:
        return Image.fromarray(image.reshape(image.shape[:2])).convert("RGB")
    if channels == "bgr":
        image = np.concatenate([image[..., 2::-1], image[..., 3:]], axis=2)
    return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
