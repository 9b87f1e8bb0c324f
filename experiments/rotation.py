"""How much a model's age moves when the photo is turned, or made smaller: the README's robustness
figures.

    python experiments/rotation.py                          # the five shared test photos, +-20 degrees
    python experiments/rotation.py --photos ../shared/data/real_photos/portraits --every 3 --angles 15
    python experiments/rotation.py --detector small-faces-look   # a second look at small faces only
    python experiments/rotation.py --detector previous      # YuNet's older, slower settings
    python experiments/rotation.py --upright-min-degrees 1.5
    python experiments/rotation.py --photos DIR --angles --scales 0.5 0.25   # resolution alone
    python experiments/rotation.py --photos DIR --angles --scales 0.5 --same-landmarks
    python experiments/rotation.py --photos DIR --angles --crops 0.7 0.55   # tighter face crops
    python experiments/rotation.py --photos DIR --test-of RUN --angles --crops 0.7   # its test split only
    python experiments/rotation.py --photos DIR --angles --grey --jpeg 20   # old scans, web copies

Each photo is predicted upright and turned by +-ANGLES degrees (bilinear, the canvas grown to hold it,
grey corners), shrunk to each of SCALES of its width and height (Lanczos), and cut to the central CROPS
of its width and height (a face crop made tighter, as pre-aligned face sets are), made grey (`--grey`, as
old scans are) and saved as JPEG at each of QUALITIES (`--jpeg`, as copies passed round the web are),
through `AgePredictor` with YuNet: the photo's subject (the face `evaluate` predicts for a labelled
photo, `subject_face`) and, in each changed copy, the face found where the subject's centre went (none
found there: not counted), so that a photo of several people compares one person's ages.
Prints, per photo (up to 12), the ages and their spread (highest minus lowest), and per change over all
photos (turns together, each scale alone) the mean, 90th percentile and largest |age(changed) -
age(original)|, and the mean signed change (> 0: older). With `--same-landmarks` a shrunk copy is aligned
with the original photo's face and landmarks scaled down instead of those the detector finds on the copy:
what the pixels alone change, so that the rest of the change is the landmarks'.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from age_detect_resnet.cli.common import positive_int
from age_detect_resnet.cli.predict import expand_inputs
from age_detect_resnet.data.dataset import pixels_to_input
from age_detect_resnet.faces.detection import (
    PREVIOUS_YUNET_SETTINGS,
    SMALL_FACES_LOOK_SETTINGS,
    Face,
    YuNetDetector,
    subject_face,
)
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction, load_trained_model
from age_detect_resnet.modeling.checkpoint import ModelFileError
from age_detect_resnet.run_folder import SavedSplit

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DETECTORS = {
    "default": {},
    "small-faces-look": SMALL_FACES_LOOK_SETTINGS,
    "previous": PREVIOUS_YUNET_SETTINGS,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="run folder, .safetensors or default (bundled)")
    parser.add_argument("--photos", type=Path, default=SHARED / "test_images")
    parser.add_argument("--every", type=positive_int, default=1, help="use every N-th photo (sorted by path)")
    parser.add_argument(
        "--test-of",
        type=Path,
        help="a run folder, or default (the bundled model's split): only the photos of its test split "
        "(split.csv, paths relative to --photos), which a model trained on that split has not seen",
    )
    parser.add_argument(
        "--angles", type=float, nargs="*", default=[20.0], help="degrees, each turned both ways"
    )
    parser.add_argument(
        "--scales", type=float, nargs="*", default=[], help="shares of the photo's size, e.g. 0.5 0.25"
    )
    parser.add_argument(
        "--crops", type=float, nargs="*", default=[], help="central shares of the photo kept, e.g. 0.7 0.55"
    )
    parser.add_argument("--grey", action="store_true", help="also the photo in greyscale")
    parser.add_argument(
        "--jpeg", type=int, nargs="*", default=[], help="JPEG qualities to save the photo at, e.g. 20"
    )
    parser.add_argument(
        "--same-landmarks",
        action="store_true",
        help="align shrunk copies with the original photo's landmarks scaled down (not their own)",
    )
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="default")
    parser.add_argument(
        "--upright-min-degrees",
        type=float,
        help="YuNet's threshold for an upright pass (default: the detector's)",
    )
    parser.add_argument(
        "--detector-model", type=Path, default=SHARED / "models" / "face_detection_yunet.onnx"
    )
    args = parser.parse_args(argv)
    if not args.angles and not args.scales and not args.crops and not args.grey and not args.jpeg:
        parser.error("nothing to change: give --angles, --scales, --crops, --grey and/or --jpeg")
    if any(not 1 <= quality <= 95 for quality in args.jpeg):
        parser.error("--jpeg qualities are between 1 and 95")
    if any(not 0 < share < 1 for share in args.scales + args.crops):
        parser.error("--scales and --crops are shares of the photo's size, between 0 and 1")
    if not args.detector_model.is_file():
        parser.error(f"{args.detector_model} does not exist: pass --detector-model FILE (YuNet's ONNX file)")
    if not args.photos.exists():
        parser.error(f"{args.photos} does not exist: pass --photos FOLDER (or a photo)")
    photos, problems = expand_inputs([str(args.photos)])
    if problems or not photos:
        parser.error("; ".join(problems) or f"no photos in {args.photos}")
    if args.test_of is not None:
        photos = test_photos(photos, args.photos, args.test_of, parser)
    photos = photos[:: args.every]
    settings = dict(DETECTORS[args.detector])
    if args.upright_min_degrees is not None:
        settings["upright_min_degrees"] = args.upright_min_degrees
    detector = YuNetDetector(args.detector_model, **settings)
    try:
        model = load_trained_model(args.model, "cpu")
    except ModelFileError as err:
        parser.error(str(err))
    predictor = AgePredictor(model, detector=detector)
    shrinks = {
        f"shrunk to {scale:g} of their size"
        + (", the original's landmarks" if args.same_landmarks else ""): [
            lambda image, scale=scale: shrink(image, scale)
        ]
        for scale in args.scales
    }
    changes: dict[str, list[Callable[[Image.Image], Changed]]] = {
        f"turned by +-{', '.join(f'{a:g}' for a in args.angles)} degrees": [
            lambda image, angle=sign * angle: turn(image, angle) for angle in args.angles for sign in (1, -1)
        ],
        **shrinks,
        **{
            f"cut to the central {share:g} of their size": [lambda image, share=share: cut(image, share)]
            for share in args.crops
        },
        "in greyscale": [lambda image: (image.convert("L").convert("RGB"), lambda x, y: (x, y))]
        if args.grey
        else [],
        **{
            f"saved as JPEG at quality {quality}": [lambda image, quality=quality: jpeg(image, quality)]
            for quality in args.jpeg
        },
    }
    changes = {name: functions for name, functions in changes.items() if functions}
    moves: dict[str, list[float]] = {name: [] for name in changes}
    rows = []
    for path in photos:
        original = load_rgb(path)
        face = subject(predictor.predict_image(original), original.size)
        base = face.age if face is not None else None
        # The original's landmarks, found once for all its shrunk copies.
        landmarks_of = None
        if args.same_landmarks and face is not None:
            landmarks_of = subject_face(detector.detect(original), original.size)
        changed = {}
        for name, functions in changes.items():
            copies = [f(original) for f in functions]
            if args.same_landmarks and name in shrinks and face is not None:
                changed[name] = [
                    age_with_landmarks(predictor, copy, original, landmarks_of) for copy, _ in copies
                ]
            else:
                changed[name] = [same_face_age(predictor, copy, face, where) for copy, where in copies]
        ages = [base] + [a for per in changed.values() for a in per]
        known = [a for a in ages if a is not None]
        if base is None or len(known) < 2:
            rows.append(f"{path.name}: no face in the original or in any changed copy")
            continue
        for name, per in changed.items():
            moves[name] += [a - base for a in per if a is not None]
        rows.append(
            f"{path.name}: ages {', '.join(f'{a:.1f}' for a in known)}; spread {max(known) - min(known):.2f}"
        )
    print("\n".join(rows[:12] + ([f"... {len(rows) - 12} more"] if len(rows) > 12 else [])))
    for name, signed in moves.items():
        if signed:
            found = np.abs(signed)
            print(
                f"{len(photos)} photos {name} ({args.detector} detector): |age change| mean "
                f"{np.mean(found):.2f}, 90th percentile {np.percentile(found, 90):.2f}, "
                f"largest {max(found):.2f} years; signed mean {np.mean(signed):+.2f}"
            )
    return 0


# A changed copy of a photo, and where a point (x, y) of the original lies in it.
Changed = tuple[Image.Image, Callable[[float, float], tuple[float, float]]]


def turn(image: Image.Image, angle: float) -> Changed:
    """The photo turned counter-clockwise by `angle` degrees about its centre, on a canvas grown to hold
    it (grey corners)."""
    turned = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128,) * 3)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def where(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - image.width / 2, y - image.height / 2  # y points down: counter-clockwise is (c, -s)
        return turned.width / 2 + dx * cos + dy * sin, turned.height / 2 - dx * sin + dy * cos

    return turned, where


def shrink(image: Image.Image, scale: float) -> Changed:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sx, sy = size[0] / image.width, size[1] / image.height
    return image.resize(size, Image.Resampling.LANCZOS), lambda x, y: (x * sx, y * sy)


def jpeg(image: Image.Image, quality: int) -> Changed:
    """The photo saved as JPEG at `quality` and read back."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), lambda x, y: (x, y)


def test_photos(photos: list, root: Path, model: Path, parser: argparse.ArgumentParser) -> list:
    """The photos listed in the test split `model` was trained with (paths relative to `root`)."""
    saved = SavedSplit.of(model)
    if saved is None:
        parser.error(f"{model} saved no split: --test-of needs a run folder with its split.csv, or default")
    tested = {(root / path).resolve() for path in saved.paths("test")}
    kept = [photo for photo in photos if Path(photo).resolve() in tested]
    if not kept:
        parser.error(f"none of the photos in {root} is in the test split of {saved.owner}")
    return kept


def subject(faces: list[FacePrediction], size: tuple[int, int]) -> FacePrediction | None:
    """The prediction of the face the photo is of, by `subject_face` (as `evaluate` chooses), or None."""
    detected = [Face(f.box, f.detector_score or 0.0, None) for f in faces]
    chosen = subject_face(detected, size)
    return None if chosen is None else faces[detected.index(chosen)]


def cut(image: Image.Image, share: float) -> Changed:
    """The central `share` of the image's width and height."""
    margin_x, margin_y = image.width * (1 - share) / 2, image.height * (1 - share) / 2
    box = (round(margin_x), round(margin_y), round(image.width - margin_x), round(image.height - margin_y))
    return image.crop(box), lambda x, y: (x - box[0], y - box[1])


def same_face_age(
    predictor: AgePredictor,
    copy: Image.Image,
    face: FacePrediction | None,
    where: Callable[[float, float], tuple[float, float]],
) -> float | None:
    """The age of the face in `copy` whose box holds the point where the centre of `face` (found on the
    original) went, the nearest to it where several do; None where none does."""
    if face is None:
        return None
    x, y = where((face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2)
    holding = [
        f for f in predictor.predict_image(copy) if f.box[0] <= x <= f.box[2] and f.box[1] <= y <= f.box[3]
    ]
    if not holding:
        return None
    return min(
        holding, key=lambda f: math.dist((x, y), ((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2))
    ).age


def age_with_landmarks(
    predictor: AgePredictor, copy: Image.Image, original: Image.Image, face: Face | None
) -> float | None:
    """The age of `copy`, a resized `original`, aligned with the landmarks of `face` (found on the
    original) scaled to the copy; None where there are none (no face, a box-only detector)."""
    if face is None or face.landmarks is None:
        return None
    sx, sy = copy.width / original.width, copy.height / original.height
    scaled = Face(
        tuple(v * s for v, s in zip(face.box, (sx, sy, sx, sy), strict=True)),
        face.score,
        tuple((x * sx, y * sy) for x, y in face.landmarks),
    )
    pixels, _ = predictor.framing.crop(copy, scaled, predictor.image_size)
    return float(predictor.run([pixels_to_input(pixels)])["age"][0])


if __name__ == "__main__":
    sys.exit(main())
