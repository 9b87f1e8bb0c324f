"""CSV adapter: any dataset given as a CSV with `path,age` columns (optional `person_id`, `gender`)."""

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
        df = pd.read_csv(csv_path, dtype={"path": str, "age": str}, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CsvTableError(f"{csv_path} is not a readable CSV: {err}") from err
    missing = {"path", "age"} - set(df.columns)
    if missing:
        raise CsvTableError(
            f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; it needs a header 'path,age'"
        )
    ages = pd.to_numeric(df["age"], errors="coerce")
    bad = ~np.isfinite(ages) | df["path"].isna()
    if bad.any():
        # Row numbers as a spreadsheet shows them: the header is line 1.
        lines = ", ".join(str(i + 2) for i in df.index[bad][:10])
        log.warning(
            "skipped %d row(s) of %s with a missing path or a missing, non-numeric or infinite age "
            "(lines %s)",
            int(bad.sum()),
            csv_path,
            lines + (" ..." if bad.sum() > 10 else ""),
        )
    df = df[~bad].assign(age=ages[~bad])
    if "person_id" not in df.columns:
        df = df.assign(person_id=None)
    return df.assign(source=csv_path.stem)
