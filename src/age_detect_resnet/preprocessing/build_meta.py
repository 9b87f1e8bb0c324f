"""The seed's module path: `python -m age_detect_resnet.preprocessing.build_meta` is `age-detect build-meta`
(data/imdb_wiki.py)."""

import sys

from age_detect_resnet.data.imdb_wiki import build_meta, main

__all__ = ["build_meta", "main"]

if __name__ == "__main__":
    sys.exit(main())
