"""Using a trained model: the seed's API, a batched photo predictor with face detection, and the grid.

from age_detect_resnet.inference import load_trained_model, predict_age_for_image
model = load_trained_model("runs/utkface-resnet50-regression", "cpu")
age, image = predict_age_for_image("face.jpg", model, "cpu")      # the image is the face (no detection)

predictor = AgePredictor(model, device="cpu")                       # photos: detect, crop, predict
for face in predictor.predict("group_photo.jpg"):
    print(face.box, face.age)
"""

from __future__ import annotations

import os
import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from age_detect_resnet.data.dataset import pixels_to_input, to_input_tensor
from age_detect_resnet.evaluation.plots import plot_prediction_grid
from age_detect_resnet.faces.align import LandmarkFraming, framing_of
from age_detect_resnet.faces.detection import (
    LANDMARK_NAMES,
    DetectorUnavailableError,
    Face,
    FaceDetector,
    create_detector,
    independent_copies,
    opencv_threads,
    subject_face,
)
from age_detect_resnet.images import ImageInput, ImageReadError, as_rgb, load_rgb
from age_detect_resnet.inference.backends import AgeRunner, TorchRunner, load_runner
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.runtime import select_device


def load_trained_model(path: str | Path | None = "default", device: str | torch.device = "cpu") -> AgeModel:
    """The trained model in a run folder (or its best.safetensors; `default`: the model bundled with
    the package), in eval mode on `device` (`auto`: a GPU where there is one; a GPU asked for where there
    is none: a `DeviceError` saying so)."""
    return checkpoint.load_model(path, select_device(device))


def predict_age_for_image(
    path: str | Path, model: AgeModel, device: str | torch.device = "cpu"
) -> tuple[float, Image.Image]:
    """The seed's function: the age for an image that is already a face crop, and the image.

    A model trained on aligned faces needs the face's landmarks: the face the photo is of
    (`subject_face`) is detected and aligned, and the whole image is used where no detector or no face
    is available."""
    image = load_rgb(path)
    batch = face_crop_input(image, model.metadata).unsqueeze(0)
    age = TorchRunner(model, device, fold=False)(batch)["age"][0]  # one face: folding would cost more
    return float(age), image


def face_crop_input(image: Image.Image, metadata: dict[str, Any]) -> torch.Tensor:
    """A face crop file as the model's uint8 (3, S, S) input. For a model trained on aligned faces the
    face the photo is of (`subject_face`) is detected and aligned (its landmarks are needed); otherwise,
    and where no detector or no face is available, the whole image is resized."""
    size = image_size_of(metadata)
    framing = framing_of(metadata)
    if isinstance(framing, LandmarkFraming):
        try:
            face = subject_face(_default_detector().detect(image), image.size)
        except DetectorUnavailableError:
            face = None
        if face is not None:
            return pixels_to_input(framing.crop(image, face, size)[0])
    return to_input_tensor(image, size)


@lru_cache(maxsize=1)
def _default_detector() -> FaceDetector:
    return create_detector("auto")


@dataclass
class FacePrediction:
    """One face of a photo: where it is, how sure the detector was, and its age."""

    face_index: int
    box: tuple[int, int, int, int]  # the detected face (x1, y1, x2, y2), pixels, inside the photo
    # the region the model saw (the aligned crop's bounds, or box + training margins); it may reach past
    # the photo's edges, where the crop is filled
    crop_box: tuple[int, int, int, int]
    detector_score: float | None
    age: float
    interval: tuple[float, float] | None = None
    # the detector's five landmarks (x, y) in pixels, in LANDMARK_NAMES' order, where it gives them
    landmarks: tuple[tuple[float, float], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        row = {
            "face_index": self.face_index,
            "x1": self.box[0],
            "y1": self.box[1],
            "x2": self.box[2],
            "y2": self.box[3],
            "detector_score": self.detector_score,
            "age": round(self.age, 2),
        }
        if self.interval is not None:
            row["age_low"], row["age_high"] = round(self.interval[0], 2), round(self.interval[1], 2)
        return row

    def as_record(self) -> dict[str, Any]:
        """Every field, JSON-ready, for `from_record` to read back (predict's resume journal)."""
        return {
            "face_index": self.face_index,
            "box": list(self.box),
            "crop_box": list(self.crop_box),
            "detector_score": self.detector_score,
            "age": self.age,
            "interval": list(self.interval) if self.interval is not None else None,
            "landmarks": [list(point) for point in self.landmarks] if self.landmarks else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FacePrediction:
        interval, landmarks = record["interval"], record["landmarks"]
        return cls(
            face_index=int(record["face_index"]),
            box=tuple(int(v) for v in record["box"]),
            crop_box=tuple(int(v) for v in record["crop_box"]),
            detector_score=record["detector_score"],
            age=float(record["age"]),
            interval=(float(interval[0]), float(interval[1])) if interval is not None else None,
            landmarks=tuple((float(x), float(y)) for x, y in landmarks) if landmarks else None,
        )

    def as_json(self) -> dict[str, Any]:
        """The face in JSON answers (`predict --output x.json`, the web API): `as_dict`'s fields (the
        CSV row's), and `landmarks` by name where the detector gives them."""
        landmarks = self.named_landmarks()
        return {**self.as_dict(), "landmarks": landmarks} if landmarks else self.as_dict()

    def named_landmarks(self) -> dict[str, list[float]] | None:
        """The landmarks by name (`LANDMARK_NAMES`: the person's own right and left), [x, y] in pixels
        to 0.1; None where the detector gives none (Haar, or no detector)."""
        if not self.landmarks:
            return None
        named = zip(LANDMARK_NAMES, self.landmarks, strict=True)
        return {name: [round(x, 1), round(y, 1)] for name, (x, y) in named}


# One face ready for the model: the detection (None: the whole image), the crop's box in the image, the
# model's input tensor.
FaceInput = tuple[Face | None, tuple[int, int, int, int], torch.Tensor]


class AgePredictor:
    """Photos to ages: detect every face, frame it as in training (aligned by its landmarks, or the box
    grown by the training margins for older models), predict in batches.

    Without a detector (the default: pass `detector=create_detector()` for photos) each whole image is
    treated as one face crop (as `predict_age_for_image`); `analyze` detects by default.
    `model`: a loaded model, or a run folder, .safetensors file or `default` to load.
    Several photos (`predict_images`) are searched for faces `detect_workers` at a time, each thread with
    its own copy of the detector and OpenCV on one thread (default: up to 4, one per CPU core): on 2 cores
    1.3x the detection throughput of one photo at a time with OpenCV's own threads (the 240 shared
    portraits). `runner` replaces the PyTorch runner (e.g. ONNX Runtime: see backends.py and
    `load_predictor`); with neither a model nor a runner, the model bundled with the package is used.
    """

    def __init__(
        self,
        model: AgeModel | str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        detector: FaceDetector | None = None,
        runner: AgeRunner | None = None,
        metadata: dict[str, Any] | None = None,
        batch_size: int = 32,
        tta_flip: bool = False,
        detect_workers: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
        if runner is None:
            if model is None or isinstance(model, str | os.PathLike):
                model = load_trained_model("default" if model is None else model, device)
            elif not isinstance(model, AgeModel):
                raise TypeError(
                    "model must be a loaded age model (load_trained_model), a run folder, a .safetensors "
                    f"file or 'default', not {type(model).__name__}"
                )
            runner = TorchRunner(model, device, tta_flip=tta_flip)
        self.runner = runner
        self.metadata = metadata if metadata is not None else model.metadata
        self.image_size = image_size_of(self.metadata)
        self.framing = framing_of(self.metadata)
        self.detector = detector
        self.batch_size = batch_size
        self.detect_workers = detect_workers or min(4, os.cpu_count() or 1)
        self._detector_copies: list[FaceDetector] = []

    def face_inputs(self, image: Image.Image) -> list[FaceInput]:
        """(face, crop box, model input) per face; the whole image when there is no detector."""
        return self._face_inputs(image, self.detector)

    def _face_inputs(self, image: Image.Image, detector: FaceDetector | None) -> list[FaceInput]:
        if not image.width or not image.height:  # an empty array or PIL image; no file decodes to one
            raise ImageReadError(f"the image is {image.width}x{image.height} pixels: there is no face to age")
        if detector is None:
            whole = (0, 0, *image.size)
            return [(None, whole, to_input_tensor(image, self.image_size))]
        inputs = []
        for face in detector.detect(image):
            pixels, box = self.framing.crop(image, face, self.image_size)
            inputs.append((face, box, pixels_to_input(pixels)))
        return inputs

    def all_face_inputs(self, images: Sequence[Image.Image]) -> list[list[FaceInput]]:
        """`face_inputs` of each image, in order: in `detect_workers` threads where the detector can be
        copied (see the class docstring), else one image at a time."""
        workers = min(self.detect_workers, len(images))
        if self.detector is None or workers < 2:
            return [self.face_inputs(image) for image in images]
        if not self._detector_copies or self._detector_copies[0] is not self.detector:
            self._detector_copies = independent_copies(self.detector, self.detect_workers)
        if len(self._detector_copies) < 2:
            return [self.face_inputs(image) for image in images]
        free: queue.SimpleQueue[FaceDetector] = queue.SimpleQueue()
        for detector in self._detector_copies[:workers]:
            free.put(detector)

        def one(image: Image.Image) -> list[FaceInput]:
            detector = free.get()  # never waits: as many detectors as threads
            try:
                return self._face_inputs(image, detector)
            finally:
                free.put(detector)

        with opencv_threads(1), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, images))

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        """What the model gives for each face: "age", and "lower" and "upper" where it has an interval.
        Asked of the model itself (one blank input, whatever the backend), so that it is known before,
        or without, any face: a table of photos without faces has the columns of any other."""
        blank = torch.zeros((1, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return tuple(self.runner(blank))

    def run(self, tensors: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        """Model outputs for many inputs, `batch_size` at a time."""
        parts = [
            self.runner(torch.stack(list(tensors[i : i + self.batch_size])))
            for i in range(0, len(tensors), self.batch_size)
        ]
        return (
            {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            if parts
            else {"age": np.zeros(0)}
        )

    def predict_image(self, image: ImageInput) -> list[FacePrediction]:
        """The faces of one photo: a path, an http(s) address, a PIL image or an RGB uint8 array
        (`images.as_rgb`: EXIF rotation applied, any mode converted)."""
        return self.predict_images([image])[0]

    def predict(self, path: str | Path) -> list[FacePrediction]:
        return self.predict_image(load_rgb(path))

    def predict_images(self, images: Sequence[ImageInput]) -> list[list[FacePrediction]]:
        """Faces of several photos (each as `predict_image` takes it), run through the model in shared
        batches."""
        images = [as_rgb(image) for image in images]
        per_image = self.all_face_inputs(images)
        flat = [entry for entries in per_image for entry in entries]
        outputs = self.run([tensor for _, _, tensor in flat])
        results, position = [], 0
        for image, entries in zip(images, per_image, strict=True):
            faces = []
            for index, (face, crop_box, _) in enumerate(entries):
                interval = (
                    (float(outputs["lower"][position]), float(outputs["upper"][position]))
                    if "lower" in outputs
                    else None
                )
                box = inside(face.box, image.size) if face is not None else crop_box
                faces.append(
                    FacePrediction(
                        index,
                        box,
                        crop_box,
                        face.score if face else None,
                        float(outputs["age"][position]),
                        interval,
                        landmarks=face.landmarks if face is not None else None,
                    )
                )
                position += 1
            results.append(faces)
        return results


def inside(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A detector's box in whole pixels, held inside a photo of `size` (a face at the edge is often found
    with its box reaching past it)."""
    width, height = size
    x1, y1, x2, y2 = (round(v) for v in box)
    return (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))


def load_predictor(
    model: AgeModel | Path | str | None = "default",
    *,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    detector: FaceDetector | None = None,
    batch_size: int = 32,
    tta_flip: bool = False,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> AgePredictor:
    """A photo predictor on any backend (see `backends.load_runner`): same detection, framing and
    resizing whichever runs the model."""
    runner, metadata = load_runner(
        model, backend=backend, device=device, tta_flip=tta_flip, threads=threads, providers=providers
    )
    return AgePredictor(runner=runner, metadata=metadata, detector=detector, batch_size=batch_size)


def prediction_grid(
    model: AgeModel,
    paths: Sequence[Path],
    ages: Sequence[float],
    out: Path,
    *,
    device: str | torch.device = "cpu",
    columns: int = 4,
    predicted: Sequence[float] | None = None,
) -> Path:
    """The seed's demo: photos with their true and predicted ages, saved as one PNG. The ages are
    `predicted` where given (training's final test passes those of its predictions.csv, so the grid
    shows what the report measured), else each photo is predicted as `predict_age_for_image` predicts
    it (`face_crop_input`: detected and aligned for a model trained on aligned faces), not as a raw
    resize the model never saw in training."""
    given = predicted if predicted is not None else [None] * len(paths)
    readable = []
    for path, age, known in zip(paths, ages, given, strict=True):
        try:
            readable.append((load_rgb(path), age, known))
        except ImageReadError:
            continue  # the report counts unreadable images; the grid just shows the others
    images = [image for image, _, _ in readable]
    if predicted is not None:
        shown = [known for _, _, known in readable]
    else:
        runner = TorchRunner(model, device, fold=False)  # as predict_age_for_image runs it: the same ages
        shown = AgePredictor(runner=runner, metadata=model.metadata).run(
            [face_crop_input(image, model.metadata) for image in images]
        )["age"]
    pairs = zip(readable, shown, strict=True)
    captions = [f"true {age:g} / predicted {pred:.1f}" for (_, age, _), pred in pairs]
    return plot_prediction_grid(images, captions, out, columns=columns)
