"""How often the Haar cascade, the offline fallback detector, finds a face in photos that are face crops
(the face fills the image, as in UTKFace and pre-aligned face sets), by the share of the photo's longer
side repeated around it before detection (`faces/detection.py`: HAAR_BORDER).

    python experiments/haar_border.py                       # 400 UTKFace crops, seed 0: the choice
    python experiments/haar_border.py --seed 1 --borders 0 0.2   # another 400: the check

Prints, per border, the crops with a face found and those with more than one (each crop has one).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from rotation import SHARED

from age_detect_resnet.faces import detection
from age_detect_resnet.images import IMAGE_SUFFIXES, load_rgb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos", type=Path, default=SHARED / "data" / "utkface", help="folder of face crops"
    )
    parser.add_argument("--sample", type=int, default=400, help="crops drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--borders", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.photos.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        parser.error(f"no photos in {args.photos}")
    random.seed(args.seed)
    images = [load_rgb(p) for p in random.sample(paths, min(args.sample, len(paths)))]
    detector = detection.HaarDetector()
    print(f"{len(images)} crops of {args.photos}, seed {args.seed}")
    print("| border | face found | more than one face |\n|---:|---:|---:|")
    for border in args.borders:
        detection.HAAR_BORDER = border
        counts = [len(detector.detect(image)) for image in images]
        print(f"| {border:g} | {sum(n > 0 for n in counts)} | {sum(n > 1 for n in counts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
