"""A labelled copy of a run's test (or validation) split with every photo cut to its central share, and
made grey with `--grey`, for `evaluate`: the error of tight face crops (as some pre-aligned face sets are)
or of greyscale photos (old scans) by age group, where `rotation.py` gives only how far each age moves.

    python experiments/cut_set.py --test-of runs/ensemble-tight-cut --every 4 --share 0.55 --out /tmp/cut55
    python experiments/cut_set.py --test-of runs/ensemble-tight-cut --share 1 --grey --out /tmp/grey
    age-detect evaluate --model default --dataset csv --data-root /tmp/cut55/labels.csv --split all --detect

Photos are cut as `rotation.py --crops` cuts them and written losslessly (PNG), so that no second JPEG
compression is added to the change; `labels.csv` holds each copy's path and the split's age.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from rotation import SHARED, cut  # the one cut of the robustness figures

from age_detect_resnet.cli.common import positive_int
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.images import load_rgb
from age_detect_resnet.run_folder import SavedSplit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos", type=Path, default=SHARED / "data" / "utkface", help="the run's data root"
    )
    parser.add_argument(
        "--test-of",
        type=Path,
        required=True,
        help="run folder whose split.csv names the test photos, or default: the bundled model's",
    )
    parser.add_argument(
        "--split", choices=("test", "val"), default="test", help="the run's split whose photos are copied"
    )
    parser.add_argument("--every", type=positive_int, default=1, help="keep every Nth photo")
    parser.add_argument("--share", type=float, required=True, help="central share of width and height kept")
    parser.add_argument("--grey", action="store_true", help="also turn each copy grey (as old scans are)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the copies and labels.csv")
    args = parser.parse_args(argv)
    if not 0.1 <= args.share <= 1.0:
        parser.error(f"--share must be between 0.1 and 1, got {args.share}")
    saved = SavedSplit.of(args.test_of)
    if saved is None:
        parser.error(
            f"{args.test_of} saved no split: --test-of needs a run folder with a split.csv, or default"
        )
    test = load_split(saved.path, args.photos).split(args.split).iloc[:: args.every]
    missing = [path for path in test["path"] if not (args.photos / path).is_file()]
    if missing:  # before --out is made: a wrong --photos left an empty folder and a traceback
        parser.error(
            f"{len(missing)} of the {len(test)} {args.split} photos are not in {args.photos} "
            f"(e.g. {missing[0]}): pass --photos with the run's data root"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, age in zip(test["path"], test["age"], strict=True):
        name = f"{Path(path).name}.png"
        copy = cut(load_rgb(args.photos / path), args.share)[0]
        (copy.convert("L").convert("RGB") if args.grey else copy).save(args.out / name)
        rows.append((name, float(age)))
    pd.DataFrame(rows, columns=["path", "age"]).to_csv(args.out / "labels.csv", index=False)
    grey = ", in greyscale" if args.grey else ""
    print(
        f"{len(rows)} {args.split} photos of {args.test_of} cut to their central {args.share:g}{grey}: "
        f"{args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
