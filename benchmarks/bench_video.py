"""Video throughput: 720p clips built from the shared photos (one face, four faces), every frame
predicted, the tracked pipeline against a naive per-frame loop, in one run.

    python benchmarks/bench_video.py                        # 60 frames per clip, the bundled model
    python benchmarks/bench_video.py --frames 300 --model runs/NAME

Paths (same model and runner precision, same YuNet detector, same decoded frames, stride 1):
* naive: each frame through `AgePredictor.predict_image` with a batch size of 1 (detector on the full
  1280 px frame, then the model once per face), no tracking;
* tracked, full-res detection: `video.process.predict_video` (faces of 8 frames share model batches,
  tracking and steady ages), detector as in the naive path;
* tracked, CLI default: the same with detection on a copy 640 px wide (`--detect-side 640`, the
  default of `age-detect predict` for photos and videos).
Frames/s include decoding the MP4 (and, for the tracked paths, tracking). "mean |age diff|" compares
each path's per-frame ages with the naive path's, face by face: what batching and the smaller detection
copy change in the predictions (bf16 batches differ slightly from batches of one).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import TEST_IMAGES, YUNET, machine, print_table
from PIL import Image

from age_detect_resnet.cli.common import positive_int
from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, TorchRunner, load_trained_model
from age_detect_resnet.video.process import predict_video
from age_detect_resnet.video.reader import read_frames

SIZE = (1280, 720)
PHOTOS = {1: ["obama.jpg"], 4: ["obama.jpg", "biden.jpg", "obama2.jpg", "obama3.jpg"]}


def make_clip(path: Path, photos: list[str], frames: int, fps: float = 30.0) -> None:
    """A 720p MP4 of the photos side by side, drifting a few pixels per frame like a handheld camera."""
    width, height = SIZE
    slot = width // len(photos)
    thumbs = []
    for name in photos:
        photo = load_rgb(TEST_IMAGES / name)
        scale = min(slot * 0.9 / photo.width, height * 0.8 / photo.height)
        thumbs.append(photo.resize((round(photo.width * scale), round(photo.height * scale))))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    for i in range(frames):
        canvas = Image.new("RGB", SIZE, (110, 115, 120))
        for k, thumb in enumerate(thumbs):
            dx, dy = round(6 * np.sin(i / 7)), round(4 * np.cos(i / 11))
            canvas.paste(
                thumb, (k * slot + (slot - thumb.width) // 2 + dx, (height - thumb.height) // 2 + dy)
            )
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()


def by_position(faces) -> list[float]:
    """A frame's ages left to right (the naive path's faces come in detector-score order)."""
    return [f.age for f in sorted(faces, key=lambda f: f.box[0])]


def age_difference(reference: list[list[float]], other: list[list[float]]) -> str:
    """Mean |difference| over faces found by both paths in the same frame (matched left to right)."""
    diffs = [
        abs(a - b)
        for r, o in zip(reference, other, strict=True)
        if len(r) == len(o)
        for a, b in zip(r, o, strict=True)
    ]
    return f"{np.mean(diffs):.2f}" if diffs else "n/a"


def tracked_ages(result) -> list[list[float]]:
    """Per sampled frame, its faces' own ages left to right."""
    ages = [[] for _ in range(result.frames)]
    for row in sorted(result.faces, key=lambda r: (r.frame, r.face.box[0])):
        ages[row.frame].append(row.face.age)
    return ages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="run folder, .safetensors or default (bundled)")
    parser.add_argument("--frames", type=positive_int, default=60, help="frames per clip (all predicted)")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="time the three paths in turn this many times and keep each one's fastest round "
        "(raise it on a busy machine)",
    )
    args = parser.parse_args()
    model = load_trained_model(args.model, "cpu")
    kind = "yunet" if YUNET.is_file() else "auto"
    detector = create_detector(kind, YUNET if YUNET.is_file() else None, max_side=None)  # full frames
    runner = TorchRunner(model)
    naive = AgePredictor(runner=runner, metadata=model.metadata, detector=detector, batch_size=1)
    tracked = AgePredictor(runner=runner, metadata=model.metadata, detector=detector)
    paths = {
        "naive: per frame, batch 1": None,
        "tracked, full-res detection": 0,
        "tracked, detection at 640 (CLI default)": 640,
    }

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count, photos in PHOTOS.items():
            clip = Path(folder) / f"faces{count}.mp4"
            make_clip(clip, photos, args.frames)
            naive.predict_image(next(read_frames(clip))[2])  # warm-up (oneDNN kernels, detector)
            predict_video(tracked, clip, every=1, progress=False)
            best = dict.fromkeys(paths, float("inf"))
            outcome = {}
            for _ in range(args.rounds):
                for label, side in paths.items():
                    start = time.perf_counter()
                    if side is None:
                        outcome[label] = [
                            by_position(naive.predict_image(im)) for _, _, im in read_frames(clip)
                        ]
                    else:
                        result = predict_video(tracked, clip, every=1, progress=False, detect_max_side=side)
                        outcome[label] = (tracked_ages(result), len(result.tracks))
                    best[label] = min(best[label], time.perf_counter() - start)
            reference = outcome["naive: per frame, batch 1"]
            for label in paths:
                ages, tracks = (reference, None) if label.startswith("naive") else outcome[label]
                rows.append(
                    [
                        f"{count} face(s)",
                        label + (f", {tracks} track(s)" if tracks is not None else ""),
                        f"{args.frames / best[label]:.1f}",
                        f"{best['naive: per frame, batch 1'] / best[label]:.2f}x",
                        age_difference(reference, ages),
                        sum(map(len, ages)),
                    ]
                )
    print_table(
        "Video, every frame predicted (bench_video.py)",
        ["clip", "path", "frames/s", "speed-up", "mean |age diff| vs naive", "faces found"],
        rows,
        machine=machine(torch.device("cpu")),
        settings=f"{model.backbone_name}, {model.metadata['image_size']} px, 1280x720 MP4, "
        f"{args.frames} frames per clip, best of {args.rounds} round(s), YuNet",
    )


if __name__ == "__main__":
    main()
