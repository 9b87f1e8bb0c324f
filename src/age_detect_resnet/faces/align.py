"""Face alignment: a similarity transform that puts five landmarks on fixed template points.

YuNet returns five landmarks per face (right eye, left eye, nose tip, right and left mouth corner, as
seen in the image). The aligner fits the rotation + uniform scale + shift that maps them, in the least
squares sense, onto the template below, and warps the photo into the model's square input. Training
images (when the cache is prepared) and every inference path go through the same `Aligner`, so the
model sees faces framed identically whatever the photo: tilted heads are turned upright, large and
small faces come out the same size.

How the transform is chosen is the aligner's version:

1  the least-squares similarity that puts all five landmarks nearest their template points. On a head
   turned away from the camera the eyes, and the mouth corners, come closer together while the
   eye-to-mouth height stays, and the nose tip sticks out towards the turned side: the fit zooms in and
   shifts towards the nose, so a profile's crop shows a cheek and cuts off the rest of the head.
2  eyes and mouth: the scale is the larger of the eye distance and the eye-to-mouth height (each against
   the template's), so that neither a turned head (eyes closer) nor a tilted-back one (mouth closer)
   zooms in; the rotation averages the eye line and the perpendicular of the eye-to-mouth line; the
   centre is the point halfway between the eyes' and the mouth's midpoints, which stays on the face's
   midline when the head turns (the nose tip does not). On a frontal face both give nearly the same crop.

The template, the version and the framing are stored in the model's metadata (`alignment`): a model is
aligned at inference exactly as it was in training. A model without it keeps the older box + margin
framing (faces.crop_face).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from age_detect_resnet.faces.detection import Face, crop_face, margins_of

# Template points in the unit square of the output crop (x right, y down), in YuNet's order: the
# median YuNet landmarks of 400 UTKFace crops, made left-right symmetric and zoomed out by 10% about
# the centre. The crop then holds the whole face from the hairline to below the chin, with a little
# context, and the tightly cropped training faces need almost no invented border.
TEMPLATE: tuple[tuple[float, float], ...] = (
    (0.3230, 0.3110),  # right eye (on the image's left)
    (0.6770, 0.3110),  # left eye
    (0.5000, 0.5000),  # nose tip
    (0.3515, 0.6665),  # right mouth corner
    (0.6485, 0.6665),  # left mouth corner
)
# Where YuNet's five landmarks sit inside its box, as fractions of the box's width/height (median of
# the same 400 faces): used to align faces from a detector that finds boxes only (the Haar cascade).
BOX_LANDMARKS: tuple[tuple[float, float], ...] = (
    (0.246, 0.294),
    (0.713, 0.298),
    (0.463, 0.512),
    (0.277, 0.698),
    (0.670, 0.701),
)


# A face is "turned" (`head_pose`) when its nose tip is off the eyes-mouth midline by more than this share
# of the eye-to-mouth height: 7% of UTKFace's test split (161 of 2,308), 39% of the shared FairFace photos.
TURNED_HEAD = 0.2


def _eyes_and_mouth(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The midpoints of the eyes and of the mouth corners of five landmarks in YuNet's order."""
    return points[:2].mean(axis=0), points[3:].mean(axis=0)


def head_turn(landmarks: Sequence[Sequence[float]]) -> float:
    """How far a face is turned sideways, from its five landmarks: the nose tip's distance from the line
    through the eyes' and the mouth's midpoints, as a share of the eye-to-mouth height (0 frontal,
    signed: > 0 when the nose tip is right of the midline in the image, for an upright face)."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, mouth = _eyes_and_mouth(points)
    down, nose = mouth - eyes, points[2] - eyes
    height = float(np.hypot(*down))
    if height <= 1e-12:
        raise ValueError("landmarks collapse to one point; cannot tell the head's turn")
    return float(nose[0] * down[1] - nose[1] * down[0]) / height**2


def head_pose(face: Face | None) -> str | None:
    """The face's pose, "frontal" or "turned" (see TURNED_HEAD); None without a face or its landmarks."""
    if face is None or face.landmarks is None:
        return None
    try:
        return "turned" if abs(head_turn(face.landmarks)) > TURNED_HEAD else "frontal"
    except ValueError:
        return None


def eyes_mouth_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(2, 3) similarity transform (rotation, uniform scale, shift) mapping five landmarks `source` (in
    YuNet's order) onto the template points `target` by eyes and mouth alone (version 2, see the module
    docstring): robust to heads turned sideways or up and down, where a least-squares fit zooms in."""
    source = np.asarray(source, dtype=np.float64).reshape(5, 2)
    target = np.asarray(target, dtype=np.float64).reshape(5, 2)

    def geometry(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        eyes, mouth = _eyes_and_mouth(points)
        return (eyes + mouth) / 2, points[1] - points[0], mouth - eyes  # centre, eye line, eyes -> mouth

    def across(eye_line: np.ndarray, down: np.ndarray, eye_unit: float, down_unit: float) -> np.ndarray:
        # The face's left-to-right direction from both cues; (dy, -dx) turns "down" into "across".
        return eye_line / eye_unit + np.array([down[1], -down[0]]) / down_unit

    centre_t, eye_t, down_t = geometry(target)
    eye_unit, down_unit = float(np.linalg.norm(eye_t)), float(np.linalg.norm(down_t))
    if eye_unit <= 1e-12 or down_unit <= 1e-12:
        raise ValueError("template eyes or mouth collapse to one point; cannot align")
    centre, eye_line, down = geometry(source)
    size = max(float(np.linalg.norm(eye_line)) / eye_unit, float(np.linalg.norm(down)) / down_unit)
    if size <= 1e-12:
        raise ValueError("landmarks collapse to one point; cannot align")
    direction = across(eye_line, down, eye_unit, down_unit)
    direction_t = across(eye_t, down_t, eye_unit, down_unit)
    angle = np.arctan2(direction_t[1], direction_t[0]) - np.arctan2(direction[1], direction[0])
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) / size
    shift = centre_t - linear @ centre
    return np.hstack([linear, shift[:, None]])


def similarity_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity transform (rotation, uniform scale, shift) mapping the (N, 2)
    `source` points onto `target` (Umeyama's closed form, without reflection)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    s, t = source - mu_s, target - mu_t
    variance = (s**2).sum() / len(s)
    if variance <= 1e-12:
        raise ValueError("landmarks collapse to one point; cannot align")
    covariance = t.T @ s / len(s)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / variance)
    shift = mu_t - scale * rotation @ mu_s
    return np.hstack([scale * rotation, shift[:, None]])


# How each aligner version fits the transform (see the module docstring); models record the version
# they were trained with.
FITS = {1: similarity_matrix, 2: eyes_mouth_matrix}
ALIGNMENT_VERSIONS = tuple(FITS)


@dataclass(frozen=True)
class Aligner:
    """Warps a face, given its five landmarks, into a (size, size) crop framed like the template.

    `context` > 1 returns a larger crop around the same framing (the centre `size` pixels are the
    aligned crop): the training cache keeps this border so that augmentation can shift, scale and
    rotate without inventing black corners.
    """

    template: tuple[tuple[float, float], ...] = TEMPLATE
    box_landmarks: tuple[tuple[float, float], ...] = BOX_LANDMARKS
    version: int = 1  # new training runs choose theirs (`--alignment`); see the module docstring

    def __post_init__(self) -> None:
        if self.version not in ALIGNMENT_VERSIONS:
            raise ValueError(
                f"alignment version {self.version} is not one this package knows "
                f"({', '.join(map(str, ALIGNMENT_VERSIONS))}); a model aligned with it was made by a newer "
                "release: upgrade age-detect-resnet"
            )

    def output_size(self, size: int, context: float = 1.0) -> int:
        """Side of the crop with `context`: `size` plus an even border, so the centre crop is exact."""
        border = round(size * (context - 1.0) / 2)
        return size + 2 * max(0, border)

    def matrix(self, landmarks: np.ndarray, size: int, context: float = 1.0) -> np.ndarray:
        out = self.output_size(size, context)
        target = np.asarray(self.template) * size + (out - size) / 2
        return FITS[self.version](np.asarray(landmarks, dtype=np.float64).reshape(5, 2), target)

    def warp(
        self, image: Image.Image | np.ndarray, landmarks: np.ndarray, size: int, *, context: float = 1.0
    ) -> np.ndarray:
        """The aligned face as uint8 (out, out, 3) RGB; pixels outside the photo repeat its edge."""
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        out = self.output_size(size, context)
        matrix = self.matrix(landmarks, size, context)
        # Shrinking a large face in one bilinear step aliases; area-average down to about 2x first.
        scale = float(np.hypot(*matrix[:, 0]))
        if scale < 0.5:
            factor = 2.0 * scale
            small = cv2.resize(
                pixels,
                (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[0] * factor))),
                interpolation=cv2.INTER_AREA,
            )
            matrix = matrix.copy()
            matrix[:, :2] /= factor
            pixels = small
        return cv2.warpAffine(
            np.ascontiguousarray(pixels),
            matrix,
            (out, out),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def landmarks_from_box(self, box: Sequence[float]) -> np.ndarray:
        """(5, 2) landmarks estimated from a detector box, for detectors without landmarks."""
        x1, y1, x2, y2 = box
        layout = np.asarray(self.box_landmarks)
        return np.stack([x1 + layout[:, 0] * (x2 - x1), y1 + layout[:, 1] * (y2 - y1)], axis=1)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "template": [list(p) for p in self.template],
            "box_landmarks": [list(p) for p in self.box_landmarks],
            "landmarks": "yunet: right eye, left eye, nose tip, right mouth corner, left mouth corner",
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Aligner | None:
        """The aligner a model was trained with, or None for models framed by box + margins."""
        alignment = metadata.get("alignment")
        if not alignment:
            return None
        version = int(alignment.get("version", 0))  # an unknown one is refused by __post_init__
        return cls(
            template=tuple(tuple(float(v) for v in p) for p in alignment["template"]),
            box_landmarks=tuple(tuple(float(v) for v in p) for p in alignment["box_landmarks"]),
            version=version,
        )


class FaceFraming(Protocol):
    """How a model's input is cut from a photo around a detected face: one owner for training
    (evaluate --detect) and every inference path."""

    def crop(self, image: Image.Image, face: Face, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The (size, size, 3) uint8 input and the region of the photo it shows (x1, y1, x2, y2)."""
        ...


@dataclass(frozen=True)
class MarginFraming:
    """Older models: the detector box grown by the training margins, resized (no rotation)."""

    margins: dict[str, float]

    def crop(self, image: Image.Image, face: Face, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        region, box = crop_face(image, face, self.margins)
        region = region.convert("RGB")
        if region.size != (size, size):
            region = region.resize((size, size), Image.Resampling.BILINEAR)
        return np.array(region, dtype=np.uint8), box


@dataclass(frozen=True)
class LandmarkFraming:
    """Aligned models: the face warped onto the template by its landmarks (estimated from the box
    where the detector gives none)."""

    aligner: Aligner

    def crop(self, image: Image.Image, face: Face, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        points = (
            np.asarray(face.landmarks)
            if face.landmarks is not None
            else self.aligner.landmarks_from_box(face.box)
        )
        pixels = self.aligner.warp(image, points, size)
        # The photo region the crop shows: its corners mapped back, as an upright bounding box.
        inverse = cv2.invertAffineTransform(self.aligner.matrix(points, size))
        corners = np.array([[0, 0, 1], [size, 0, 1], [size, size, 1], [0, size, 1]], dtype=np.float64)
        mapped = corners @ inverse.T
        width, height = image.size
        x1, y1 = np.clip(mapped.min(axis=0), 0, (width, height))
        x2, y2 = np.clip(mapped.max(axis=0), 0, (width, height))
        return pixels, (round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1))


def framing_of(metadata: dict[str, Any]) -> FaceFraming:
    """The framing a model was trained with, from its metadata."""
    aligner = Aligner.from_metadata(metadata)
    return LandmarkFraming(aligner) if aligner is not None else MarginFraming(margins_of(metadata))
