"""How old do you look? Run the trained model on your own photo.

    python check_your_age.py me.jpg                          # the model bundled with the package
    python check_your_age.py me.jpg --model runs/NAME --show  # your own run; also open the annotated photo

Prints the age of every face found, and saves the photo with boxes and ages next to it
(me_ages.jpg) or where --out says.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from age_detect_resnet.cli.common import DETECTOR_MODEL_HELP

if TYPE_CHECKING:
    from PIL import Image


class OutError(ValueError):
    """An --out the annotated photo cannot be saved as; the message says what to pass instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", type=Path)
    parser.add_argument(
        "--model",
        default="default",
        help="run folder, its best.safetensors, or default: the model bundled with the package (default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to save the annotated photo, e.g. me_ages.jpg (default: PHOTO_ages.jpg; missing "
        "folders are created)",
    )
    parser.add_argument("--show", action="store_true", help="open the annotated photo in an image viewer")
    parser.add_argument("--no-detect", action="store_true", help="the photo is already a face crop")
    parser.add_argument("--detector-model", type=Path, help=DETECTOR_MODEL_HELP)
    args = parser.parse_args(argv)
    try:
        return check_your_age(args)
    except KeyboardInterrupt:  # Ctrl-C while the model loads, say: one line, the shell's status for it
        print("interrupted", file=sys.stderr)
        return 130


def check_your_age(args: argparse.Namespace) -> int:
    # Imported here, not with the module: loading PyTorch takes seconds, and a Ctrl-C during them is
    # answered by `main` in one line like any other.
    from age_detect_resnet.faces.detection import DetectorUnavailableError, create_detector
    from age_detect_resnet.images import ImageReadError, load_rgb
    from age_detect_resnet.inference.annotate import age_label, draw_predictions
    from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
    from age_detect_resnet.modeling.checkpoint import ModelFileError
    from age_detect_resnet.runtime import select_device

    out = args.out or args.photo.with_name(f"{args.photo.stem}_ages.jpg")
    try:
        image = load_rgb(args.photo)  # first: a wrong file is named before the model and detector load
        image_format = out_format(args.photo, out)  # and a wrong --out, with its folder created
        device = select_device("auto")
        model = load_trained_model(args.model, device)
        detector = None if args.no_detect else create_detector("auto", args.detector_model)
        faces = AgePredictor(model, device=device, detector=detector, tta_flip=True).predict_image(image)
    except (ModelFileError, DetectorUnavailableError, ImageReadError, OutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not faces:
        print(
            f"no face found in {args.photo}; try a photo where the face is larger, or --no-detect",
            file=sys.stderr,
        )
        return 1
    for face in faces:
        print(f"face {face.face_index + 1}: you look {age_label(face)} years old")
    annotated = draw_predictions(image, faces)
    try:
        annotated.save(out, format=image_format, quality=92)
    except (OSError, ValueError) as err:  # a full disk, a folder made read-only since the check
        print(f"error: could not save the annotated photo to {out} ({err}); pass --out FILE", file=sys.stderr)
        return 2
    print(f"annotated photo: {out}")
    if args.show and not show(annotated):
        print(
            f"could not open an image viewer (none installed, or no display); the annotated photo is {out}",
            file=sys.stderr,
        )
    return 0


def out_format(photo: Path, out: Path) -> str:
    """The PIL format `out` is saved in, by its extension, once `out` is known to be a new or replaceable
    file in a folder that exists or could be made (made here, as `predict --annotate` makes its folder);
    else an `OutError` saying what to pass. Checked before the model loads, so that a wrong --out costs
    no wait."""
    from PIL import Image

    from age_detect_resnet.atomic import unwritable_reason

    if out.is_dir():
        example = out / f"{photo.stem}_ages.jpg"
        raise OutError(f"--out {out} is a folder; pass a file name, such as {example}")
    if out.exists() and out.samefile(photo):
        raise OutError(
            f"--out {out} is the photo itself, which would be written over; pass another file name, such as "
            f"{photo.with_name(photo.stem + '_ages.jpg')}"
        )
    Image.init()
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:
        raise OutError(
            f"--out {out} needs an image extension PIL can write (.jpg, .png, .webp, ...), such as "
            f"{out.with_suffix('.jpg') if out.suffix else out.with_name(out.name + '.jpg')}"
        )
    reason = unwritable_reason(out.parent)
    if reason is None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = f"cannot create the folder {out.parent} ({err.strerror})"
    if reason is not None:
        raise OutError(f"--out {out}: {reason}; pass a file in a folder you can write to")
    return image_format


def show(image: Image.Image) -> bool:
    """Open `image` in an image viewer; False where none could be (no viewer installed, or a machine
    without a display, where PIL's viewers would start and fail out of sight)."""
    from PIL import ImageShow

    displays = ("DISPLAY", "WAYLAND_DISPLAY")
    headless = sys.platform.startswith("linux") and not any(os.environ.get(name) for name in displays)
    return not headless and bool(ImageShow.show(image))


if __name__ == "__main__":
    sys.exit(main())
