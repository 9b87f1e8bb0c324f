"""CSV adapter: any dataset given as a CSV with `path,age` columns (optional `person_id`), or
labelled with age groups as `path,age_low,age_high` (both inclusive; optional `age_group` name): the
`age` is then the group's midpoint and evaluation reports the share predicted inside each group.
Every other column (e.g. `gender`, `ethnicity`) is kept, so `evaluate --by` can break the error down by it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class CsvTableError(ValueError):
    """The CSV cannot be used as a dataset; the message names the file and the problem."""


def load_csv_table(csv_path: Path) -> pd.DataFrame:
    """Rows with a usable age; rows whose age is missing or not a number are reported and skipped.

    Paths may be absolute or relative to the CSV's folder (the table keeps them as written).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CsvTableError(f"{csv_path} does not exist; --dataset csv needs --data-root FILE.csv")
    try:
        # Ages as text, so that only numbers count (pandas would read a column of True/False as 1/0);
        # index_col=False keeps rows with extra fields from turning the first column into the index.
        df = pd.read_csv(
            csv_path,
            dtype={"path": str, "age": str, "age_low": str, "age_high": str, "age_group": str},
            index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CsvTableError(f"{csv_path} is not a readable CSV: {err}") from err
    grouped = {"age_low", "age_high"} <= set(df.columns)
    missing = {"path"} - set(df.columns) if grouped else {"path", "age"} - set(df.columns)
    if missing:
        raise CsvTableError(
            f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; it needs a header 'path,age' "
            "(or 'path,age_low,age_high' for age groups)"
        )
    if grouped:
        low = pd.to_numeric(df["age_low"], errors="coerce")
        high = pd.to_numeric(df["age_high"], errors="coerce")
        invalid = ~np.isfinite(low) | ~np.isfinite(high) | (low > high)
        df = df.assign(age_low=low, age_high=high)
        if "age" not in df.columns:
            df = df.assign(age=((low + high) / 2).where(~invalid))
    ages = pd.to_numeric(df["age"], errors="coerce")
    bad = ~np.isfinite(ages) | df["path"].isna()
    if grouped:
        bad |= invalid
    if bad.any():
        # Row numbers as a spreadsheet shows them: the header is line 1.
        lines = ", ".join(str(i + 2) for i in df.index[bad][:10])
        log.warning(
            "skipped %d row(s) of %s with a missing path or a missing, non-numeric or infinite age "
            "or age group (lines %s)",
            int(bad.sum()),
            csv_path,
            lines + (" ..." if bad.sum() > 10 else ""),
        )
    df = df[~bad].assign(age=ages[~bad])
    if "person_id" not in df.columns:
        df = df.assign(person_id=None)
    return df.assign(source=csv_path.stem)
