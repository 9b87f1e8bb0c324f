"""CSV adapter: any dataset given as a CSV with `path,age` columns (optional `person_id`), or
labelled with age groups as `path,age_low,age_high` (both inclusive; optional `age_group` name): a row
without an age then takes its group's midpoint (`age_from_group` marks those rows) and evaluation reports
the share predicted inside each group. A CSV may mix the kinds: rows with an age, with a group, or both
(the age must then lie in its group). An image listed twice is counted once; one listed with labels that
disagree is left out.
Every other column (e.g. `gender`, `ethnicity`) is kept, so `evaluate --by` can break the error down by it;
but `sha1`, the name of the content hash the project computes from the image files."""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class CsvTableError(ValueError):
    """The CSV cannot be used as a dataset; the message names the file and the problem."""


# An `age` cell that names an age group (FairFace's own column: 50-59), not an age.
_GROUP_LABEL = re.compile(r"^\s*\d+\s*-\s*\d+\s*$")


def load_csv_table(csv_path: Path) -> pd.DataFrame:
    """Rows with a usable age; rows whose path is missing, whose age (or age group) cannot be used, or
    that list an image again are reported by reason and line, skipped, and counted in `attrs["removed"]`
    (reason -> rows) for the reports.

    Paths may be absolute or relative to the CSV's folder (the table keeps them as written).
    """
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise CsvTableError(
            f"{csv_path} is a folder; --dataset csv needs --data-root FILE.csv, a CSV file with path,age "
            "columns"
        )
    if not csv_path.is_file():
        raise CsvTableError(f"{csv_path} does not exist; --dataset csv needs --data-root FILE.csv")
    try:
        # Ages as text, so that only numbers count (pandas would read a column of True/False as 1/0);
        # person ids as text, as build-meta's tables are read, so that 01 and 1 stay two persons and long
        # ids keep every digit. index_col=False keeps rows with extra fields from turning the first column
        # into the index.
        df = pd.read_csv(
            csv_path,
            dtype={
                "path": str,
                "age": str,
                "age_low": str,
                "age_high": str,
                "age_group": str,
                "person_id": str,
            },
            index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CsvTableError(f"{csv_path} is not a readable CSV: {err}") from err
    grouped = {"age_low", "age_high"} <= set(df.columns)
    missing = {"path"} - set(df.columns) if grouped else {"path", "age"} - set(df.columns)
    if missing:
        raise CsvTableError(
            f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; it needs a header 'path,age' "
            f"(or 'path,age_low,age_high' for age groups), comma-separated, in lower case; its header has "
            f"{', '.join(map(str, df.columns))}"
        )
    if "sha1" in df.columns:
        # The table's sha1 is the image's content hash, which deduplication trusts (tabular.py): it is
        # computed from the files, never taken from a column that happens to bear the name.
        log.warning("%s: its column sha1 is not used; images are compared by their own content", csv_path)
        df = df.drop(columns="sha1")
    reasons = {"no path": df["path"].isna()}
    if grouped:
        df, from_group = group_bounds(df, reasons)
    given = pd.to_numeric(df["age"], errors="coerce") if "age" in df.columns else pd.Series(np.nan, df.index)
    ages = given.where(~from_group, (df["age_low"] + df["age_high"]) / 2) if grouped else given
    reasons["age missing, not a number or infinite"] = ~np.isfinite(ages)
    if grouped:
        # An exact age its own group contradicts (45, labelled 20-29): one of the two is wrong.
        reasons["an age outside its own age_low-age_high"] = (ages < df["age_low"]) | (ages > df["age_high"])
    reasons |= duplicate_rows(csv_path, df.assign(age=ages), ruled_out(reasons))
    removed = skip_report(csv_path, df, reasons)
    bad = ruled_out(reasons)
    df = df[~bad].assign(age=ages[~bad])
    if grouped:
        df = df.assign(age_from_group=from_group[~bad].to_numpy())
    if "person_id" not in df.columns:
        df = df.assign(person_id=None)
    df = df.assign(source=csv_path.stem)
    df.attrs["removed"] = removed
    return df


def group_bounds(df: pd.DataFrame, reasons: dict[str, pd.Series]) -> tuple[pd.DataFrame, pd.Series]:
    """`df` with its bounds as numbers, and which rows take their group's midpoint as their age (those with
    bounds and no age). A row with neither bound is an exact-age row (a CSV may mix the two kinds), so
    only rows with a bound are held to the rules of a group, which are added to `reasons`."""
    low = pd.to_numeric(df["age_low"], errors="coerce")
    high = pd.to_numeric(df["age_high"], errors="coerce")
    has_group = df["age_low"].notna() | df["age_high"].notna()
    reasons |= {
        "age_high blank or infinite": has_group & (df["age_high"].isna() | (high == np.inf)),
        "age_low blank or infinite": has_group & (df["age_low"].isna() | (low == -np.inf)),
        "age_low or age_high not a number": has_group & (~np.isfinite(low) | ~np.isfinite(high)),
        "age_low above age_high": low > high,
    }
    age_given = df["age"].notna() if "age" in df.columns else pd.Series(False, index=df.index)
    return df.assign(age_low=low, age_high=high), has_group & ~age_given


def ruled_out(reasons: dict[str, pd.Series]) -> np.ndarray:
    """The rows any of `reasons` (name -> mask) rules out."""
    return np.logical_or.reduce([mask.to_numpy() for mask in reasons.values()])


def duplicate_rows(csv_path: Path, df: pd.DataFrame, bad: np.ndarray) -> dict[str, pd.Series]:
    """Rows that list an image again, among those not already ruled out (`bad`), as `reasons` masks: a
    copy of an earlier row (the image is then counted once, as training keeps one copy of a repeated
    image), and every row of an image listed with labels that disagree (any column: the age, its group, a
    `--by` attribute, the person), since which is right cannot be told (training also drops every copy of
    an image whose ages disagree). Paths are compared as the files they name, relative or absolute."""
    rows = df[~bad].assign(path=[os.path.normpath(csv_path.parent / str(p)) for p in df["path"][~bad]])
    distinct = rows.drop_duplicates()
    conflicting = rows["path"].isin(distinct["path"][distinct["path"].duplicated()])
    repeated = rows.duplicated() & ~conflicting
    return {
        "conflicting labels for an image listed again": conflicting.reindex(df.index, fill_value=False),
        "a repeat of an earlier row": repeated.reindex(df.index, fill_value=False),
    }


def skip_report(csv_path: Path, df: pd.DataFrame, reasons: dict[str, pd.Series]) -> dict[str, int]:
    """Log the rows of `df` that `reasons` (name -> mask, each row counted under its first) rule out, with
    what to change and their lines; returns the count of each reason that ruled out a row, keyed as the
    reports show it."""
    advice = {
        "age_high blank or infinite": "an open age group such as 70+ needs an upper end, e.g. 70,100",
        "age_low blank or infinite": "give the group a lower end, e.g. 0,2 for under 3",
        "age_low or age_high not a number": "write the bounds as numbers, e.g. 70 not 70+",
        "age_low above age_high": "reversed bounds: write the lower end first, e.g. 20,29 not 29,20",
        "an age outside its own age_low-age_high": "the age and its group disagree: correct one of them",
        "conflicting labels for an image listed again": "the same image has rows that disagree: keep the "
        "right one and delete the others (until then every row of it is left out)",
        "a repeat of an earlier row": "the image is evaluated once: delete the repeated rows",
    }
    if {"age_low", "age_high"} <= set(df.columns):
        advice["age missing, not a number or infinite"] = (
            "give each row an age, or its age group as age_low,age_high (or both)"
        )
    if "age" in df.columns and df["age"].astype(str).str.match(_GROUP_LABEL).any():
        advice["age missing, not a number or infinite"] = (
            "the age column holds age groups such as 50-59: give them as age_low,age_high columns instead "
            "(e.g. 50,59)"
        )
    taken = np.zeros(len(df), dtype=bool)
    removed: dict[str, int] = {}
    lines = None
    for reason, mask in reasons.items():
        rows = np.flatnonzero(mask.to_numpy() & ~taken)
        taken |= mask.to_numpy()
        if not len(rows):
            continue
        removed[f"CSV rows with {reason}"] = len(rows)
        if lines is None:
            lines = record_lines(csv_path, len(df))
        where = (
            "lines " + ", ".join(str(lines[i]) for i in rows[:10])
            if lines is not None
            else "data rows " + ", ".join(str(i + 1) for i in rows[:10])
        )
        log.warning(
            "skipped %d row(s) of %s with %s%s (%s%s)",
            len(rows),
            csv_path,
            reason,
            f": {advice[reason]}" if reason in advice else "",
            where,
            " ..." if len(rows) > 10 else "",
        )
    return removed


def record_lines(csv_path: Path, count: int) -> list[int] | None:
    """The line each of the `count` rows pandas read starts on, as an editor numbers them (the header is
    line 1), counting the blank lines pandas skips and the line breaks inside quoted fields; None where
    Python's csv module splits the file otherwise than pandas did."""
    starts = []
    try:
        with csv_path.open(newline="", encoding="utf-8", errors="replace") as file:
            reader = csv.reader(file)
            end = 0
            for row in reader:
                if len(row) > 1 or (row and row[0].strip()):  # pandas skips blank and whitespace lines
                    starts.append(end + 1)
                end = reader.line_num
    except csv.Error:
        return None
    return starts[1:] if len(starts) == count + 1 else None
