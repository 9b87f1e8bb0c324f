"""Put the YuNet face detector (MIT licence, 0.2 MB) into the package before building a release
(maintainers), so that an installed wheel detects and aligns faces offline from its first run:

    .venv/bin/python scripts/bundle_yunet.py [FILE]      # then: pip wheel . / python -m build

FILE is a local copy of OpenCV's face_detection_yunet_2026may.onnx; without it the file is downloaded
(or taken from $AGE_DETECT_YUNET_MODEL or the user cache). Either way it must have the SHA-256 pinned
in faces/detection.py. It lands in src/age_detect_resnet/assets/, which git ignores for this file:
the repository itself does not carry it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from age_detect_resnet.faces.detection import DetectorUnavailableError
from age_detect_resnet.modeling.bundled import BundledModelError, write_bundled_yunet


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out = write_bundled_yunet(Path(argv[0]) if argv else None)
    except (BundledModelError, DetectorUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, checksum verified; build the package now")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
