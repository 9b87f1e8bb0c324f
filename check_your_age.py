"""How old do you look? Run the trained model on your own photo.

    python check_your_age.py me.jpg                          # the model bundled with the package
    python check_your_age.py me.jpg --model runs/NAME --show  # your own run; also open the annotated photo

Prints the age of every face found, and saves the photo with boxes and ages next to it
(me_ages.jpg) or where --out says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from age_detect_resnet.cli.common import DETECTOR_MODEL_HELP
from age_detect_resnet.faces.detection import DetectorUnavailableError, create_detector
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.inference.annotate import age_label, draw_predictions
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.modeling.checkpoint import ModelFileError
from age_detect_resnet.runtime import select_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", type=Path)
    parser.add_argument(
        "--model",
        default="default",
        help="run folder, its best.safetensors, or default: the model bundled with the package (default)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to save the annotated photo (default: PHOTO_ages.jpg)"
    )
    parser.add_argument("--show", action="store_true", help="open the annotated photo in an image viewer")
    parser.add_argument("--no-detect", action="store_true", help="the photo is already a face crop")
    parser.add_argument("--detector-model", type=Path, help=DETECTOR_MODEL_HELP)
    args = parser.parse_args(argv)
    try:
        image = load_rgb(args.photo)  # first: a wrong file is named before the model and detector load
        device = select_device("auto")
        model = load_trained_model(args.model, device)
        detector = None if args.no_detect else create_detector("auto", args.detector_model)
        faces = AgePredictor(model, device=device, detector=detector, tta_flip=True).predict_image(image)
    except (ModelFileError, DetectorUnavailableError, ImageReadError) as err:
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
    out = args.out or args.photo.with_name(f"{args.photo.stem}_ages.jpg")
    annotated = draw_predictions(image, faces)
    try:
        annotated.save(out, quality=92)
    except (OSError, ValueError) as err:  # a read-only folder, a full disk, an unknown extension
        print(f"error: could not save the annotated photo to {out} ({err}); pass --out FILE", file=sys.stderr)
        return 2
    print(f"annotated photo: {out}")
    if args.show:
        annotated.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
