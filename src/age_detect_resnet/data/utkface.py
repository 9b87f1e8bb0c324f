"""UTKFace adapter: age, gender and ethnicity from names like `25_0_2_20170116174525125.jpg.chip.jpg`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from age_detect_resnet.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# The age is always the first field; gender (0 male, 1 female) and race (0-4) follow where present.
# Upstream has a few malformed names (race missing, a stray space, a missing dot): parse those too.
_NAME = re.compile(r"^\s*(?P<age>\d{1,3})_(?:(?P<gender>[01])_)?(?:(?P<race>[0-4])_)?")
_GENDER = {"0": "male", "1": "female"}
# UTKFace's race codes 0-4 in words: the `ethnicity` column, the name other datasets use for it.
ETHNICITIES = ("white", "black", "asian", "indian", "others")


def parse_utkface_name(name: str) -> dict[str, object] | None:
    """Labels from one file name, or None where the name has no leading age."""
    match = _NAME.match(name)
    if match is None:
        return None
    return {
        "age": int(match["age"]),
        "gender": _GENDER.get(match["gender"] or "", ""),
        "race": int(match["race"]) if match["race"] else -1,
    }


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def load_utkface(root: Path) -> pd.DataFrame:
    """One row per image in `root`; names that carry no age are reported and skipped."""
    root = Path(root)
    rows, unparsable = [], []
    for path in sorted(p for p in root.iterdir() if is_image_file(p)):
        labels = parse_utkface_name(path.name)
        if labels is None:
            unparsable.append(path.name)
            continue
        rows.append({"path": path.name, **labels})
    if unparsable:
        log.warning(
            "skipped %d UTKFace file(s) whose name does not start with '<age>_': %s",
            len(unparsable),
            ", ".join(unparsable[:10]) + (" ..." if len(unparsable) > 10 else ""),
        )
    df = pd.DataFrame(rows, columns=["path", "age", "gender", "race"])
    # A field missing from a malformed name is a missing value, so that it never forms a group of its own.
    df = df.assign(
        gender=df["gender"].replace("", None),
        ethnicity=df["race"].map(dict(enumerate(ETHNICITIES))).astype(object),
    )
    # UTKFace has no identities: every image is its own group when splitting.
    return df.assign(person_id=None, source="utkface")
