"""One call for the common job: the faces in a photo with their ages (in the spirit of DeepFace.analyze).

    from age_detect_resnet import analyze
    analyze("family.jpg")
    # [{'face_index': 0, 'box': [412, 180, 590, 402], 'detector_score': 0.93, 'age': 34.2,
    #   'age_interval': [29.8, 39.1]}, ...]

The bundled model and face detector are used unless others are given; they are loaded on the first call
and kept for the next ones.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, load_predictor
from age_detect_resnet.runtime import select_device

ImageInput = str | Path | Image.Image | np.ndarray


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


def _as_image(image: ImageInput, channels: str = "rgb") -> Image.Image:
    """A PIL RGB image from a path, a PIL image or a uint8 array: (H, W) or (H, W, 1) grey, (H, W, 3)
    colour or (H, W, 4) colour with alpha (dropped), its colours in `channels` order."""
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be 'rgb' or 'bgr' (OpenCV's cv2.imread order), not {channels!r}")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        return load_rgb(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ValueError(
            "an array image must be uint8 RGB (H, W, 3), or grey (H, W), or with alpha (H, W, 4), got "
            f"{image.dtype} {image.shape}; a float image in 0-1: (image * 255).round().astype(np.uint8)"
        )
    if image.ndim == 2 or image.shape[2] == 1:
        return Image.fromarray(image.reshape(image.shape[:2])).convert("RGB")
    colour = image[..., :3]
    return Image.fromarray(np.ascontiguousarray(colour[..., ::-1] if channels == "bgr" else colour))


def analyze(
    image: ImageInput,
    *,
    model: str | Path = "default",
    device: str = "auto",
    detector: str = "auto",
    detector_model: str | Path | None = None,
    tta: bool = False,
    backend: str = "torch",
    channels: str = "rgb",
) -> list[dict[str, Any]]:
    """Every face in `image` (a path, PIL image or uint8 array) with its box, detector score, age,
    for models that give one its 80% age interval, and where the detector gives them its five landmarks
    (eyes, nose tip, mouth corners; the person's own right and left); largest-score face first. An empty
    list when no face is found; `detector="none"` treats the whole image as one face crop.
    `backend="onnx"` runs an exported model, or the bundled one's export (made once, `predict --backend
    onnx`), on ONNX Runtime. An array is read as RGB; pass `channels="bgr"` for OpenCV's `cv2.imread`
    order, as deepface and InsightFace take it (colours read in the wrong order change the age by
    years); a PIL image is always RGB."""
    image = _as_image(image, channels)
    predictor = _predictor(
        str(model), device, detector, str(detector_model) if detector_model else None, bool(tta), backend
    )
    faces = []
    for face in predictor.predict_image(image):
        faces.append(
            {
                "face_index": face.face_index,
                "box": list(face.box),
                "detector_score": face.detector_score,
                "age": round(face.age, 2),
                "age_interval": [round(v, 2) for v in face.interval] if face.interval else None,
                "landmarks": face.named_landmarks(),
            }
        )
    return faces
