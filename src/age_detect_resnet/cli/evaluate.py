"""`age-detect evaluate`: a trained model on its test split or any dataset (evaluation/evaluate.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from age_detect_resnet.cli.common import command_main
from age_detect_resnet.evaluation import evaluate


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect evaluate", evaluate.__doc__, evaluate.add_arguments, evaluate.run, argv)


if __name__ == "__main__":
    sys.exit(main())
