"""`age-detect compare`: the Markdown table of finished runs side by side (evaluation/compare.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli.common import command_main
from age_detect_resnet.evaluation import compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")


def run(args: argparse.Namespace) -> int:
    try:
        runs = [compare.load_run(r) for r in args.runs]
    except compare.RunReadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(compare.comparison_table(runs))
    hardware = {r["run"]["hardware"] for r in runs}
    print(f"\nHardware: {'; '.join(sorted(hardware))}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect compare", compare.__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
