"""`python -m age_detect_resnet.cli` is `age-detect`."""

import sys

from age_detect_resnet.cli import main

sys.exit(main())
