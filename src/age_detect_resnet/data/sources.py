"""One entry point for every dataset adapter: a table of (path, age, person_id, ...) and its image root."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from age_detect_resnet.data.csv_table import load_csv_table
from age_detect_resnet.data.imdb_wiki import SOURCES, build_meta, read_table, table_provenance
from age_detect_resnet.data.utkface import is_image_file, load_utkface

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot be used as asked (nothing left after filtering, no faces to align); the
    message says what to change."""


class DatasetNotFoundError(FileNotFoundError):
    """No dataset where the user pointed; the message says what to download and where to put it."""


def dataset_help(data_root: Path) -> str:
    """What to do where `data_root` holds no dataset: the folder above it for one of IMDB-WIKI's crop
    folders (imdb_crop/ itself, whose numbered folders of images are no UTKFace set), the folder below it
    that holds one (a tarball unpacked into its own folder: UTKFace/), or where to get one."""
    data_root = Path(data_root)
    if any((data_root / Path(rel).name).is_file() for rel in SOURCES.values()):
        return (
            f"no dataset found at {data_root}: it is one of IMDB-WIKI's crop folders; pass --data-root "
            f"{data_root.parent}, the folder holding imdb_crop/ and/or wiki_crop/"
        )
    below = dataset_below(data_root)
    if below is not None:
        folder, kind = below
        return (
            f"no dataset found at {data_root}, but {folder} holds a {kind} dataset: pass --data-root {folder}"
        )
    return (
        f"no dataset found at {data_root}. Either\n"
        "  * IMDB-WIKI: download imdb_crop.tar and/or wiki_crop.tar from "
        "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/ and unpack them into data/raw/ "
        "(giving data/raw/imdb_crop/imdb.mat, data/raw/wiki_crop/wiki.mat and their image folders), or\n"
        "  * UTKFace: put the aligned & cropped faces (UTKFace.tar.gz, https://susanqq.github.io/UTKFace/) "
        "in a folder and pass --dataset utkface --data-root FOLDER, or\n"
        "  * any dataset: a CSV with path,age columns, passed as --dataset csv --data-root FILE.csv"
    )


def kind_of(data_root: Path) -> str | None:
    """Which adapter reads `data_root`: a CSV file, an IMDB-WIKI tree, or a folder of UTKFace images;
    None where it holds none of them."""
    data_root = Path(data_root)
    if data_root.is_file() and data_root.suffix.lower() == ".csv":
        return "csv"
    if any((data_root / rel).is_file() for rel in SOURCES.values()):
        return "imdb-wiki"
    if data_root.is_dir() and any(is_image_file(p) for p in data_root.iterdir()):
        return "utkface"
    return None


def dataset_below(data_root: Path) -> tuple[Path, str] | None:
    """The first folder right below `data_root` that holds a dataset, and its kind."""
    if not data_root.is_dir():
        return None
    for folder in sorted(p for p in data_root.iterdir() if p.is_dir()):
        kind = kind_of(folder)
        if kind is not None:
            return folder, kind
    return None


def guess_dataset(data_root: Path) -> str:
    """`kind_of` a folder or file that must hold a dataset; DatasetNotFoundError saying what to do."""
    kind = kind_of(data_root)
    if kind is None:
        raise DatasetNotFoundError(dataset_help(data_root))
    return kind


def dataset_at(data_root: Path, otherwise: str | None) -> str | None:
    """The kind of dataset `data_root` holds where `guess_dataset` recognises it, else `otherwise` (whose
    adapter then says what is missing). For commands given --data-root without --dataset."""
    try:
        found = guess_dataset(data_root)
    except DatasetNotFoundError:
        return otherwise
    if otherwise is not None and found != otherwise:
        log.info("%s holds a %s dataset: reading it as --dataset %s", data_root, found, found)
    return found


def image_root(dataset: str, data_root: Path) -> Path:
    """The folder a dataset's relative image paths start from (a CSV's paths: the CSV's folder)."""
    return Path(data_root).parent if dataset == "csv" else Path(data_root)


# Columns of every table that are no attribute of the person in the image.
NOT_ATTRIBUTES = frozenset({"path", "age", "split", "source", "sha1", "face_found"})


def check_columns(names: Sequence[str], available: set[str], data_root: Path, option: str = "--by") -> None:
    """Refuse label column `names` (given by `option`) that the dataset lacks, naming those it has."""
    unknown = [name for name in names if name not in available]
    if not unknown:
        return
    usable = sorted(available - NOT_ATTRIBUTES)
    hint = f"available: {', '.join(usable)}" if usable else "it has no columns besides path and age"
    raise DataError(f"{option} {', '.join(unknown)}: no such column in the dataset at {data_root}; {hint}")


def with_columns(
    table: pd.DataFrame,
    names: Sequence[str],
    dataset: str,
    data_root: Path,
    meta: str | Path | None,
    option: str = "--by",
) -> pd.DataFrame:
    """`table` (rows of the dataset, by `path`) with the label columns `names` it lacks joined from the
    dataset's own table: a saved split keeps only path, age, person_id and split (for UTKFace the
    columns are parsed from the file names again)."""
    lacking = [name for name in names if name not in table.columns]
    if not lacking:
        return table
    full, _ = load_table(dataset, Path(data_root), meta=Path(meta) if meta else None)
    check_columns(names, set(table.columns) | set(full.columns), data_root, option)
    attributes = full.drop_duplicates("path").set_index("path")[lacking]
    return table.join(attributes, on="path")


def load_table(
    dataset: str, data_root: Path, *, meta: Path | None = None, min_face_score: float | None = None
) -> tuple[pd.DataFrame, Path]:
    """The dataset's table and the folder its relative `path`s are resolved against. The rows an adapter
    skipped (a CSV's rows without a usable age) are counted by reason in the table's `attrs["removed"]`."""
    data_root = Path(data_root)
    if dataset == "imdb-wiki":
        return _imdb_wiki_table(data_root, meta, min_face_score), data_root
    if not data_root.exists():
        raise DatasetNotFoundError(dataset_help(data_root))
    if dataset == "utkface":
        if not data_root.is_dir():
            kind = " (a CSV: pass --dataset csv)" if data_root.suffix.lower() == ".csv" else ""
            raise DatasetNotFoundError(
                f"{data_root} is a file{kind}; --dataset utkface needs --data-root FOLDER, the folder of the "
                "UTKFace images"
            )
        table = load_utkface(data_root)
        if table.empty:
            raise DatasetNotFoundError(
                f"{data_root} holds no UTKFace images (files named AGE_GENDER_RACE_DATE.jpg): "
                + dataset_help(data_root)
            )
        return table, data_root
    if dataset == "csv":
        return load_csv_table(data_root), image_root(dataset, data_root)
    raise DataError(f"unknown dataset {dataset!r}; use imdb-wiki, utkface or csv")


# How many of a metadata table's first images `check_table_root` looks for: enough that a few missing
# files (counted later, or skipped with --skip-bad-images) do not refuse a table, few enough to be instant.
ROOT_CHECK_IMAGES = 20


def check_table_root(table: pd.DataFrame, meta: Path, data_root: Path) -> None:
    """Refuse a `--meta` table none of whose first images is under `data_root`: its paths are relative to
    the folder build-meta read, and without the right `--data-root` the run would split and prepare the
    whole table, then stop at its first image. The folder it was built from is named where recorded."""
    paths = table["path"].astype(str).head(ROOT_CHECK_IMAGES)
    if any((data_root / path).is_file() for path in paths):
        return
    built_from = (table_provenance(meta) or {}).get("data_root")
    hint = f" (it was built from {built_from})" if built_from else ""
    raise DatasetNotFoundError(
        f"none of the first {len(paths)} images of {meta} is in {data_root} (e.g. "
        f"{data_root / paths.iloc[0]}): pass --data-root with the folder holding imdb_crop/ and wiki_crop/ "
        f"that build-meta read{hint}"
    )


def _imdb_wiki_table(data_root: Path, meta: Path | None, min_face_score: float | None) -> pd.DataFrame:
    if meta is not None:
        if not Path(meta).is_file():
            raise DatasetNotFoundError(
                f"metadata file {meta} does not exist; run `age-detect build-meta` first"
            )
        table = read_table(Path(meta))
        check_table_root(table, Path(meta), data_root)
        return table
    if not any((data_root / rel).is_file() for rel in SOURCES.values()):
        raise DatasetNotFoundError(dataset_help(data_root))
    log.info("building the IMDB-WIKI metadata from %s (pass --meta to reuse a built table)", data_root)
    df, filters = build_meta(data_root, min_face_score=min_face_score)
    log.info("metadata filters:\n%s", filters.summary(len(df)))
    return df
