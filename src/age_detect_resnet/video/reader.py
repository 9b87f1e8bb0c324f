"""Reading video files frame by frame with OpenCV (any container and codec its FFmpeg build decodes),
at a chosen stride, one frame in memory at a time; a file that cannot be used is a `VideoReadError`
naming it, which callers treat like an unreadable photo.

Times are each frame's own timestamp, not its index over the header's frame rate: phones record at a
variable frame rate (slower in low light, or in a slow-motion clip's normal-speed parts), where the
header's rate is an average and index / rate may be seconds off. A target rate (`fps`) samples by those
times too."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
from PIL import Image

from age_detect_resnet.images import ImageReadError

# A container that gives no frame rate (rare: raw streams): frame times assume this rate.
FALLBACK_FPS = 25.0
# The header's frame count is exact for MP4/MOV but estimated from duration × rate for some containers
# (AVI, MKV, WebM), so a video may end a little before it; ending before this share of it is a broken file.
COMPLETE_SHARE = 0.95
# The target rates a stride takes: a frame every 1000 s at least (lower ones made the gaps derived from
# 1 / fps overflow), and at most 1000 a second (every frame of any camera's video; far higher ones made
# the slots of frame times overflow).
MIN_FPS = 0.001
MAX_FPS = 1000.0


class VideoReadError(ImageReadError):
    """A video that cannot be used (missing, not a video, truncated, unsupported codec); the message
    names it and says what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame rate, frame count (None where it does not say), size."""

    path: Path
    fps: float
    frame_count: int | None
    width: int
    height: int

    @property
    def duration(self) -> float | None:
        return self.frame_count / self.fps if self.frame_count is not None else None


def open_video(path: Path | str) -> tuple[cv2.VideoCapture, VideoInfo]:
    """An opened capture and the video's header, or a `VideoReadError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path} is empty (0 bytes); re-download or remove it")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoReadError(
            f"{path} is not a video OpenCV can read (truncated, corrupt, or an unsupported format); "
            "re-download it or convert it to MP4 (H.264)"
        )
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    info = VideoInfo(
        path,
        fps=float(fps) if math.isfinite(fps) and fps > 0 else FALLBACK_FPS,
        frame_count=int(count) if math.isfinite(count) and count > 0 else None,
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    return capture, info


def probe_video(path: Path | str) -> VideoInfo:
    """The header of the video at `path` (frame rate, frame count, size), without decoding frames."""
    capture, info = open_video(path)
    capture.release()
    return info


@dataclass(frozen=True)
class Stride:
    """Which frames of a `video_fps` video are sampled: every `every`-th frame, or about `fps` frames
    a second of the frames' times (all frames where the video has fewer), or every frame when neither
    is given."""

    video_fps: float
    every: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.fps is not None:
            raise ValueError("give either every (frames) or fps (frames per second), not both")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be at least 1 frame, not {self.every}")
        if self.fps is not None and not MIN_FPS <= self.fps <= MAX_FPS:
            raise ValueError(f"fps must be from {MIN_FPS:g} to {MAX_FPS:g}, not {self.fps}")

    def slot(self, index: int, time: float) -> int:
        """The slot of frame `index`, shown at `time` seconds: a frame is sampled when it is the first
        one in its slot (`read_frames`). Slots are `every` frames, or 1/fps seconds of the frames'
        own times, so the kept frames are spread evenly over real time whatever the two rates are and
        however the video's rate varies; or one frame each."""
        if self.every is not None:
            return index // self.every
        if self.fps is None:
            return index
        # the tolerance keeps 6 / 30 * 5 in slot 1 however the division rounds
        return math.floor(time * self.fps + 1e-9)

    def keeps(self, index: int) -> bool:
        """Whether frame `index` is sampled where frames come at the header's rate (a constant-rate
        video: its frame times are index / video_fps)."""
        return index == 0 or self.slot(index, index / self.video_fps) > self.slot(
            index - 1, (index - 1) / self.video_fps
        )

    @property
    def rate(self) -> float:
        """Sampled frames per second of video (the frame rate of an annotated copy), at the header's
        rate: the average one, for a variable-frame-rate video."""
        if self.every is not None:
            return self.video_fps / self.every
        return min(self.fps, self.video_fps) if self.fps is not None else self.video_fps

    def count(self, frame_count: int | None) -> int | None:
        """How many of `frame_count` frames are sampled (None when the count is unknown)."""
        return None if frame_count is None else sum(map(self.keeps, range(frame_count)))


def frame_time(capture: cv2.VideoCapture, index: int, previous: float, fps: float) -> float:
    """Seconds into the video of frame `index`, just grabbed from `capture`: its own timestamp (see the
    module docstring), or, where the container gives none that can be used (none, or not after the
    previous frame's, `previous` seconds), the previous frame's time plus one frame at `fps`."""
    ms = capture.get(cv2.CAP_PROP_POS_MSEC)
    if math.isfinite(ms) and ms >= 0 and (index == 0 or ms / 1000 > previous):
        return ms / 1000
    return previous + 1 / fps if index else 0.0


def read_frames(
    path: Path | str, *, every: int | None = None, fps: float | None = None
) -> Iterator[tuple[int, float, Image.Image]]:
    """(frame index, time in seconds, RGB image) of the sampled frames, in order; times are the frames'
    own (`frame_time`). Skipped frames are only grabbed (demuxed and decoded by FFmpeg, not converted).
    Raises `VideoReadError` when the file cannot be opened, has no frame, or ends well before the frame
    count its header declares."""
    capture, info = open_video(path)
    stride = Stride(info.fps, every=every, fps=fps)
    index, time, last_slot = 0, 0.0, None
    try:
        while capture.grab():
            time = frame_time(capture, index, time, info.fps)
            slot = stride.slot(index, time)
            if last_slot is None or slot > last_slot:
                last_slot = slot
                ok, bgr = capture.retrieve()
                if not ok:
                    raise VideoReadError(
                        f"{info.path}: frame {index} cannot be decoded; the file is corrupt, re-download it"
                    )
                yield index, time, Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise VideoReadError(f"{info.path} has no frame OpenCV can decode; convert it to MP4 (H.264)")
    if info.frame_count is not None and index < COMPLETE_SHARE * info.frame_count:
        raise VideoReadError(
            f"{info.path} ends after {index} of the {info.frame_count} frames its header declares: "
            "it is truncated or corrupt; re-download it"
        )
