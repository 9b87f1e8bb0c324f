"""Ages of the people in a video: sampled frames through the photo predictor, faces tracked from frame
to frame, each person's age steadied over their frames, and optionally an annotated copy of the video.

    result = predict_video(AgePredictor(detector=create_detector()), "clip.mp4", fps=5,
                           annotate_to=Path("clip_ages.mp4"))
    for track in result.tracks:
        print(track.track_id, track.first_time, track.age)

Speed, and what each shortcut costs:
* Faces of `frames_per_batch` consecutive sampled frames share model batches (the model runs 2-3 times
  faster per face in a batch of 8+ than one at a time on a CPU); every sampled frame is still predicted.
* `detect_max_side` runs the face detector on a copy of the frame scaled down to that longer side (the
  crops the model sees are still cut from the full frame). Detection is most of a frame's time at 720p
  and above; a smaller copy misses faces smaller than about 10 pixels at that scale (e.g. 30 pixels wide
  in a 1920-pixel frame at 640); 0 looks at the full frame. None keeps the detector's own setting (640
  by default, as for photos).
* The stride (`every` / `fps`) is the caller's choice of which frames to predict at all.

Memory is bounded for a video of any length: frames are read one at a time and at most one batch of
frames (`frames_per_batch`, fewer for very large frames) is held; per-frame results are a few numbers
per face; an ended track keeps only its summary.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from age_detect_resnet.atomic import atomic_path
from age_detect_resnet.faces.detection import with_max_side
from age_detect_resnet.images import VIDEO_SUFFIXES
from age_detect_resnet.inference.annotate import age_label, draw_predictions
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction
from age_detect_resnet.video.reader import Stride, VideoInfo, probe_video, read_frames
from age_detect_resnet.video.tracking import FaceTracker, TrackedFace, TrackSummary, max_missed_for

log = logging.getLogger(__name__)

# Sampled frames whose faces share model batches: batches of 8+ faces for one face per frame.
FRAMES_PER_BATCH = 8
# ... but never more frames held than this many bytes of RGB pixels (8 frames of 1080p = 50 MB).
MAX_HELD_BYTES = 64_000_000


def is_video(path: Path) -> bool:
    return path.name.lower().endswith(VIDEO_SUFFIXES)


@dataclass(slots=True)
class FrameFace:
    """One face in one sampled frame: the frame's own prediction and its track."""

    frame: int
    time: float
    face: FacePrediction
    track: TrackedFace

    def as_dict(self) -> dict[str, Any]:
        """frame, time, track_id, then the photo columns (face_index, box, detector_score, age,
        age_low/age_high: this frame's), then steady_age, steady_low/steady_high and track_frames."""
        tracked = self.track.as_dict()
        return {
            "frame": self.frame,
            "time": round(self.time, 3),
            "track_id": self.track.track_id,
            **self.face.as_dict(),
            **{k: v for k, v in tracked.items() if k.startswith("steady") or k == "track_frames"},
        }

    def as_json(self) -> dict[str, Any]:
        """The face in JSON answers (`predict --output x.json`): `as_dict`'s fields (the CSV row's), and
        `landmarks` by name where the detector gives them, as a photo's face (`FacePrediction.as_json`)."""
        landmarks = self.face.named_landmarks()
        return {**self.as_dict(), "landmarks": landmarks} if landmarks else self.as_dict()


@dataclass
class VideoResult:
    """A video's per-frame faces, its tracks (one per person seen), and where its annotated copy is."""

    path: Path
    info: VideoInfo
    rate: float  # sampled frames per second of video
    frames: int = 0  # sampled frames predicted
    faces: list[FrameFace] = field(default_factory=list)
    tracks: list[TrackSummary] = field(default_factory=list)
    annotated: Path | None = None


def predict_video(
    predictor: AgePredictor,
    path: Path | str,
    *,
    every: int | None = None,
    fps: float | None = None,
    tracker: FaceTracker | None = None,
    annotate_to: Path | str | None = None,
    progress: bool = True,
    frames_per_batch: int = FRAMES_PER_BATCH,
    detect_max_side: int | None = None,
) -> VideoResult:
    """Predict the sampled frames of the video at `path` (every `every`-th frame, or `fps` a second,
    or all), track the faces, and write an annotated MP4 to `annotate_to` when given. Without a
    `tracker`, a track outlasts a second or two missed sampled frames, whichever is longer
    (`max_missed_for`): a sparse stride must not split a person into one-frame tracks.

    Raises `VideoReadError` (an `ImageReadError`) naming the file when it cannot be read or ends early;
    an annotated copy is then not left behind."""
    path = Path(path)
    info = probe_video(path)
    stride = Stride(info.fps, every=every, fps=fps)
    # the longest gap between two sampled frames (at a target rate they are unevenly spaced by up to a
    # frame), plus half a frame against the rounding of frame times
    gap = (math.ceil(info.fps / stride.rate - 1e-9) + 0.5) / info.fps
    tracker = tracker or FaceTracker(max_missed=max_missed_for(gap))
    if detect_max_side is not None and predictor.detector is not None:
        predictor = copy.copy(predictor)  # the caller's predictor keeps its own detector
        predictor.detector = with_max_side(predictor.detector, detect_max_side)
    frame_bytes = 3 * info.width * info.height
    held = max(1, min(frames_per_batch, MAX_HELD_BYTES // frame_bytes if frame_bytes else frames_per_batch))
    result = VideoResult(path, info, stride.rate)
    bar = tqdm(
        total=stride.count(info.frame_count), desc=path.name, unit="frame", disable=not progress or None
    )
    try:
        # The copy has a constant rate (the header's, an average where the video's rate varies): the
        # frames of a variable-frame-rate video are evenly spaced in it, so its clock runs ahead of or
        # behind the original's where the rate varied; the rows' times are the frames' own.
        with mp4_writer(annotate_to, stride.rate) as write:
            for chunk in _chunks(read_frames(path, every=every, fps=fps), held):
                predictions = predictor.predict_images([image for _, _, image in chunk])
                for (index, time, image), faces in zip(chunk, predictions, strict=True):
                    tracked = tracker.update(faces, time)
                    result.faces.extend(
                        FrameFace(index, time, face, track)
                        for face, track in zip(faces, tracked, strict=True)
                    )
                    if write is not None:
                        write(annotate_frame(image, faces, tracked))
                    result.frames += 1
                    bar.update(1)
    finally:
        bar.close()
    result.tracks = tracker.summaries()
    result.annotated = Path(annotate_to) if annotate_to else None
    return result


def annotate_frame(
    image: Image.Image, faces: Sequence[FacePrediction], tracked: Sequence[TrackedFace]
) -> Image.Image:
    """The frame with each face boxed and labelled `#track steady age (interval)`."""
    steady = [
        replace(face, age=track.steady_age, interval=track.interval)
        for face, track in zip(faces, tracked, strict=True)
    ]
    labels = [f"#{track.track_id} {age_label(face)}" for face, track in zip(steady, tracked, strict=True)]
    return draw_predictions(image, steady, labels=labels)


def _chunks(frames: Iterator[tuple[int, float, Image.Image]], size: int) -> Iterator[list]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def mp4_writer(out: Path | str | None, rate: float) -> Iterator[Callable[[Image.Image], None] | None]:
    """A function writing RGB frames to an MP4 at `out` (None without `out`); the file appears under its
    name only when the context exits without an error."""
    if out is None:
        yield None
        return
    writer: cv2.VideoWriter | None = None
    with atomic_path(Path(out), suffix=".mp4") as tmp:  # OpenCV picks the container by the suffix

        def write(image: Image.Image) -> None:
            nonlocal writer
            if writer is None:
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), rate, image.size)
                if not writer.isOpened():
                    raise OSError(f"cannot write {out}: this OpenCV build has no MP4 (mp4v) encoder")
            writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))

        try:
            yield write
        finally:
            if writer is not None:
                writer.release()
