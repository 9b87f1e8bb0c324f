"""Fixtures of the reliability suite: IMDB-WIKI metadata in the real layout, and real image bytes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io

from conftest import UTKFACE, require


def datenum(year: int, month: int, day: int) -> float:
    """MATLAB serial date number of a date, as stored in the `dob` field."""
    return float(dt.date(year, month, day).toordinal() + 366)


def _cells(values: Sequence[Any]) -> np.ndarray:
    """A MATLAB cell row (1, N) holding each value as its own array."""
    cells = np.empty((1, len(values)), dtype=object)
    for i, value in enumerate(values):
        cells[0, i] = value
    return cells


def mat_struct(rows: Sequence[dict[str, Any]], *, imdb: bool = False) -> np.ndarray:
    """The (1, 1) struct of (1, N) fields that `imdb.mat` / `wiki.mat` hold (see docs/imdb_wiki_format.md).

    Each row gives dob, photo_taken, path, face_score and optionally gender, second_face_score, name,
    celeb_id; rows without a face get the uint16 [1, 1, W, H] box the real files use.
    """
    fields: dict[str, np.ndarray] = {
        "dob": np.array([[r["dob"] for r in rows]], dtype=np.float64),
        "photo_taken": np.array([[r["photo_taken"] for r in rows]], dtype=np.uint16),
        "full_path": _cells([np.array([r["path"]]) for r in rows]),
        "gender": np.array([[r.get("gender", 1.0) for r in rows]], dtype=np.float64),
        "name": _cells([np.array([r["name"]]) if r.get("name") else np.array([], dtype="<U1") for r in rows]),
        "face_location": _cells(
            [
                np.array([[1, 1, 120, 120]], dtype=np.uint16)
                if not np.isfinite(r["face_score"])
                else np.array([[20.5, 30.25, 90.0, 100.75]])
                for r in rows
            ]
        ),
        "face_score": np.array([[r["face_score"] for r in rows]], dtype=np.float64),
        "second_face_score": np.array([[r.get("second_face_score", np.nan) for r in rows]], dtype=np.float64),
    }
    if imdb:
        fields["celeb_names"] = _cells([np.array([f"Person {i}"]) for i in range(1, 21)])
        fields["celeb_id"] = np.array([[r["celeb_id"] for r in rows]], dtype=np.uint16)
    struct = np.empty((1, 1), dtype=[(name, "O") for name in fields])
    for name, value in fields.items():
        struct[0, 0][name] = value
    return struct


@pytest.fixture
def write_mat() -> Callable[..., Path]:
    """`write_mat(path, rows, imdb=False)`: an IMDB-WIKI metadata file in the real v5 layout."""

    def write(path: Path, rows: Sequence[dict[str, Any]], *, imdb: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {path.stem: mat_struct(rows, imdb=imdb)})
        return path

    return write


@pytest.fixture(scope="session")
def face_jpeg() -> bytes:
    """The bytes of one real UTKFace crop (a 200x200 JPEG)."""
    return sorted(require(UTKFACE).glob("*.jpg"))[0].read_bytes()
