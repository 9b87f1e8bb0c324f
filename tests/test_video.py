"""Videos: the face tracker and its steady ages, frame strides, the video pipeline on short clips made
from the shared photos, and `age-detect predict` on videos (outputs, annotated MP4, broken files)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from age_detect_resnet.cli.predict import expand_inputs
from age_detect_resnet.cli.predict import main as predict_main
from age_detect_resnet.faces.detection import box_iou
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.inference.predictor import FacePrediction
from age_detect_resnet.video.reader import Stride, VideoReadError, frame_time, probe_video, read_frames
from age_detect_resnet.video.tracking import MAX_SHIFT, FaceTracker, max_missed_for, max_shift
from conftest import TEST_IMAGES, YUNET, require

CLIP_FPS = 10
CLIP_FRAMES = 25  # 2.5 s


def face(box, age=40.0, interval=None) -> FacePrediction:
    return FacePrediction(0, tuple(box), tuple(box), 0.9, age, interval)


def make_clip(
    path: Path, photos: list[str], *, size=(320, 240), frames=CLIP_FRAMES, fourcc="mp4v", hidden=range(0)
):
    """A clip of the photos side by side, each shrunk into its slot and drifting a few pixels per frame
    (so that every frame is a slightly different picture), the frames in `hidden` empty; returns the
    photos as they appear in it."""
    width, height = size
    slot = width // len(photos)
    thumbs = []
    for name in photos:
        photo = load_rgb(require(TEST_IMAGES / name))
        scale = min(slot * 0.9 / photo.width, height * 0.85 / photo.height)
        thumbs.append(photo.resize((round(photo.width * scale), round(photo.height * scale))))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), CLIP_FPS, size)
    for i in range(frames):
        canvas = Image.new("RGB", size, (120, 120, 120))
        for k, thumb in enumerate(thumbs if i not in hidden else []):
            x = k * slot + (slot - thumb.width) // 2 + (i % 5) - 2
            canvas.paste(thumb, (x, (height - thumb.height) // 2 + i // 8 - 1))
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()
    return thumbs


def make_variable_rate_clip(path: Path, photos: list[str], *, fast: int, slow: int) -> None:
    """A clip as a phone records one: `fast` frames 0.1 s apart, then `slow` frames 1 s apart. OpenCV
    writes MP4s at a constant rate, so the clip's sample durations (its `stts` box) are rewritten, and
    its edit list (`edts`, which would cut it at the old duration) dropped; the boxes holding them are
    resized. Their frames (`mdat`) come before them, so no offset into the file changes."""
    make_clip(path, photos, frames=fast + slow)
    data = path.read_bytes()

    def rewrite(start: int, end: int) -> bytes:
        out = b""
        while start < end:
            size, kind = struct.unpack(">I4s", data[start : start + 8])
            box = data[start : start + size]
            if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                body = rewrite(start + 8, start + size)
                box = struct.pack(">I4s", len(body) + 8, kind) + body
            elif kind == b"edts":
                box = b""
            elif kind == b"stts":
                (entries, _, delta) = struct.unpack(">III", box[12:24])  # one entry: all frames alike
                assert entries == 1
                body = box[8:12] + struct.pack(">IIIII", 2, fast, delta, slow, 10 * delta)
                box = struct.pack(">I4s", len(body) + 8, kind) + body
            out += box
            start += size
        return out

    assert data.index(b"mdat") < data.index(b"moov")
    path.write_bytes(rewrite(0, len(data)))


def frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("clips")
    one = make_clip(folder / "obama.mp4", ["obama.jpg"])
    two = make_clip(folder / "pair.mp4", ["obama.jpg", "biden.jpg"], size=(480, 240))
    return {"one": folder / "obama.mp4", "one_faces": one, "two": folder / "pair.mp4", "two_faces": two}


@pytest.fixture(scope="module")
def predictor():
    from age_detect_resnet.faces.detection import create_detector
    from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model

    return AgePredictor(
        load_trained_model("default", "cpu"), detector=create_detector("yunet", require(YUNET))
    )


# --- tracker (no model) ---------------------------------------------------------------------------------


def test_box_iou_of_identical_disjoint_and_half_overlapping_boxes():
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]], dtype=float)
    assert box_iou(a, b)[0] == pytest.approx([1.0, 0.0, 1 / 3])


def test_faces_follow_their_tracks_by_overlap_and_a_far_face_starts_a_new_one():
    tracker = FaceTracker()
    first = tracker.update([face((0, 0, 100, 100), 30), face((300, 0, 400, 100), 60)], 0.0)
    # given in the other order, moved a little: each keeps its id
    second = tracker.update([face((310, 5, 410, 105), 61), face((8, 4, 108, 104), 31)], 0.1)
    assert [t.track_id for t in first] == [1, 2]
    assert [t.track_id for t in second] == [2, 1]
    assert [t.frames for t in second] == [2, 2]
    third = tracker.update([face((600, 0, 700, 100))], 0.2)  # overlaps no track
    assert third[0].track_id == 3


def test_a_track_survives_a_short_gap_and_ends_after_max_missed_seconds():
    tracker = FaceTracker(max_missed=1.0)
    tracker.update([face((0, 0, 100, 100))], 0.0)
    assert tracker.update([face((2, 0, 102, 100))], 0.9)[0].track_id == 1  # 0.9 s unseen: same person
    tracker.update([], 1.5)
    assert tracker.update([face((2, 0, 102, 100))], 2.0)[0].track_id == 2  # 1.1 s unseen: ended
    summaries = tracker.summaries()
    assert [(s.track_id, s.first_time, s.last_time, s.frames) for s in summaries] == [
        (1, 0.0, 0.9, 2),
        (2, 2.0, 2.0, 1),
    ]


def test_frames_sampled_far_apart_keep_a_track_through_two_missed_frames():
    assert max_missed_for(0.2) == 1.0  # 5 frames a second: a second, as before
    tracker = FaceTracker(max_missed=max_missed_for(2.0))  # --fps 0.5
    assert tracker.update([face((0, 0, 100, 100))], 0.0)[0].track_id == 1
    assert tracker.update([face((2, 0, 102, 100))], 2.0)[0].track_id == 1
    tracker.update([], 4.0)
    tracker.update([], 6.0)
    assert tracker.update([face((2, 0, 102, 100))], 8.0)[0].track_id == 1  # two frames missed
    for time in (10.0, 12.0, 14.0):
        tracker.update([], time)
    assert tracker.update([face((2, 0, 102, 100))], 16.0)[0].track_id == 2  # three: ended


def test_two_people_crossing_keep_their_ids():
    # A walks right along the top, B walks left lower down; their boxes overlap while they pass,
    # but each box overlaps its own previous box more than the other person's.
    tracker = FaceTracker()
    ids = []
    for step in range(30):
        a = face((10 * step, 0, 10 * step + 100, 100), 25)
        b = face((290 - 10 * step, 60, 390 - 10 * step, 160), 70)
        ids.append([t.track_id for t in tracker.update([a, b], step / 10)])
    assert ids == [[1, 2]] * 30
    assert [round(s.age) for s in tracker.summaries()] == [25, 70]


def test_a_face_walking_past_at_5_frames_a_second_stays_one_track():
    """An 87-pixel face moving 60 pixels between sampled frames overlaps its last box by IoU 0.18: with
    overlap alone each sighting was a new track (22 tracks for one person crossing a 1280-pixel frame)."""
    tracker = FaceTracker()
    ids = {
        tracker.update([face((60 * step, 40, 60 * step + 87, 150))], step / 5)[0].track_id
        for step in range(20)
    }
    assert ids == {1}


def test_the_shift_a_face_may_make_grows_with_the_time_since_its_track_was_seen():
    assert max_shift(0.1) < max_shift(0.2) < max_shift(0.25) == max_shift(10.0) == MAX_SHIFT
    tracker = FaceTracker()
    tracker.update([face((0, 0, 100, 100))], 0.0)
    assert (
        tracker.update([face((120, 0, 220, 100))], 0.1)[0].track_id == 2
    )  # 1.2 sizes in 0.1 s: someone else
    tracker = FaceTracker()
    tracker.update([face((0, 0, 100, 100))], 0.0)
    tracker.update([], 0.1)  # missed once
    assert tracker.update([face((120, 0, 220, 100))], 0.2)[0].track_id == 1  # 1.2 sizes in 0.2 s
    tracker.update([], 0.4)
    assert tracker.update([face((300, 0, 400, 100))], 0.9)[0].track_id == 2  # 1.8 sizes: never, however late


def test_two_faces_side_by_side_moving_fast_keep_their_ids_one_face_to_one_track():
    # 100-pixel faces 150 pixels apart, both moving 90 pixels (0.9 sizes) between frames: the left face
    # is then nearer the right one's last box (0.6) than its own, but the right face can continue no
    # other track, and each track takes one face.
    tracker = FaceTracker()
    for step in range(10):
        x = 90 * step
        faces = [face((x, 0, x + 100, 100), 30), face((x + 150, 0, x + 250, 100), 60)]
        assert [t.track_id for t in tracker.update(faces, step / 5)] == [1, 2]
    # the left one missed: the right one keeps its own id, and the left one's when it is back
    assert [t.track_id for t in tracker.update([face((990, 0, 1090, 100))], 2.0)] == [2]
    again = [face((910, 0, 1010, 100)), face((990, 0, 1090, 100))]
    assert [t.track_id for t in tracker.update(again, 2.2)] == [1, 2]


def test_two_people_crossing_at_the_same_height_keep_their_ids_through_the_frames_one_hides_the_other():
    """Both faces 100 pixels wide, 46 pixels nearer each other each frame; while they overlap only the
    one in front (B) is found. After they pass, each is nearer the other's last box: where each would
    have gone on to decides (by nearness to the last boxes, A and B swapped ids)."""
    tracker = FaceTracker()
    seen = []
    for step in range(20):
        a, b = 46 * step, 900 - 46 * step
        faces = [face((b, 0, b + 100, 100), 70)] + (
            [face((a, 0, a + 100, 100), 25)] if abs(a - b) > 100 else []
        )
        seen += [
            (round(f.age), t.track_id) for f, t in zip(faces, tracker.update(faces, step / 5), strict=True)
        ]
    assert {(age, track_id) for age, track_id in seen} == {(70, 1), (25, 2)}
    assert [round(s.age) for s in tracker.summaries()] == [70, 25]


def test_steady_age_is_the_median_and_ignores_a_wild_frame():
    tracker = FaceTracker()
    ages = [40, 41, 39, 40, 95, 40, 41]
    for i, age in enumerate(ages):
        tracked = tracker.update([face((0, 0, 100, 100), age)], i / 5)[0]
    assert tracked.age == 41  # this frame's own age
    assert tracked.steady_age == pytest.approx(40)
    assert tracker.summaries()[0].age == pytest.approx(40)


def test_identical_frames_keep_the_frame_interval_and_varied_frames_narrow_it():
    # Per-frame 80% interval +-12.8 years: a per-frame standard deviation of 10.
    same, varied = FaceTracker(), FaceTracker()
    rng = np.random.default_rng(0)
    for i in range(200):
        time = i / 5  # 5 frames a second: each frame counts as independent
        same.update([face((0, 0, 100, 100), 40.0, (40 - 12.8, 40 + 12.8))], time)
        age = 40 + 6 * rng.standard_normal()  # frames disagree with a spread of 6
        varied.update([face((0, 0, 100, 100), age, (age - 12.8, age + 12.8))], time)
    low, high = same.summaries()[0].interval
    assert (low, high) == pytest.approx((27.2, 52.8), abs=0.01)  # a still picture: nothing new to learn
    low, high = varied.summaries()[0].interval
    # the person's part sqrt(10^2 - 6^2) = 8 remains: +-10.3, not 12.8 and not 12.8 / sqrt(200)
    assert 2 * 9 < high - low < 2 * 11.5
    assert low < varied.summaries()[0].age < high


def test_consecutive_frames_a_fraction_of_a_second_apart_count_as_one_look():
    fast, slow = FaceTracker(), FaceTracker()
    ages = [30, 40, 50, 35, 45] * 6
    for i, age in enumerate(ages):
        interval = (age - 12.8, age + 12.8)
        fast.update([face((0, 0, 100, 100), age, interval)], i / 100)  # 0.3 s in all
        slow.update([face((0, 0, 100, 100), age, interval)], i / 2)  # 15 s in all
    fast_low, fast_high = fast.summaries()[0].interval
    slow_low, slow_high = slow.summaries()[0].interval
    assert slow_high - slow_low < fast_high - fast_low


def test_a_model_without_intervals_gives_none_and_memory_per_track_is_bounded():
    tracker = FaceTracker(window=50)
    for i in range(500):
        tracked = tracker.update([face((0, 0, 100, 100), 20.0 if i < 450 else 60.0)], i / 10)[0]
    assert tracked.interval is None and tracked.frames == 500
    assert tracked.steady_age == 60.0  # the window holds only the 50 newest ages
    assert tracker.summaries()[0].as_dict()["frames"] == 500


def test_times_going_backwards_are_refused():
    tracker = FaceTracker()
    tracker.update([], 1.0)
    with pytest.raises(ValueError, match="must not go back"):
        tracker.update([], 0.5)


# --- reading ----------------------------------------------------------------------------------------------


def test_stride_every_n_frames_or_a_target_rate():
    assert [i for i in range(13) if Stride(30, every=4).keeps(i)] == [0, 4, 8, 12]
    assert [i for i in range(31) if Stride(30, fps=5).keeps(i)] == [0, 6, 12, 18, 24, 30]
    assert Stride(30, fps=5).count(300) == 50 and Stride(30, fps=5).rate == 5
    assert Stride(29.97, fps=10).count(2997) == 1000
    assert Stride(10, fps=25).count(30) == 30 and Stride(10, fps=25).rate == 10  # never above the video's
    assert Stride(10).count(30) == 30
    with pytest.raises(ValueError, match="not both"):
        Stride(30, every=2, fps=5)


def test_read_frames_yields_the_sampled_frames_with_their_times(clips):
    frames = [(i, t, image.size) for i, t, image in read_frames(clips["one"], every=3)]
    assert [i for i, _, _ in frames] == list(range(0, CLIP_FRAMES, 3))
    assert frames[1][1] == pytest.approx(0.3)
    assert frames[0][2] == (320, 240)
    assert len(list(read_frames(clips["one"], fps=4))) == 10  # 2.5 s at 4 a second


def test_a_variable_frame_rate_video_gives_each_frame_its_own_time_and_is_sampled_by_time(tmp_path):
    """Frames 0.1 s apart, then 1 s apart: the header's rate is the average (2.5 a second), and index /
    average rate put frame 6 at 2.4 s instead of 0.6 s; --fps 5 kept every frame as the average is below
    5, though the first 2 s have 10 a second."""
    clip = tmp_path / "phone.mp4"
    make_variable_rate_clip(clip, ["obama.jpg"], fast=20, slow=10)
    assert probe_video(clip).fps == pytest.approx(30 / 12)
    times = {index: time for index, time, _ in read_frames(clip)}
    assert times[6] == pytest.approx(0.6) and times[19] == pytest.approx(1.9)
    assert times[20] == pytest.approx(2.0) and times[29] == pytest.approx(11.0)
    sampled = [(index, round(time, 3)) for index, time, _ in read_frames(clip, fps=5)]
    assert sampled == [(i, i / 10) for i in range(0, 20, 2)] + [(i, i - 18.0) for i in range(20, 30)]
    assert [index for index, _, _ in read_frames(clip, every=4)] == list(range(0, 30, 4))  # by frame


def test_frames_without_usable_timestamps_are_timed_by_the_header_rate():
    class Capture:  # what OpenCV says of the frame just grabbed
        def __init__(self, ms):
            self.ms = ms

        def get(self, prop):
            assert prop == cv2.CAP_PROP_POS_MSEC
            return self.ms

    times = [0.0]
    # none (0), then a real one, one going back, one not after the previous time
    for index, ms in enumerate([0, 0, 0, 500, 400, 600, math.nan]):
        times.append(frame_time(Capture(ms), index, times[-1], 10))
    assert times[1:] == pytest.approx([0, 0.1, 0.2, 0.5, 0.6, 0.7, 0.8])


def test_broken_videos_raise_an_error_naming_the_file(tmp_path, clips):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated_mp4 = tmp_path / "cut.mp4"
    truncated_mp4.write_bytes(clips["one"].read_bytes()[: clips["one"].stat().st_size // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    for path in (garbage, truncated_mp4, tmp_path / "empty.mp4", tmp_path / "missing.mp4"):
        with pytest.raises(VideoReadError, match=str(path)):
            list(read_frames(path))
    assert issubclass(VideoReadError, ImageReadError)  # the CLI skips it like a bad photo


def test_a_video_ending_before_its_declared_frames_is_reported_as_truncated(tmp_path):
    # AVI keeps its header at the front, so a cut file opens and then stops early.
    whole = tmp_path / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert len(list(read_frames(whole))) == 30
    with pytest.raises(VideoReadError, match=r"cut\.avi ends after \d+ of the 30 frames"):
        list(read_frames(cut))


# --- the pipeline -----------------------------------------------------------------------------------------


def test_one_face_gives_one_track_whose_steady_age_matches_the_photo(predictor, clips, tmp_path):
    from age_detect_resnet.video.process import predict_video

    photo_age = predictor.predict_image(clips["one_faces"][0])[0].age
    out = tmp_path / "annotated.mp4"
    result = predict_video(predictor, clips["one"], every=1, annotate_to=out, progress=False)
    assert result.frames == CLIP_FRAMES and len(result.faces) == CLIP_FRAMES
    assert [t.track_id for t in result.tracks] == [1]
    track = result.tracks[0]
    assert track.frames == CLIP_FRAMES and track.last_time == pytest.approx(2.4)
    assert abs(track.age - photo_age) < 3
    assert track.interval[0] < track.age < track.interval[1]
    assert frame_count(out) == CLIP_FRAMES
    annotated = next(read_frames(out))[2]
    first = next(read_frames(clips["one"]))[2]
    assert np.abs(np.asarray(annotated, float) - np.asarray(first, float)).max() > 100  # boxes drawn


@pytest.mark.parametrize("stride", [{"fps": 0.5}, {"every": 20}])
def test_a_still_face_sampled_seconds_apart_stays_one_track(predictor, tmp_path, stride):
    """--fps 0.5 (or --every 20 of a 10 fps clip): frames 2 s apart, the face missing from one of them;
    a fixed 1 s limit made each sighting a track of its own."""
    from age_detect_resnet.video.process import predict_video

    clip = tmp_path / "still.mp4"
    make_clip(clip, ["obama.jpg"], frames=70, hidden=range(20, 40))  # 7 s, no face at 2-4 s
    result = predict_video(predictor, clip, **stride, progress=False)
    assert result.frames == 4 and len(result.faces) == 3  # frames 0, 20 (empty), 40, 60
    assert [(t.track_id, t.frames, t.first_time, t.last_time) for t in result.tracks] == [(1, 3, 0.0, 6.0)]


def test_two_faces_side_by_side_give_two_steady_tracks(predictor, clips):
    from age_detect_resnet.video.process import predict_video

    photo_ages = [predictor.predict_image(thumb)[0].age for thumb in clips["two_faces"]]
    result = predict_video(predictor, clips["two"], fps=5, progress=False)
    assert result.frames == 13  # 2.5 s at 5 a second, from a 10 fps clip
    assert [t.frames for t in result.tracks] == [13, 13]
    left = {f.track.track_id for f in result.faces if f.face.box[0] < 240}
    assert len(left) == 1  # the left face is one track throughout
    by_side = sorted(
        result.tracks,
        key=lambda t: next(f.face.box[0] for f in result.faces if f.track.track_id == t.track_id),
    )
    # The clip's faces are ~100 px, re-encoded as MP4: their ages differ from the sharp thumbnail's (up to
    # 4.4 years for Biden with the bundled model and the upright re-detection, 3.x without it).
    for track, photo_age in zip(by_side, photo_ages, strict=True):
        assert abs(track.age - photo_age) < 5


def test_detection_on_a_smaller_copy_maps_boxes_and_landmarks_back_to_the_frame(predictor, clips):
    from age_detect_resnet.faces.detection import with_max_side

    frame = next(read_frames(clips["two"]))[2]  # 480 x 240
    full = sorted(with_max_side(predictor.detector, None).detect(frame), key=lambda f: f.box[0])
    scaled = with_max_side(predictor.detector, 320)
    small = sorted(scaled.detect(frame), key=lambda f: f.box[0])
    assert scaled.max_side == 320 and predictor.detector.max_side != 320  # the original keeps its own
    assert len(full) == len(small) == 2
    for a, b in zip(full, small, strict=True):
        assert np.abs(np.subtract(a.box, b.box)).max() < 4
        assert np.abs(np.subtract(a.landmarks, b.landmarks)).max() < 4


@pytest.mark.parametrize(("detect_side", "looked_at"), [(None, 640), (320, 320), (0, None)])
def test_detect_side_0_looks_at_the_full_frame(predictor, clips, detect_side, looked_at):
    """0 kept the detector's own 640 px (the README and --help say full size): small faces in a
    1920-pixel frame were never found."""
    import copy

    from age_detect_resnet.video.process import predict_video

    class Recording:  # the longer side each look was made at; copies (with_max_side) share the record
        name = "recording"

        def __init__(self):
            self.max_side, self.seen = 640, set()

        def detect(self, image):
            self.seen.add(self.max_side)
            return []

    recording = Recording()
    mine = copy.copy(predictor)
    mine.detector = recording
    predict_video(mine, clips["one"], every=10, detect_max_side=detect_side, progress=False)
    assert recording.seen == {looked_at}


# --- the CLI ----------------------------------------------------------------------------------------------


def test_predict_cli_writes_frame_rows_tracks_csv_and_annotated_video(clips, tmp_path, capsys):
    out = tmp_path / "ages.csv"
    status = predict_main(
        [str(clips["two"]), "--every", "2", "--output", str(out), "--annotate", str(tmp_path / "ann")]
    )
    assert status == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\ttrack " in line]
    assert len(lines) == 2 and all("13 frames" in line for line in lines)
    rows = pd.read_csv(out)
    assert list(rows.columns[:4]) == ["path", "frame", "time", "track_id"]
    assert {"steady_age", "steady_low", "steady_high", "age_low"} <= set(rows.columns)
    assert len(rows) == 26 and sorted(rows["frame"].unique()) == list(range(0, CLIP_FRAMES, 2))
    tracks = pd.read_csv(tmp_path / "ages_tracks.csv")
    assert list(tracks["track_id"]) == [1, 2] and list(tracks["frames"]) == [13, 13]
    # a track's last per-frame row carries the steady age its summary reports
    last = rows[rows["track_id"] == 1].iloc[-1]
    assert last["steady_age"] == pytest.approx(tracks["age"][0], abs=0.01)
    assert frame_count(tmp_path / "ann" / "pair_ages.mp4") == 13


def test_predict_cli_json_and_a_mixed_folder_with_a_broken_video(clips, tmp_path, caplog):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(clips["one"], folder / "sub" / "clip.mp4")
    shutil.copy(require(TEST_IMAGES / "obama2.jpg"), folder / "portrait.jpg")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(3000))
    (folder / "notes.txt").write_text("not an input")
    assert sorted(p.name for p in expand_inputs([str(folder)])[0]) == [
        "broken.mp4",
        "clip.mp4",
        "portrait.jpg",
    ]

    out = tmp_path / "ages.json"
    csv = tmp_path / "ages.csv"
    assert predict_main([str(folder), "--output", str(out)]) == 1
    assert f"{folder / 'broken.mp4'} is not a video" in caplog.text
    document = {Path(entry["path"]).name: entry for entry in json.loads(out.read_text())}
    assert document["portrait.jpg"]["faces"] and document["portrait.jpg"]["error"] is None
    clip = document["clip.mp4"]
    assert clip["video"]["sampled_frames"] == 13 and clip["video"]["fps"] == CLIP_FPS  # default --fps 5
    assert len(clip["tracks"]) == 1 and len(clip["faces"]) == 13 and clip["error"] is None
    # each face has its landmarks, as a photo's face has (they were left out)
    row = clip["faces"][0]
    assert list(row["landmarks"]) == list(document["portrait.jpg"]["faces"][0]["landmarks"])
    assert all(
        row["x1"] <= x <= row["x2"] and row["y1"] <= y <= row["y2"] for x, y in row["landmarks"].values()
    )
    assert document["broken.mp4"]["error"] and document["broken.mp4"]["faces"] == []

    assert predict_main([str(folder), "--output", str(csv), "--every", "5"]) == 1
    rows = pd.read_csv(csv)
    photo = rows[rows["path"].str.endswith("portrait.jpg")]
    assert len(photo) == 1 and photo["frame"].isna().all()  # photo rows leave the video columns empty
    assert len(rows) == 1 + 5
    # ... and the video rows' whole numbers stay whole: 20, not 20.0
    text = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("path")
    video = text.drop(str(folder / "portrait.jpg"))
    assert list(video["frame"]) == ["0", "5", "10", "15", "20"]
    assert set(video["track_id"]) == {"1"} and list(video["track_frames"]) == ["1", "2", "3", "4", "5"]
    assert text.loc[str(folder / "portrait.jpg"), ["frame", "track_id", "track_frames"]].tolist() == [""] * 3


def test_folders_give_every_video_suffix_opencv_reads_and_not_macos_appledouble_files(clips, tmp_path):
    folder = tmp_path / "card"
    folder.mkdir()
    suffixes = (".3gp", ".MTS", ".m2ts", ".ts", ".flv", ".ogv", ".mp4")
    for suffix in suffixes:
        shutil.copy(clips["one"], folder / f"clip{suffix}")  # OpenCV goes by the content, not the name
    # AppleDouble files (Finder metadata a Mac leaves beside each file on a USB stick) are no photos
    appledouble = b"\x00\x05\x16\x07" + bytes(4000)
    for name in ("._clip.mp4", "._obama.jpg"):
        (folder / name).write_bytes(appledouble)
    found, problems = expand_inputs([str(folder)])
    assert sorted(p.name for p in found) == sorted(f"clip{suffix}" for suffix in suffixes) and not problems
    # ... named on the command line, one is read like any file (and fails as not a photo)
    assert expand_inputs([str(folder / "._obama.jpg")])[0] == [folder / "._obama.jpg"]

    (folder / "clip.mp4").unlink()
    for suffix in suffixes[1:-1]:
        (folder / f"clip{suffix}").unlink()
    assert predict_main([str(folder), "--every", "10"]) == 0  # clip.3gp, as a video


def test_predict_cli_annotates_videos_sharing_a_stem_into_distinct_files(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    make_clip(folder / "clip.mp4", ["obama.jpg"])
    make_clip(folder / "clip.avi", ["biden.jpg"], fourcc="MJPG")
    out = tmp_path / "out"
    assert predict_main([str(folder), "--every", "10", "--annotate", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip_avi_ages.mp4", "clip_mp4_ages.mp4"]
    assert all(frame_count(p) == 3 for p in out.iterdir())


@pytest.mark.parametrize(
    "stride", [["--every", "0"], ["--fps", "1e-320"], ["--fps", "inf"], ["--fps", "nan"]]
)
def test_predict_cli_rejects_a_stride_no_video_can_have(clips, stride, caplog):
    """--fps 1e-320 passed as above 0, then overflowed computing the gap between sampled frames."""
    assert predict_main([str(clips["one"]), *stride]) == 2
    assert stride[0] in caplog.text


def test_ctrl_c_on_videos_says_they_are_not_kept_and_a_plain_rerun_starts(
    clips, tmp_path, monkeypatch, caplog
):
    """It said "interrupted after 0 of 0 photos; they are kept in ages.csv.partial: ... --resume", and
    left a journal of no photo that made a plain rerun refuse to start."""
    from age_detect_resnet.inference.predictor import AgePredictor

    def stopped(self, images):
        raise KeyboardInterrupt

    out = tmp_path / "ages.csv"
    args = [str(clips["one"]), "--every", "10", "--output", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(AgePredictor, "predict_images", stopped)
        assert predict_main(args) == 130
        assert "videos are not kept" in caplog.text and "photos" not in caplog.text
        assert not out.with_name("ages.csv.partial").exists()
        # without --output: one line too, not a traceback (KeyboardInterrupt went through)
        caplog.clear()
        assert predict_main(args[:-2]) == 130 and "interrupted; with --output FILE a run keeps" in caplog.text
    assert predict_main(args) == 0 and len(pd.read_csv(out)) == 3


def test_a_video_without_faces_suggests_full_frame_detection_only_where_its_frames_were_scaled(
    tmp_path, caplog
):
    """A 320-pixel clip is already searched at full size: --detect-side 0 could not help it."""
    clip = tmp_path / "empty.mp4"
    make_clip(clip, ["obama.jpg"], frames=6, hidden=range(6))  # grey frames, no face
    for side, hinted in (("640", False), ("160", True)):
        caplog.clear()
        assert predict_main([str(clip), "--every", "3", "--detect-side", side]) == 1
        assert "no face found in the 2 sampled frames" in caplog.text
        assert ("--detect-side 0" in caplog.text) == hinted, caplog.text
