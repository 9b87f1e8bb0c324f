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

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import CHANNEL_ORDERS, ImageInput, as_rgb
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction, load_predictor
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.runtime import DeviceError, select_device

# Photos decoded and run through the model together when `analyze` is given a list.
PHOTOS_PER_BATCH = 16


def _new_predictor(
    model: str | AgeModel,
    device: torch.device,
    detector: str,
    detector_model: str | None,
    tta: bool,
    backend: str,
) -> AgePredictor:
    return load_predictor(
        model,
        backend=backend,
        device=device,
        detector=None if detector == "none" else create_detector(detector, detector_model),
        tta_flip=tta,
    )


# The predictors of the last few settings, kept for the next calls. Not for a model object: it may be
# trained further between calls, and a kept predictor would go on with a copy of its old weights.
_predictor = lru_cache(maxsize=4)(_new_predictor)


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
    model: str | Path | AgeModel = "default",
    device: str | torch.device | None = "auto",
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

    `model`: `default` (the bundled model), a run folder, a .safetensors file, a loaded model
    (`load_trained_model`), or with `backend="onnx"` an exported file; `device`: `auto`, `cpu`, `cuda`
    or a `torch.device`. `backend="onnx"` runs an exported model, or the bundled one's export (made once,
    `predict --backend onnx`), on ONNX Runtime, on the CPU."""
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be 'rgb' or 'bgr' (OpenCV's cv2.imread order), not {channels!r}")
    if backend == "torch":
        torch_device = select_device(device)
    elif device in (None, "auto", "cpu") or device == torch.device("cpu"):
        torch_device = torch.device("cpu")
    else:
        raise DeviceError(
            f"backend={backend!r} runs on the CPU here; leave device out, or use backend='torch'"
        )
    settings = (torch_device, detector, str(detector_model) if detector_model else None, bool(tta), backend)
    if isinstance(model, AgeModel):
        predictor = _new_predictor(model, *settings)
    else:
        predictor = _predictor(str(model), *settings)
    if not isinstance(image, list | tuple):
        return [_face_dict(face) for face in predictor.predict_image(as_rgb(image, channels))]
    results = []
    for start in range(0, len(image), PHOTOS_PER_BATCH):
        photos = [as_rgb(item, channels) for item in image[start : start + PHOTOS_PER_BATCH]]
        results += [[_face_dict(face) for face in faces] for faces in predictor.predict_images(photos)]
    return results
