"""The seed's module path: `python -m age_detect_resnet.preprocessing.build_meta` is `age-detect build-meta`
(cli/build_meta.py; the table itself is data/imdb_wiki.py's)."""

import sys

from age_detect_resnet.cli.build_meta import main
from age_detect_resnet.data.imdb_wiki import build_meta

__all__ = ["build_meta", "main"]

if __name__ == "__main__":
    sys.exit(main())
