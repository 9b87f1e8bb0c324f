"""Face detection and cropping with the framing the model was trained on.

Detectors: YuNet (default; its ONNX file is taken from a local path, or downloaded once into the user
cache and checked against its SHA-256), its network run on ONNX Runtime or OpenCV (faces/yunet.py), and
OpenCV's Haar cascade as a fallback where opencv < 5 ships it.

Framing: a training crop is a detector box grown by a margin on each side (IMDB-WIKI: 40% of the
box's width/height). Our detector's boxes are not the dataset's, so for a new model the margins are
*measured*: the detector runs on a sample of training crops and the median distance from its box to
each crop edge, in box widths/heights, is stored in the model's metadata. At inference the same
margins around a detected face reproduce the training framing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from age_detect_resnet.atomic import atomic_path
from age_detect_resnet.digests import file_digest
from age_detect_resnet.faces.yunet import resolve_engine, yunet_engine
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.modeling.bundled import bundled_yunet_path, cache_dir
from age_detect_resnet.progress import progress

log = logging.getLogger(__name__)

YUNET_URL = (
    "https://media.githubusercontent.com/media/opencv/opencv_zoo/main/models/"
    "face_detection_yunet/face_detection_yunet_2026may.onnx"
)
YUNET_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
YUNET_ENV = "AGE_DETECT_YUNET_MODEL"
# IMDB-WIKI's crops: the face box enlarged by 40% of its width/height on every side.
IMDB_WIKI_MARGIN = 0.4
SIDES = ("left", "top", "right", "bottom")
# Detection runs on a copy whose longer side is at most this (as InsightFace does): faces in photos are
# large enough to be found there, and a 6000-pixel photo would otherwise take seconds. The landmarks that
# the aligner uses come from a second look at each face (below), so they do not depend on this size.
DETECTION_MAX_SIDE = 640
# Every face found on that copy is detected again on a square region around it, REGION_CONTEXT face
# sizes wide, that shows the face REGION_FACE_SIDE pixels tall: shrunk where it is larger, enlarged where
# it is smaller. Its landmarks, which the aligner uses, then come from a face of one size whatever the
# photo's resolution. A tilted face's look is taken turned upright, and while it is still
# UPRIGHT_MIN_DEGREES or more off it is looked at again, UPRIGHT_PASSES looks in all.
# Landmarks are what made ages move with resolution: with the bundle of the time, FairFace's 540 photos at
# half size (Lanczos) moved by 2.28 years on average with the landmarks the detector before found on them,
# but by 0.71 when aligned with the full-size photo's landmarks scaled down; with these settings they
# move by 1.76 (90th percentile 3.89, was 5.71). Portraits MAE 4.42 (was 4.57), FairFace 44.1% inside /
# 4.04 y (was 43.9% / 4.09), UTKFace test 4.58 (was 4.59), 26.7 photos/s on the portraits (26.4 in the
# same run with the detector before): README, "Landmarks from one face size". The detector before looked
# again only at faces smaller than 160 px on the copy, at most at full resolution, on regions 3 face
# sizes wide: SMALL_FACES_LOOK_SETTINGS.
REFINE_FACE_SIDE = None  # `refine_side`: None looks at every face again; N at faces under N px on the copy
REGION_FACE_SIDE = 224
REGION_CONTEXT = 2.0
# A face whose region would show less than this share of the photo (a face filling a tight crop: the
# rest would be the photo's repeated edge) keeps its first look's landmarks. Looked at all the same,
# UTKFace's crops cut to their central 70% / 55% moved by 3.04 / 6.20 years; with this rule by 2.86 /
# 5.84, and 2.93 / 5.80 with the detector before (experiments/rotation.py --crops).
REGION_MIN_INSIDE = 0.5
SMALL_FACES_LOOK_SETTINGS = {
    "refine_side": 160,
    "region_context": 3.0,
    "region_enlarge": False,
}
# Older settings (before SMALL_FACES_LOOK_SETTINGS: a first look at 1280 px, regions at full resolution)
# as YuNetDetector arguments: the baseline that benchmarks/bench_photos.py and experiments/rotation.py
# compare with as `previous`. Against them, the small-faces look gave 1.7x the photos/s on the 240
# portraits (bench_photos.py, before photos were searched in threads), `evaluate --detect` portraits MAE
# 4.58 (was 4.60), FairFace 37.4% inside / 5.35 y (was 38.3% / 5.33), but the 240 portraits turned by
# +-15 degrees moved by 1.36 y on average (was 1.17; 90th percentile 3.17, was 2.70; rotation.py).
PREVIOUS_YUNET_SETTINGS = {
    "max_side": 1280,
    "refine_side": 224,
    "region_face_side": 427,
    "region_context": 3.0,
    "region_enlarge": False,
}
UPRIGHT_PASSES = 2
# On the 640 px copy YuNet's landmarks make most upright studio portraits look 3 degrees or more off (24
# of the first 40, against 3 at full size), so they get upright passes too. Turned by +-15 degrees, the
# 240 portraits move by 1.27 y at a 1.5-degree threshold, 1.36 at 3, 1.42 at 4 and 1.58 at 5
# (experiments/rotation.py --upright-min-degrees D): lower is steadier but costs more passes (1.5: 17.7
# photos/s against 22.5 at 3 through predict_photos on the portraits), so 3 is kept.
UPRIGHT_MIN_DEGREES = 3.0
# How the default YuNet detector places landmarks: part of the prepared-image cache's key, so that training
# images are re-detected when this changes, as photos are.
LANDMARK_METHOD = (
    f"yunet max_side={DETECTION_MAX_SIDE} refine_side={REFINE_FACE_SIDE} "
    f"region_face_side={REGION_FACE_SIDE} region_context={REGION_CONTEXT} region_enlarge=True "
    f"region_min_inside={REGION_MIN_INSIDE} "
    f"upright_passes={UPRIGHT_PASSES} upright_min_degrees={UPRIGHT_MIN_DEGREES}"
)


# The five landmarks' names in YuNet's order; "right" is the person's own (on the image's left).
LANDMARK_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")


class DetectorUnavailableError(RuntimeError):
    """No face detector could be set up; the message says how to provide one."""


@dataclass(frozen=True)
class Face:
    """A detected face: box (x1, y1, x2, y2) in pixels of the full image, detector confidence, and
    where the detector gives them, five landmarks (x, y) in YuNet's order (see align.py)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the largest box (the subject of a face crop or portrait), or None."""
    return max(faces, key=lambda f: f.area) if faces else None


def subject_face(faces: list[Face], image_size: tuple[int, int]) -> Face | None:
    """The face a labelled photo is of, or None: the most prominent one, its box area weighted by
    1 - d^2, where d is the distance from the box centre to the photo's centre as a share of half the
    photo's diagonal (1 at the centre, 0 in a corner). A photo is framed on its subject: a parent's
    larger face at the edge of a photo of their child loses to the child's in the middle; of faces
    equally central the largest wins, as with `largest_face`."""
    if not faces:
        return None
    width, height = image_size
    half_diagonal_sq = (width * width + height * height) / 4.0

    def prominence(face: Face) -> float:
        x1, y1, x2, y2 = face.box
        dx, dy = (x1 + x2 - width) / 2.0, (y1 + y2 - height) / 2.0
        return face.area * max(0.0, 1.0 - (dx * dx + dy * dy) / half_diagonal_sq)

    return max(faces, key=prominence)


class FaceDetector(Protocol):
    name: str
    max_side: int | None  # detection runs on a copy at most this long on its longer side; None: full size

    def detect(self, image: Image.Image) -> list[Face]: ...


def independent_copies(detector: FaceDetector, count: int) -> list[FaceDetector]:
    """`detector` and up to `count - 1` copies of it with the same settings that can run at the same time
    in other threads (each holds its own OpenCV state: one OpenCV detector must not be shared between
    threads); just `[detector]` for a detector without a `clone` method."""
    clone = getattr(detector, "clone", None)
    if count < 2 or clone is None:
        return [detector]
    return [detector, *(clone() for _ in range(count - 1))]


@contextlib.contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's own thread count set to `count` inside the block (process-wide), restored after it."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def detection_copy(image: Image.Image, max_side: int | None) -> tuple[Image.Image, float]:
    """The image a detector looks at (at most `max_side` pixels on its longer side) and its scale:
    boxes and landmarks found on it are divided by the scale to land on the full image, from which the
    model's crop is cut at full resolution."""
    width, height = image.size
    scale = 1.0 if not max_side else min(1.0, max_side / max(width, height))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # a 1 x 5000 photo stays 1 wide
    return image.resize(size, Image.Resampling.BILINEAR), scale


def with_max_side(detector: FaceDetector, max_side: int | None) -> FaceDetector:
    """A copy of `detector` that detects on images scaled to `max_side` (None or 0: the full image);
    the original keeps its own setting."""
    if not hasattr(detector, "max_side"):
        raise TypeError(f"the {detector.name} detector has no max_side setting")
    scaled = copy.copy(detector)
    scaled.max_side = max_side or None
    return scaled


# When and why this process last failed to download YuNet: offline, each try can wait for the timeout,
# and one command may ask several times (the model's framing, then the photos' detector), so a failure
# is answered from here until YUNET_RETRY_AFTER_S have passed.
YUNET_RETRY_AFTER_S = 300
_yunet_download_failure: tuple[float, str] | None = None


def resolve_yunet_model(path: Path | str | None = None, *, download: bool = True) -> Path:
    """The YuNet ONNX file: `path`, else $AGE_DETECT_YUNET_MODEL, else the copy bundled with the
    package (where the build includes it), else the cached download (made once, checksum verified)."""
    explicit = path or os.environ.get(YUNET_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise DetectorUnavailableError(f"face detector model {explicit} does not exist")
        return Path(explicit)
    cached = cache_dir() / "face_detection_yunet_2026may.onnx"
    for candidate in (bundled_yunet_path(), cached):
        if candidate is not None and candidate.is_file() and file_digest(candidate) == YUNET_SHA256:
            return candidate
    if not download:
        raise DetectorUnavailableError("the YuNet face detector is not downloaded yet")
    global _yunet_download_failure
    if _yunet_download_failure and time.monotonic() - _yunet_download_failure[0] <= YUNET_RETRY_AFTER_S:
        raise DetectorUnavailableError(_yunet_download_failure[1])
    try:
        with urllib.request.urlopen(YUNET_URL, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        message = (
            f"could not download the YuNet face detector ({err}); download {YUNET_URL} yourself and "
            f"pass --detector-model FILE (or set {YUNET_ENV}); `predict --no-detect` uses whole images"
        )
        _yunet_download_failure = (time.monotonic(), message)
        raise DetectorUnavailableError(message) from err
    _yunet_download_failure = None
    if hashlib.sha256(payload).hexdigest() != YUNET_SHA256:
        raise DetectorUnavailableError(
            f"the file downloaded from {YUNET_URL} does not have the expected checksum"
        )
    with atomic_path(cached) as tmp:
        tmp.write_bytes(payload)
    return cached


class YuNetDetector:
    """YuNet on a copy of the image at most `max_side` long, then each face's landmarks made precise by
    running YuNet again on a region `region_context` face sizes wide around it, cut from the full image,
    that shows the face `region_face_side` pixels tall (enlarged where smaller, unless `region_enlarge`
    is False; `refine_side` N looks again only at faces smaller than N px on the copy):
    * YuNet's landmarks depend on the size it sees a face at; from one size, the aligned crop, and the
      age, move less with the photo's resolution (constants above); a face whose region would show less
      than REGION_MIN_INSIDE of the photo (one filling a tight crop) keeps its first look's landmarks;
    * a tilted face (its landmarks' similarity fit to the aligner's upright template turns it by
      `upright_min_degrees` or more) is looked at on its region turned upright, up to
      `upright_passes` times: YuNet was trained on upright faces and its landmarks on a tilted one lean
      towards upright, so the aligner would not undo the whole tilt.
    On the five shared test photos turned by +-20 degrees, the bundled model's age moved by up to 12.7
    years with one detection and by 0.6-2.7 with two upright passes (README, model card)."""

    name = "yunet"

    def __init__(
        self,
        model_path: Path,
        *,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        max_side: int | None = DETECTION_MAX_SIDE,
        refine_side: int | None = REFINE_FACE_SIDE,
        upright_passes: int = UPRIGHT_PASSES,
        region_face_side: int = REGION_FACE_SIDE,
        region_context: float = REGION_CONTEXT,
        region_enlarge: bool = True,
        upright_min_degrees: float = UPRIGHT_MIN_DEGREES,
        engine: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self.refine_side = refine_side
        self.upright_passes = upright_passes
        self.region_face_side = region_face_side
        self.region_context = region_context
        self.region_enlarge = region_enlarge
        self.upright_min_degrees = upright_min_degrees
        try:
            engine = resolve_engine(engine)
        except ValueError as err:
            raise DetectorUnavailableError(str(err)) from err
        try:
            self._engine = yunet_engine(
                self.model_path, engine=engine, score_threshold=score_threshold, nms_threshold=nms_threshold
            )
        except Exception as err:  # ONNX Runtime and OpenCV raise their own types on a wrong file
            raise DetectorUnavailableError(
                f"{self.model_path} is not a YuNet face detector model ({err}); pass --detector-model "
                f"with YuNet's ONNX file (or set {YUNET_ENV}), or leave both out to download it"
            ) from err

    @property
    def engine(self) -> str:
        """Where YuNet's network runs: `onnxruntime` or `opencv` (faces/yunet.py)."""
        return self._engine.name

    def clone(self) -> YuNetDetector:
        """A detector with these settings that may run in another thread (see `independent_copies`)."""
        twin = copy.copy(self)
        twin._engine = self._engine.clone()
        return twin

    def detect(self, image: Image.Image) -> list[Face]:
        small, scale = detection_copy(image, self.max_side)
        faces = [self._refined(image, face, scale) for face in self._run(small, scale)]
        return sorted(faces, key=lambda f: f.score, reverse=True)

    def _run(self, image: Image.Image, scale: float = 1.0) -> list[Face]:
        """YuNet on `image`, a copy of the full image scaled by `scale`; boxes and landmarks in
        full-image pixels."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = []
        for row in self._engine(bgr):  # x, y, w, h, 5 landmarks (x, y), score
            x, y, w, h = (float(v) / scale for v in row[:4])
            points = tuple((float(row[i]) / scale, float(row[i + 1]) / scale) for i in range(4, 14, 2))
            faces.append(Face((x, y, x + w, y + h), float(row[-1]), points))
        return faces

    def _refined(self, image: Image.Image, face: Face, scale: float) -> Face:
        passes = self.upright_passes
        if self.refine_side is None and self._region_inside(image, face) >= REGION_MIN_INSIDE:
            # every face with enough of the photo around it: its look is also its first upright pass
            angle = self._tilt_to_undo(face) if passes else 0.0
            face = self._redetect(image, face, angle, keep_box=True)
            if angle != 0.0:
                passes -= 1
        elif self.refine_side is not None:
            x1, y1, x2, y2 = face.box
            if scale < 1.0 and max(x2 - x1, y2 - y1) * scale < self.refine_side:
                face = self._redetect(image, face, 0.0)
        for _ in range(passes):
            angle = self._tilt_to_undo(face)
            if angle == 0.0:
                break
            face = self._redetect(image, face, angle)
        return face

    def _region_inside(self, image: Image.Image, face: Face) -> float:
        """The share of the face's (upright) region that lies inside the photo."""
        cx, cy, side = _centre_and_side(face)
        half = self.region_context * side / 2
        width = max(0.0, min(cx + half, image.width) - max(cx - half, 0.0))
        height = max(0.0, min(cy + half, image.height) - max(cy - half, 0.0))
        return width * height / (2 * half) ** 2

    def _tilt_to_undo(self, face: Face) -> float:
        """The face's tilt in degrees where it is `upright_min_degrees` or more, else 0."""
        angle = tilt_degrees(face)
        return angle if angle is not None and abs(angle) >= self.upright_min_degrees else 0.0

    def _redetect(self, image: Image.Image, face: Face, angle: float, *, keep_box: bool = False) -> Face:
        """YuNet again on a square region `region_context` times the face's size around it, turned by
        `angle` degrees about the face's centre, the face `region_face_side` pixels tall (at most, unless
        `region_enlarge`); the match's landmarks mapped back to the image, and its box where the region
        was not turned and not `keep_box`. `face` unchanged where the region shows no clear match.

        Every face's look keeps the first look's box: YuNet's box around a face enlarged to
        `region_face_side` is another shape (taller, reaching into the replicated edge of a tight crop),
        and older models' margins (`MarginFraming`) were measured on first-look boxes."""
        cx, cy, side = _centre_and_side(face)
        scale = self.region_face_side / side
        if not self.region_enlarge:
            scale = min(1.0, scale)
        size = max(8, round(self.region_context * side * scale))
        to_region = cv2.getRotationMatrix2D((cx, cy), angle, scale)
        to_region[:, 2] += (size / 2 - cx, size / 2 - cy)
        # Only the part of the image the turned region can show is converted (not a whole large photo).
        reach = 0.75 * self.region_context * side  # past the turned square's corners
        left, top = max(0, int(cx - reach)), max(0, int(cy - reach))
        right, bottom = min(image.width, int(cx + reach) + 1), min(image.height, int(cy + reach) + 1)
        patch = np.asarray(image.crop((left, top, right, bottom)).convert("RGB"))
        from_patch = to_region.copy()
        from_patch[:, 2] += to_region[:, :2] @ (left, top)
        region = cv2.warpAffine(
            patch, from_patch, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        found = [f for f in self._run(Image.fromarray(region)) if f.landmarks]
        if not found:
            return face
        half = side * scale / 2
        expected = np.array([[size / 2 - half, size / 2 - half, size / 2 + half, size / 2 + half]])
        overlaps = box_iou(np.array([f.box for f in found]), expected)[:, 0]
        if overlaps.max() < 0.3:
            return face  # keep the first detection where the region shows no clear match
        best = found[int(overlaps.argmax())]
        back = cv2.invertAffineTransform(to_region)
        points = np.c_[np.asarray(best.landmarks), np.ones(5)] @ back.T
        # The box: the match's where the region was not turned, else the first detection's (upright).
        box = face.box
        if angle == 0.0 and not keep_box:
            corners = np.array([[best.box[0], best.box[1], 1.0], [best.box[2], best.box[3], 1.0]]) @ back.T
            box = tuple(float(v) for v in corners.reshape(-1))
        return Face(box, face.score, tuple((float(x), float(y)) for x, y in points))


def _centre_and_side(face: Face) -> tuple[float, float, float]:
    """A face box's centre and longer side (at least 1 px): what a second look's region is built on."""
    x1, y1, x2, y2 = face.box
    return (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1, 1.0)


def tilt_degrees(face: Face) -> float | None:
    """How far the face is turned in the image plane, in degrees (the rotation, counter-clockwise as
    seen, that makes it upright): the rotation of the similarity transform that puts its five landmarks
    on the aligner's upright template (eye and mouth lines alone are not enough: on a tilted face
    YuNet's eye line stays nearly horizontal). None without landmarks."""
    if face.landmarks is None:
        return None
    from age_detect_resnet.faces.align import TEMPLATE, similarity_matrix  # align builds on Face

    matrix = similarity_matrix(np.asarray(face.landmarks, dtype=np.float64), np.asarray(TEMPLATE) * 256)
    return -float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) boxes (x1, y1, x2, y2) -> (N, M) intersection over union."""
    a, b = a[:, None, :], b[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# The Haar cascade looks at the photo with this share of its longer side repeated around it. Measured on
# 400 UTKFace crops, faces that fill the image (`experiments/haar_border.py`, results/haar-border/):
# a face found in 226 with no border, 366 with 0.1, 380 with 0.2, 385 with 0.3; another 400: 225 and 387.
HAAR_BORDER = 0.2


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (opencv-python < 5 ships it); less accurate than YuNet. One
    cascade cannot run in two threads at once (wrong faces, then a crash), so each call holds the
    instance's lock; `clone` makes a detector that runs beside it."""

    name = "haar"

    def __init__(self, *, max_side: int | None = DETECTION_MAX_SIDE) -> None:
        self.max_side = max_side
        data = getattr(cv2, "data", None)
        if data is None or not hasattr(cv2, "CascadeClassifier"):
            raise DetectorUnavailableError(
                f"OpenCV {cv2.__version__} has no Haar cascades (opencv-python >= 5 dropped them), so "
                "no face detector can run: give YuNet with --detector-model FILE (or "
                "$AGE_DETECT_YUNET_MODEL), install 'opencv-python-headless<5' as this package asks, or pass "
                "--no-detect"
            )
        self._cascade = cv2.CascadeClassifier(
            str(Path(data.haarcascades) / "haarcascade_frontalface_default.xml")
        )
        self._lock = threading.Lock()

    def clone(self) -> HaarDetector:
        """A detector with these settings and its own OpenCV state (see `independent_copies`)."""
        return HaarDetector(max_side=self.max_side)

    def detect(self, image: Image.Image) -> list[Face]:
        small, scale = detection_copy(image, self.max_side)
        grey = np.asarray(small.convert("L"))
        # The cascade needs the whole face inside its window: a face that fills the photo (a face crop,
        # a close-up) is found only once the photo's edge is repeated around it.
        border = round(HAAR_BORDER * max(grey.shape))
        grey = cv2.copyMakeBorder(grey, border, border, border, border, cv2.BORDER_REPLICATE)
        with self._lock:
            boxes, _, weights = self._cascade.detectMultiScale3(
                grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24), outputRejectLevels=True
            )
        faces = []
        for (x, y, w, h), weight in zip(boxes, np.asarray(weights).reshape(-1), strict=True):
            x1, y1 = max(0.0, (x - border) / scale), max(0.0, (y - border) / scale)
            x2, y2 = min(image.width, (x + w - border) / scale), min(image.height, (y + h - border) / scale)
            if x2 > x1 and y2 > y1:
                # levelWeights are unbounded; squash them into (0, 1) so scores read like YuNet's.
                faces.append(Face((x1, y1, x2, y2), float(1 / (1 + np.exp(-float(weight))))))
        return sorted(faces, key=lambda f: f.score, reverse=True)


def create_detector(
    kind: str = "auto", model_path: Path | str | None = None, *, max_side: int | None = DETECTION_MAX_SIDE
) -> FaceDetector:
    """`yunet`, `haar`, or `auto` (YuNet where its model is available, else Haar), detecting on a copy
    at most `max_side` pixels long (None: the full image). A `model_path` given (`--detector-model`)
    that cannot be used is an error, never a silent change of detector."""
    if kind in ("auto", "yunet"):
        try:
            return YuNetDetector(resolve_yunet_model(model_path), max_side=max_side)
        except DetectorUnavailableError as err:
            if kind == "yunet" or model_path:
                raise
            log.warning(
                "%s. Falling back to the Haar cascade detector: its boxes differ from YuNet's, so crops "
                "and ages may be less accurate",
                err,
            )
    if kind in ("auto", "haar"):
        return HaarDetector(max_side=max_side)
    raise ValueError(f"unknown face detector {kind!r}; use auto, yunet or haar")


def expand_box(
    box: tuple[float, float, float, float], margins: dict[str, float], width: int, height: int
) -> tuple[int, int, int, int]:
    """Grow `box` by margins (fractions of its width/height per side), clipped to the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    left = max(0, round(x1 - margins["left"] * w))
    top = max(0, round(y1 - margins["top"] * h))
    right = min(width, round(x2 + margins["right"] * w))
    bottom = min(height, round(y2 + margins["bottom"] * h))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop_face(
    image: Image.Image, face: Face, margins: dict[str, float]
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The training-style crop around `face` and the crop's box in the image."""
    box = expand_box(face.box, margins, *image.size)
    return image.crop(box), box


def uniform_margins(margin: float) -> dict[str, float]:
    return dict.fromkeys(SIDES, float(margin))


def margins_of(metadata: dict[str, Any]) -> dict[str, float]:
    """The crop margins stored in a model's metadata (IMDB-WIKI's 40% for models without them)."""
    crop = metadata.get("crop") or {}
    return {side: float(crop.get("margins", {}).get(side, IMDB_WIKI_MARGIN)) for side in SIDES}


def measure_framing(
    detector: FaceDetector, image_paths: list[Path], *, min_faces: int = 20
) -> dict[str, float] | None:
    """Median margins between detected boxes and the edges of training crops, or None with too few faces."""
    measured = []
    for path in image_paths:
        try:
            image = load_rgb(path)
        except ImageReadError:
            continue
        faces = detector.detect(image)
        if not faces:
            continue
        x1, y1, x2, y2 = largest_face(faces).box
        w, h = x2 - x1, y2 - y1
        if w <= 1 or h <= 1:
            continue
        width, height = image.size
        measured.append((x1 / w, y1 / h, (width - x2) / w, (height - y2) / h))
    if len(measured) < min_faces:
        return None
    medians = np.median(np.asarray(measured), axis=0)
    return {side: round(float(value), 4) for side, value in zip(SIDES, medians, strict=True)}


def training_framing(
    dataset: str,
    root: Path,
    paths: list[str],
    *,
    detector_model: Path | str | None = None,
    sample: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The crop framing of a training set, for the model's metadata (see the module docstring)."""
    rng = np.random.default_rng(seed)
    chosen = [Path(root) / paths[i] for i in rng.permutation(len(paths))[:sample]]
    try:
        detector = create_detector("yunet", detector_model)
        margins = measure_framing(detector, chosen)
    except DetectorUnavailableError as err:
        log.warning("cannot measure the crop framing (%s)", err)
        margins = None
    if margins is not None:
        return {
            "margins": margins,
            "method": f"measured with YuNet on {min(sample, len(paths))} training crops",
        }
    note = "IMDB-WIKI definition" if dataset == "imdb-wiki" else "IMDB-WIKI default, not measured"
    return {"margins": uniform_margins(IMDB_WIKI_MARGIN), "method": f"{note}: 40% of the box on every side"}


_worker_detector: FaceDetector | None = None


def _init_worker(kind: str, model_path: str | None) -> None:
    global _worker_detector
    _worker_detector = create_detector(kind, model_path)


def _subject_face_of(path: str) -> Face | None:
    try:
        image = load_rgb(path)
    except ImageReadError:
        return None  # the dataset reports the unreadable file by name when it loads it
    return subject_face(_worker_detector.detect(image), image.size)


def subject_faces(
    paths: list[Path], *, kind: str = "auto", model_path: Path | None = None, workers: int = 2
) -> list[Face | None]:
    """Per photo, the face it is of (`subject_face`; None: no face, or the file is unreadable)."""
    # Decided here, once: a missing detector fails with its message, `auto`'s fall-back to Haar (or
    # YuNet's download) is tried and said once, and the workers build the detector that was decided.
    detector = create_detector(kind, model_path)
    if isinstance(detector, YuNetDetector):
        kind, model_path = "yunet", detector.model_path
    else:
        kind, model_path = detector.name, None
    with ProcessPoolExecutor(
        max_workers=max(1, workers),
        initializer=_init_worker,
        initargs=(kind, str(model_path) if model_path else None),
    ) as pool:
        return list(
            progress(
                pool.map(_subject_face_of, [str(p) for p in paths], chunksize=16),
                total=len(paths),
                desc="detecting faces",
                unit="img",
            )
        )
