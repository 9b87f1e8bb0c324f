"""Following faces from frame to frame and steadying each person's age over the frames they are seen in.

    tracker = FaceTracker()
    for index, time, image in read_frames("clip.mp4", fps=5):
        for face in tracker.update(predictor.predict_image(image), time):
            print(face.track_id, face.age, face.steady_age)
    tracker.summaries()            # one TrackSummary per person seen

Matching: a face may continue a track whose last box it overlaps by `iou_threshold` (intersection over
union), or whose face it is near: its centre within `max_shift(gap)` face sizes of where the track's
face would be now, had it gone on moving as it did between its last two sightings. The shift allowed
grows with the seconds since the track was last seen (`SHIFT_BASE` + `SHIFT_PER_SECOND` a second, at
most `MAX_SHIFT`). Overlap alone split a walking person at the default 5 frames a second: a face moving
more than about half its width between sampled frames overlaps its last box by less than 0.3, so each
sighting became a track of its own. Among the allowed pairs, each track takes at most one face and each
face one track, the pairs' total distance (in face sizes) as small as possible (an assignment problem):
two people side by side keep their ids, and so do two passing each other, even at the same height with
one hidden behind the other for a while, as long as each keeps its direction. A face allowed to continue
no track starts a new one. A track not seen for `max_missed` seconds has ended (the person left, or was
hidden too long to be sure it is the same one when a face reappears there). Frames sampled far
apart (`predict --fps 0.5`) need longer: `max_missed_for(gap)` also lets a face miss `MISSED_FRAMES`
sampled frames, or a still face would become one track per frame.

Steady age: the median of the track's per-frame ages, over its most recent `window` observations: one
blurred, turned or half-hidden frame with a wild age moves it little, and memory per track is bounded.

Steady interval (models with intervals only). A per-frame interval is the model's uncertainty about the
person's age from one frame. Part of it is frame-specific (pose, light, blur, expression) and averages
out over frames; part of it belongs to the person (someone who looks older than they are does so in every
frame) and does not. The frame-specific part is measured from the track itself, as the robust spread `s`
of its per-frame ages (median absolute deviation × 1.4826); the per-frame standard deviation `σ` comes
from the median interval half-width and the interval's coverage (`coverage`, 80% for the bundled model,
as a normal quantile). With the person's part `σ_p² = max(σ² − s², 0)` and `n` effectively independent
frames, the steady age's uncertainty is `σ_p² + s²/n`, and the interval is the median per-frame interval's
lower and upper half-widths, scaled by `sqrt((σ_p² + s²/n) / σ²)`, around the steady age. So a track whose
frames all give the same age (a still photo filmed for a minute) keeps the per-frame width: more copies
of the same picture say nothing new; a track with varied frames narrows towards the person's part (and a
short track whose frames disagree more than its intervals allow is wider than one frame's). It is
deliberately not `σ/sqrt(n)`: that would shrink without bound and cover the true age ever less often.
Consecutive frames are nearly the same picture, so frames count as independent at most once per
`independent_every` seconds: `n = min(frames, 1 + seconds spanned / independent_every)`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from age_detect_resnet.faces.detection import box_iou

if TYPE_CHECKING:  # the tracker only reads .box, .age and .interval; no torch import at run time
    from age_detect_resnet.inference.predictor import FacePrediction

Box = tuple[int, int, int, int]
# Median absolute deviation to standard deviation, for normally distributed values.
MAD_TO_SD = 1.4826
# A track ends when its face is unseen for longer than this many seconds...
MAX_MISSED = 1.0
# ... and, in sampled video, than this many sampled frames (a blink of the detector, a turned head).
MISSED_FRAMES = 2
# How far a face's centre may move between two sightings and still continue its track, in face sizes
# (the mean side of its two boxes): SHIFT_BASE, plus SHIFT_PER_SECOND for each second between them (a
# person walking past moves their face several widths a second; 0.2 s apart, at the default 5 frames a
# second, that allows 1.3), at most MAX_SHIFT however long the gap. The cap stays below the ~2.5 face
# widths between the faces of two people standing shoulder to shoulder: beyond it, a face is as likely
# someone else's.
SHIFT_BASE = 0.5
SHIFT_PER_SECOND = 4.0
MAX_SHIFT = 1.5


def max_missed_for(frame_gap: float) -> float:
    """`max_missed` for frames up to `frame_gap` seconds apart: `MAX_MISSED` seconds or `MISSED_FRAMES`
    frames without the face, whichever is longer, so that sparse sampling keeps one person one track."""
    return max(MAX_MISSED, (MISSED_FRAMES + 1) * frame_gap)


def max_shift(gap: float) -> float:
    """How many face sizes a face's centre may move in `gap` seconds and still continue its track."""
    return min(SHIFT_BASE + SHIFT_PER_SECOND * gap, MAX_SHIFT)


@dataclass
class TrackedFace:
    """One face in one frame, after tracking: this frame's age and the track's steadied age so far."""

    track_id: int
    box: Box  # x1, y1, x2, y2
    age: float  # this frame's prediction
    steady_age: float  # the track's steadied age so far
    interval: tuple[float, float] | None  # steadied interval (None when the model has none)
    frames: int  # observations of this track so far

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "track_id": self.track_id,
            "x1": self.box[0],
            "y1": self.box[1],
            "x2": self.box[2],
            "y2": self.box[3],
            "age": round(self.age, 2),
            "steady_age": round(self.steady_age, 2),
        }
        if self.interval is not None:
            row["steady_low"], row["steady_high"] = round(self.interval[0], 2), round(self.interval[1], 2)
        row["track_frames"] = self.frames
        return row


@dataclass
class TrackSummary:
    """One person's track: when it was seen (seconds into the video), how often, and its steady age."""

    track_id: int
    first_time: float
    last_time: float
    frames: int
    age: float
    interval: tuple[float, float] | None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "track_id": self.track_id,
            "first_time": round(self.first_time, 3),
            "last_time": round(self.last_time, 3),
            "frames": self.frames,
            "age": round(self.age, 2),
        }
        if self.interval is not None:
            row["age_low"], row["age_high"] = round(self.interval[0], 2), round(self.interval[1], 2)
        return row


class _Track:
    """A live track: its last box, how fast its centre moved, and its most recent observations (bounded
    by `window`)."""

    def __init__(self, track_id: int, time: float, window: int) -> None:
        self.track_id = track_id
        self.first_time = self.last_time = time
        self.box: Box = (0, 0, 0, 0)
        self.velocity = np.zeros(2)  # pixels a second, between the last two sightings
        self.frames = 0
        # time, age, interval's lower and upper bound (NaN without an interval); newest last
        self.times: deque[float] = deque(maxlen=window)
        self.ages: deque[float] = deque(maxlen=window)
        self.lows: deque[float] = deque(maxlen=window)
        self.highs: deque[float] = deque(maxlen=window)

    def observe(self, face: FacePrediction, time: float) -> None:
        box = tuple(int(v) for v in face.box)
        if self.frames and time > self.last_time:
            self.velocity = (_centre(box) - _centre(self.box)) / (time - self.last_time)
        self.box = box
        self.last_time = time
        self.frames += 1
        self.times.append(time)
        self.ages.append(float(face.age))
        low, high = face.interval if face.interval is not None else (math.nan, math.nan)
        self.lows.append(float(low))
        self.highs.append(float(high))

    def expected_centre(self, time: float) -> np.ndarray:
        """Where the face's centre would be at `time`, moving on as between its last two sightings."""
        return _centre(self.box) + self.velocity * (time - self.last_time)


def _centre(box: Sequence[float]) -> np.ndarray:
    return (np.asarray(box[:2], dtype=np.float64) + np.asarray(box[2:], dtype=np.float64)) / 2


class FaceTracker:
    """Assigns each frame's faces to tracks by box overlap or nearness and keeps each track's steady age
    (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        iou_threshold: float = 0.3,
        max_missed: float = MAX_MISSED,
        window: int = 300,
        coverage: float = 0.8,
        independent_every: float = 0.2,
    ) -> None:
        """`max_missed` and `independent_every` are seconds; `window` is observations per track;
        `coverage` is the probability the model's per-frame intervals are calibrated to."""
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], not {iou_threshold}")
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), not {coverage}")
        if window < 1:
            raise ValueError(f"window must be at least 1 observation, not {window}")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.window = window
        self.independent_every = independent_every
        # per-frame half-width = z * per-frame standard deviation
        self._z = NormalDist().inv_cdf((1 + coverage) / 2)
        self._live: list[_Track] = []
        self._ended: list[TrackSummary] = []
        self._next_id = 1
        self._time = -math.inf

    def update(self, faces: Sequence[FacePrediction], time: float) -> list[TrackedFace]:
        """The faces of the frame at `time` seconds (non-decreasing from call to call), tracked, in
        the order given."""
        if time < self._time:
            raise ValueError(f"frame times must not go back: {time} s after {self._time} s")
        self._time = time
        self._end_missed(time)
        assignment = self._match(faces, time)
        tracked = []
        for index, face in enumerate(faces):
            track = assignment.get(index)
            if track is None:
                track = _Track(self._next_id, time, self.window)
                self._next_id += 1
                self._live.append(track)
            track.observe(face, time)
            steady_age, interval = self._steady(track)
            tracked.append(
                TrackedFace(track.track_id, track.box, float(face.age), steady_age, interval, track.frames)
            )
        return tracked

    def summaries(self) -> list[TrackSummary]:
        """Every track seen so far, ended or live, by track_id."""
        return sorted([*self._ended, *map(self._summary, self._live)], key=lambda s: s.track_id)

    def _end_missed(self, time: float) -> None:
        # An ended track keeps only its summary: memory stays bounded however many people pass.
        for track in [t for t in self._live if time - t.last_time > self.max_missed]:
            self._ended.append(self._summary(track))
            self._live.remove(track)

    def _match(self, faces: Sequence[FacePrediction], time: float) -> dict[int, _Track]:
        """Face index -> live track: the allowed pairs (module docstring) with the smallest total
        centre distance."""
        if not faces or not self._live:
            return {}
        boxes = np.asarray([f.box for f in faces], dtype=np.float64)[:, None, :]
        last = np.asarray([t.box for t in self._live], dtype=np.float64)[None, :, :]
        iou = box_iou(boxes[:, 0], last[0])
        expected = np.asarray([t.expected_centre(time) for t in self._live])[None, :, :]
        offsets = (boxes[..., :2] + boxes[..., 2:]) / 2 - expected
        sides = (boxes[..., 2:] - boxes[..., :2]).sum(-1) + (last[..., 2:] - last[..., :2]).sum(-1)
        distance = np.hypot(offsets[..., 0], offsets[..., 1]) / np.maximum(sides / 4, 1.0)
        shifts = np.asarray([max_shift(time - t.last_time) for t in self._live])
        allowed = (iou >= self.iou_threshold) | (distance <= shifts[None, :])
        # a pair not allowed costs more than all allowed ones together (so as many allowed pairs as
        # possible are made), and is dropped afterwards
        forbidden = 1.0 + float(distance[allowed].sum())
        rows, cols = linear_sum_assignment(np.where(allowed, distance, forbidden))
        return {int(r): self._live[int(c)] for r, c in zip(rows, cols, strict=True) if allowed[r, c]}

    def _steady(self, track: _Track) -> tuple[float, tuple[float, float] | None]:
        ages = np.asarray(track.ages)
        centre = float(np.median(ages))
        lows, highs = np.asarray(track.lows), np.asarray(track.highs)
        known = np.isfinite(lows) & np.isfinite(highs)
        if not known.any():
            return centre, None
        lower = float(np.median((ages - lows)[known]))  # median distance from the age to each bound
        upper = float(np.median((highs - ages)[known]))
        sd = (lower + upper) / 2 / self._z  # per-frame standard deviation
        if sd <= 0:
            return centre, (centre - lower, centre + upper)
        spread = MAD_TO_SD * float(np.median(np.abs(ages - centre)))  # frame-to-frame part
        person = max(sd**2 - spread**2, 0.0)  # the part every frame shares
        seconds = track.times[-1] - track.times[0]
        n = min(len(ages), 1 + seconds / self.independent_every) if self.independent_every > 0 else len(ages)
        scale = math.sqrt((person + spread**2 / n) / sd**2)
        return centre, (centre - scale * lower, centre + scale * upper)

    def _summary(self, track: _Track) -> TrackSummary:
        age, interval = self._steady(track)
        return TrackSummary(track.track_id, track.first_time, track.last_time, track.frames, age, interval)
