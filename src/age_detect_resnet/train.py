"""The seed's module path: `python -m age_detect_resnet.train` is `age-detect train` (cli/train.py)."""

import sys

from age_detect_resnet.cli.train import main
from age_detect_resnet.training.run import train

__all__ = ["main", "train"]

if __name__ == "__main__":
    sys.exit(main())
