"""Build the metadata table of IMDB-WIKI from `imdb.mat` / `wiki.mat`; `age-detect build-meta`
(cli/build_meta.py) writes it to a CSV.

The data root holds `imdb_crop/` and/or `wiki_crop/` as unpacked from the dataset page
(https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/). Ages follow the official rule (photo taken on
1 July of `photo_taken`); rows are kept where a face was found, no second face was found, the age is
plausible (0-100) and the image file exists. `FilterLog` counts the rows each filter removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import scipy.io

from age_detect_resnet.atomic import atomic_path, unwritable_reason, write_text_atomic
from age_detect_resnet.digests import file_digest
from age_detect_resnet.progress import progress

log = logging.getLogger(__name__)

SOURCES = {"imdb": "imdb_crop/imdb.mat", "wiki": "wiki_crop/wiki.mat"}
DATASET_PAGE = "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/"
REQUIRED_FIELDS = ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")
NUMERIC_FIELDS = ("dob", "photo_taken", "gender", "face_score", "second_face_score")
PLAUSIBLE_AGES = (0, 100)
# MATLAB datenum d is proleptic Gregorian ordinal d - 366; ordinals run from 1 (0001-01-01) to 3652059.
_MAX_ORDINAL = 3_652_059


class MetaError(ValueError):
    """The metadata cannot be built; the message names the file and says what to do."""


@dataclass
class FilterLog:
    """Rows removed by each filter, in the order the filters ran."""

    total: int = 0
    removed: dict[str, int] = field(default_factory=dict)

    def drop(self, df: pd.DataFrame, keep: np.ndarray | pd.Series, reason: str) -> pd.DataFrame:
        keep = np.asarray(keep, dtype=bool)
        self.removed[reason] = self.removed.get(reason, 0) + int((~keep).sum())
        return df[keep]

    def merge(self, other: FilterLog) -> None:
        self.total += other.total
        for reason, count in other.removed.items():
            self.removed[reason] = self.removed.get(reason, 0) + count

    def summary(self, kept: int) -> str:
        lines = [f"{'rows read':<34}{self.total:>10,}"]
        lines += [f"{'- ' + reason:<34}{count:>10,}" for reason, count in self.removed.items()]
        lines.append(f"{'rows kept':<34}{kept:>10,}")
        return "\n".join(lines)


def datenum_to_year_month(dob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MATLAB serial dates to (year, month, valid); broken values (e.g. 1 or 366) are marked invalid."""
    dob = np.asarray(dob, dtype=np.float64)
    finite = np.isfinite(dob)
    ordinal = np.where(finite, np.floor(np.where(finite, dob, 367.0)) - 366, 0)
    valid = finite & (ordinal >= 1) & (ordinal <= _MAX_ORDINAL)
    days = np.where(valid, ordinal - 1, 0).astype("timedelta64[D]")
    dates = np.datetime64("0001-01-01", "D") + days
    year = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    return year, month, valid


def official_age(dob: np.ndarray, photo_taken: np.ndarray) -> np.ndarray:
    """Age in whole years assuming the photo was taken on 1 July; NaN where the birth date is broken."""
    year, month, valid = datenum_to_year_month(dob)
    age = np.asarray(photo_taken, dtype=np.float64) - year - (month >= 7)
    return np.where(valid, age, np.nan)


def read_mat(mat_path: Path) -> dict[str, np.ndarray]:
    """The fields of an IMDB-WIKI `.mat` file as flat 1-D arrays (cells as object arrays)."""
    key = mat_path.stem
    try:
        contents = scipy.io.loadmat(mat_path)
    except NotImplementedError as err:  # MATLAB v7.3 (HDF5) files
        raise MetaError(
            f"{mat_path} is a MATLAB v7.3 file; the IMDB-WIKI metadata is v5: re-download it"
        ) from err
    except Exception as err:  # scipy raises many types for truncated or foreign files
        raise MetaError(
            f"{mat_path} is not a readable MATLAB file ({err}); re-download it from {DATASET_PAGE}"
        ) from err
    if key not in contents:
        found = ", ".join(k for k in contents if not k.startswith("__")) or "nothing"
        raise MetaError(f"{mat_path} has no '{key}' struct (found {found}); is it the IMDB-WIKI metadata?")
    struct = contents[key]
    names = struct.dtype.names or ()
    missing = [name for name in REQUIRED_FIELDS if name not in names]
    if missing:
        raise MetaError(f"{mat_path} lacks the field(s) {', '.join(missing)}; is it the IMDB-WIKI metadata?")
    if struct.size != 1:
        raise MetaError(
            f"{mat_path}: '{key}' is a struct array of shape {struct.shape}, not the (1, 1) "
            "struct of the IMDB-WIKI metadata; re-download it"
        )
    record = struct[0, 0]
    columns = {name: np.asarray(record[name]).reshape(-1) for name in names}
    n = len(columns["dob"])
    for name in (*REQUIRED_FIELDS, "name", "celeb_id"):
        if name in columns and len(columns[name]) != n:
            raise MetaError(f"{mat_path}: field '{name}' has {len(columns[name])} entries but dob has {n}")
    for name in (*NUMERIC_FIELDS, "celeb_id"):
        if name not in columns:  # celeb_id: imdb.mat's alone
            continue
        try:
            np.asarray(columns[name], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise MetaError(
                f"{mat_path}: field '{name}' is not numeric ({err}); is it the IMDB-WIKI metadata?"
            ) from err
    return columns


def _cell_strings(cells: np.ndarray) -> list[str]:
    """A MATLAB cell of 1-element string arrays (possibly empty) to Python strings."""
    out = []
    for cell in cells:
        flat = np.asarray(cell).reshape(-1)
        out.append(str(flat[0]) if flat.size else "")
    return out


def _gender_label(gender: np.ndarray) -> np.ndarray:
    gender = np.asarray(gender, dtype=np.float64)
    return np.where(gender == 1.0, "male", np.where(gender == 0.0, "female", ""))


def read_source(data_root: Path, source: str) -> pd.DataFrame:
    """All rows of one source (`imdb` or `wiki`) with computed ages, before any filtering."""
    mat_path = data_root / SOURCES[source]
    columns = read_mat(mat_path)
    crop_dir = Path(SOURCES[source]).parent.as_posix()
    full_paths = _cell_strings(columns["full_path"])
    if source == "imdb" and "celeb_id" in columns:
        # A celeb_id that is no whole number (NaN, 1.5) names no one: such a row gets no person_id and
        # `filter_rows` drops it, counted. Not the file name's id (nm0000001) as wiki rows get: a person's
        # other rows carry the celeb_id, so the row could land in another split than they do.
        ids = np.asarray(columns["celeb_id"], dtype=np.float64)
        whole = np.isfinite(ids) & (ids == np.round(ids))
        person = [f"imdb:{int(i)}" if ok else None for i, ok in zip(ids, whole, strict=True)]
    else:  # wiki file names start with the person's id: 17/10000217_1981-05-05_2009.jpg
        person = [f"{source}:{Path(p).name.split('_')[0]}" for p in full_paths]
    names = _cell_strings(columns["name"]) if "name" in columns else [""] * len(full_paths)
    return pd.DataFrame(
        {
            "path": [f"{crop_dir}/{p}" for p in full_paths],
            "age": official_age(columns["dob"], columns["photo_taken"]),
            "gender": _gender_label(columns["gender"]),
            "face_score": np.asarray(columns["face_score"], dtype=np.float64),
            "second_face_score": np.asarray(columns["second_face_score"], dtype=np.float64),
            "person_id": person,
            "name": names,
            "source": source,
        }
    )


def stays_inside(path: str) -> bool:
    """Whether a table path (`wiki_crop/17/x.jpg`) names a file inside its crop folder: a damaged or
    hand-made `.mat` whose full_path holds `..` would have the table read (and hash) files elsewhere."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return ".." not in parts


def filter_rows(df: pd.DataFrame, *, min_face_score: float | None = None) -> tuple[pd.DataFrame, FilterLog]:
    """The seed's cleaning: valid birth date, one face found (optionally confident), plausible age; and
    a person to keep the splits apart by and a path inside the crop folder (both counted only where a
    row fails them: a damaged or hand-made `.mat`)."""
    log_ = FilterLog(total=len(df))
    inside = df["path"].map(stays_inside)
    if not inside.all():
        df = log_.drop(df, inside, "path leaves its crop folder")
    if df["person_id"].isna().any():
        df = log_.drop(df, df["person_id"].notna(), "celeb_id not a whole number")
    df = log_.drop(df, df["age"].notna(), "broken date of birth")
    df = log_.drop(df, np.isfinite(df["face_score"]), "no face found")
    df = log_.drop(df, df["second_face_score"].isna(), "second face found")
    if min_face_score is not None:
        df = log_.drop(df, df["face_score"] >= min_face_score, f"face score below {min_face_score:g}")
    low, high = PLAUSIBLE_AGES
    df = log_.drop(df, df["age"].between(low, high), f"age outside {low}-{high}")
    return df.assign(age=df["age"].astype(int)), log_


def file_sha1(path: Path) -> str | None:
    """Content hash used to find byte-identical images; None where the file cannot be read."""
    try:
        return file_digest(path, "sha1")
    except (OSError, ValueError):  # ValueError: a path with a NUL byte (corrupt metadata)
        return None


def hash_files(
    root: Path, relative_paths: Sequence[str], *, desc: str = "hashing images"
) -> list[str | None]:
    """sha1 of every file (None where missing), in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = pool.map(file_sha1, (root / p for p in relative_paths))
        digests = list(progress(jobs, total=len(relative_paths), desc=desc, unit="img"))
    unreadable = [p for p, digest in zip(relative_paths, digests, strict=True) if digest is None]
    if unreadable:
        log.warning(
            "%d of %d image file(s) are missing or unreadable under %s (skipped): %s",
            len(unreadable),
            len(digests),
            root,
            ", ".join(unreadable[:10]) + (" ..." if len(unreadable) > 10 else ""),
        )
    return digests


def build_meta(data_root: Path, *, min_face_score: float | None = None) -> tuple[pd.DataFrame, FilterLog]:
    """The cleaned table of every source found under `data_root`, with each image's content hash."""
    data_root = Path(data_root)
    present = [s for s, rel in SOURCES.items() if (data_root / rel).is_file()]
    if not present:
        raise MetaError(
            f"found neither {SOURCES['imdb']} nor {SOURCES['wiki']} under {data_root}. Download "
            f"imdb_crop.tar and/or wiki_crop.tar from {DATASET_PAGE} and unpack them into {data_root}/"
        )
    tables, filters = [], FilterLog()
    for source in present:
        table, source_log = filter_rows(read_source(data_root, source), min_face_score=min_face_score)
        filters.merge(source_log)
        tables.append(table)
    df = pd.concat(tables, ignore_index=True)
    df["sha1"] = hash_files(data_root, df["path"].tolist())
    df = filters.drop(df, df["sha1"].notna(), "image file missing")
    if df.empty:
        if filters.removed.get("image file missing"):
            hint = (
                "are the image folders (e.g. wiki_crop/00 ... 99) unpacked next to the .mat files? Download "
                f"the *_crop.tar archives from {DATASET_PAGE}"
            )
        else:
            hint = "the filters above removed every row" + (
                "; try a lower --min-face-score" if min_face_score is not None else ""
            )
        raise MetaError(f"no usable rows under {data_root}:\n{filters.summary(0)}\n{hint}")
    return df.reset_index(drop=True), filters


def check_output(out: Path) -> None:
    """Refuse an output path `write_table` cannot write, before the metadata is built (minutes on
    IMDB): a folder, or a place no file can be made. Found only at the rename, the error would name the
    temporary file beside it."""
    out = Path(out)
    if out.is_dir():
        raise MetaError(f"--out {out} is a folder: pass the CSV file to write, e.g. --out {out / 'meta.csv'}")
    reason = unwritable_reason(out.parent)
    if reason is not None:
        raise MetaError(f"cannot write --out {out}: {reason}; pass a writable path")


def write_table(df: pd.DataFrame, out: Path, *, data_root: Path, min_face_score: float | None = None) -> None:
    """The table, and beside it (`provenance_path`) what it was built from, so that a later command can
    tell a table of this data root from one of another (the table's paths are relative to its root)."""
    check_output(out)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    record = {"data_root": str(Path(data_root).resolve()), "min_face_score": min_face_score, "rows": len(df)}
    write_text_atomic(provenance_path(out), json.dumps(record, indent=2) + "\n")


def provenance_path(table: Path) -> Path:
    """The record `write_table` writes beside a table: `meta.csv` -> `meta.source.json`."""
    return Path(table).with_suffix(".source.json")


def table_provenance(table: Path) -> dict | None:
    """What `write_table` recorded of the table's making (data_root resolved, min_face_score); None where
    it recorded nothing readable (a table written before the record existed, or by another tool)."""
    try:
        record = json.loads(provenance_path(table).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("data_root"), str) else None


def read_table(path: Path) -> pd.DataFrame:
    """A table `write_table` wrote (`--meta`); a file that is not one is a `MetaError` naming it."""
    remedy = "pass the file `age-detect build-meta --out` wrote, or build it again"
    try:
        df = pd.read_csv(path, dtype={"person_id": str, "path": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MetaError(f"{path} is not a metadata table ({err}); {remedy}") from err
    missing = [column for column in ("path", "age", "person_id") if column not in df.columns]
    if missing:
        raise MetaError(f"{path} has no {', '.join(missing)} column(s); {remedy}")
    if df.empty:
        raise MetaError(f"{path} has no rows; {remedy}")
    if not pd.api.types.is_numeric_dtype(df["age"]) or df["age"].isna().any():
        raise MetaError(f"{path} has ages that are missing or not numbers; {remedy}")
    return df
