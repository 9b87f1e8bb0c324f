"""Build the metadata table of IMDB-WIKI from `imdb.mat` / `wiki.mat`.

`age-detect build-meta` (= `python -m age_detect_resnet.preprocessing.build_meta`, the seed's path):
the table of data/imdb_wiki.py written to a CSV (and beside it, in meta.source.json, the data root it was
built from, which `age-detect pipeline` checks before reusing it), then how many rows each filter removed.

    age-detect build-meta [--data-root data/raw] [--out data/processed/meta.csv] [--min-face-score S]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli.common import command_main, user_message
from age_detect_resnet.data.imdb_wiki import SOURCES, MetaError, build_meta, check_output, write_table
from age_detect_resnet.data.sources import kind_of

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root", type=Path, default=Path("data/raw"), help="holds imdb_crop/ and/or wiki_crop/"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/processed/meta.csv"), help="metadata CSV to write"
    )
    parser.add_argument(
        "--min-face-score", type=float, default=None, help="also drop faces scored below this"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.min_face_score is not None and not math.isfinite(args.min_face_score):
        parser.error(f"--min-face-score must be a number, not {args.min_face_score}")


def other_dataset(data_root: Path) -> str | None:
    """Why build-meta has nothing to build where `data_root` holds another kind of dataset, as the
    training commands recognise it (`kind_of`): UTKFace and CSV tables are read as they are."""
    kind = kind_of(data_root)
    if kind == "utkface":
        return (
            f"{data_root} holds face images and no IMDB-WIKI metadata ({SOURCES['imdb']}, "
            f"{SOURCES['wiki']}): it looks like UTKFace (AGE_GENDER_RACE_DATE.jpg.chip.jpg), which needs "
            f"no build-meta; train with --dataset utkface --data-root {data_root}"
        )
    if kind == "csv":
        return (
            f"{data_root} is a CSV table, which needs no build-meta; train with --dataset csv "
            f"--data-root {data_root}"
        )
    return None


def run(args: argparse.Namespace) -> int:
    try:
        check_output(args.out)
        elsewhere = other_dataset(args.data_root)
        if elsewhere is not None:
            raise MetaError(elsewhere)
        df, filters = build_meta(args.data_root, min_face_score=args.min_face_score)
        write_table(df, args.out, data_root=args.data_root, min_face_score=args.min_face_score)
    except MetaError as err:  # the message names the file and what to do
        log.error("%s", user_message(err))
        return 2
    print(filters.summary(len(df)))
    print(f"wrote {len(df):,} rows to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect build-meta", __doc__, add_arguments, run, argv, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
