"""One call for the common job: the faces in a photo with their ages (in the spirit of DeepFace.analyze).

    from age_detect_resnet import analyze
    analyze("family.jpg")
    # [{'face_index': 0, 'box': [412, 180, 590, 402], 'detector_score': 0.93, 'age': 34.2,
    #   'age_interval': [29.8, 39.1], 'landmarks': {...}}, ...]
    analyze(["a.jpg", "b.jpg", cv2.imread("c.jpg")], channels="bgr")  # one list of faces per photo

The bundled model and face detector are used unless others are given; they are loaded on the first call
and kept for the next ones.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import MAX_IMAGE_PIXELS, ImageReadError, ImageTooLargeError, load_rgb, to_rgb
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction, load_predictor
from age_detect_resnet.runtime import select_device

ImageInput = str | Path | Image.Image | np.ndarray
# Photos decoded and run through the model together when `analyze` is given a list.
PHOTOS_PER_BATCH = 16
# A photo at an http(s) address: the most `analyze` downloads, and how long it waits for the server.
MAX_DOWNLOAD_BYTES = 50_000_000
DOWNLOAD_TIMEOUT_S = 30


@lru_cache(maxsize=4)
def _predictor(
    model: str, device: str, detector: str, detector_model: str | None, tta: bool, backend: str
) -> AgePredictor:
    return load_predictor(
        model,
        backend=backend,
        device=select_device(device) if backend == "torch" else "cpu",
        detector=None if detector == "none" else create_detector(detector, detector_model),
        tta_flip=tta,
    )


CHANNEL_ORDERS = ("rgb", "bgr")


def _download(url: str) -> bytes:
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


def _as_image(image: ImageInput, channels: str = "rgb") -> Image.Image:
    """A PIL RGB image from a path, an http(s) address, a PIL image or a uint8 array: (H, W) or (H, W, 1)
    grey, (H, W, 3) colour or (H, W, 4) colour with alpha (composited onto white, as `load_rgb` does for
    files), its colours in `channels` order."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))  # upright, as a file's path gives it
    if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
        return load_rgb(_download(image), name=image)
    if not isinstance(image, np.ndarray):
        if not isinstance(image, str | bytes | os.PathLike):
            raise TypeError(
                "image must be a path, an http(s) address, a PIL image or a uint8 array, not "
                f"{type(image).__name__}"
            )
        return load_rgb(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ValueError(
            "an array image must be uint8 RGB (H, W, 3), or grey (H, W), or with alpha (H, W, 4), got "
            f"{image.dtype} {image.shape}; a float image in 0-1: (image * 255).round().astype(np.uint8)"
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


def _face_dict(face: FacePrediction) -> dict[str, Any]:
    return {
        "face_index": face.face_index,
        "box": list(face.box),
        "detector_score": face.detector_score,
        "age": round(face.age, 2),
        "age_interval": [round(v, 2) for v in face.interval] if face.interval else None,
        "landmarks": face.named_landmarks(),
    }


def analyze(
    image: ImageInput | Sequence[ImageInput],
    *,
    model: str | Path = "default",
    device: str = "auto",
    detector: str = "auto",
    detector_model: str | Path | None = None,
    tta: bool = False,
    backend: str = "torch",
    channels: str = "rgb",
) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
    """Every face in `image` with its box, detector score, age, for models that give one its 80% age
    interval, and where the detector gives them its five landmarks (eyes, nose tip, mouth corners; the
    person's own right and left); largest-score face first. An empty list when no face is found;
    `detector="none"` treats the whole image as one face crop.

    `image`: a path, an http(s) address (downloaded), a PIL image or a uint8 array. An array is read as
    RGB; pass `channels="bgr"` for OpenCV's `cv2.imread` order, as deepface and InsightFace take it
    (colours read in the wrong order change the age by years); a PIL image is always RGB. A list (or
    tuple) of those gives one list of faces per photo, the photos' faces sharing model batches.

    `backend="onnx"` runs an exported model, or the bundled one's export (made once, `predict --backend
    onnx`), on ONNX Runtime."""
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be 'rgb' or 'bgr' (OpenCV's cv2.imread order), not {channels!r}")
    predictor = _predictor(
        str(model), device, detector, str(detector_model) if detector_model else None, bool(tta), backend
    )
    if not isinstance(image, list | tuple):
        return [_face_dict(face) for face in predictor.predict_image(_as_image(image, channels))]
    results = []
    for start in range(0, len(image), PHOTOS_PER_BATCH):
        photos = [_as_image(item, channels) for item in image[start : start + PHOTOS_PER_BATCH]]
        results += [[_face_dict(face) for face in faces] for faces in predictor.predict_images(photos)]
    return results
