"""Operations on the metadata table: age range, duplicates, balancing and the person-disjoint split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from age_detect_resnet.data.imdb_wiki import hash_files

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def filter_age_range(df: pd.DataFrame, min_age: int = 10, max_age: int = 75) -> pd.DataFrame:
    """Rows whose age lies in [min_age, max_age] (the seed trains on 10-75)."""
    return df[df["age"].between(min_age, max_age)]


def limit_classes_to_n(df: pd.DataFrame, n: int | None = 5000, seed: int = 0) -> pd.DataFrame:
    """At most `n` rows per age, sampled reproducibly, so frequent ages do not dominate training."""
    if n is None:
        return df
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(df))
    shuffled = df.iloc[order]
    rank = shuffled.groupby("age").cumcount()
    return shuffled[rank.to_numpy() < n].sort_index()


def drop_duplicate_images(df: pd.DataFrame, root: Path | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep one copy of each byte-identical image; drop every copy where the copies' ages disagree.

    Uses the `sha1` column when the table has one (build-meta writes it), else hashes the files
    under `root`. Returns the table and counts of what was removed.
    """
    if "sha1" not in df.columns or df["sha1"].isna().any():
        if root is None:
            raise ValueError("drop_duplicate_images needs a 'sha1' column or the image root to hash files")
        df = df.assign(sha1=hash_files(Path(root), df["path"].tolist()))
    unreadable = df["sha1"].isna()
    df = df[~unreadable]
    ages_per_image = df.groupby("sha1")["age"].transform("nunique")
    conflicting = ages_per_image > 1
    kept = df[~conflicting]
    deduplicated = kept[~kept.duplicated("sha1", keep="first")]
    counts = {
        "unreadable files": int(unreadable.sum()),
        "copies with conflicting ages": int(conflicting.sum()),
        "repeated copies": len(kept) - len(deduplicated),
    }
    return deduplicated, counts


def assign_splits(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    group_col: str = "person_id",
) -> pd.Series:
    """Label each row train/val/test: stratified by age, all rows of a person in one split.

    Persons (rows without an id are their own group) are shuffled, ordered by their median age and
    dealt out one by one to the split furthest below its share of rows so far; every stretch of
    ages thereby receives the requested shares, and the result depends only on `seed`.
    """
    if df.empty:
        return pd.Series([], dtype=object, index=df.index)
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    if group_col in df.columns:
        groups = df[group_col].astype(object).where(df[group_col].notna(), None)
        keys = [g if g is not None else f"__row{i}" for i, g in zip(df.index, groups, strict=True)]
    else:
        keys = [f"__row{i}" for i in df.index]
    key_series = pd.Series(keys, index=df.index)
    stats = df.groupby(key_series)["age"].agg(["median", "size"])
    rng = np.random.default_rng(seed)
    stats = stats.iloc[rng.permutation(len(stats))]
    stats = stats.sort_values("median", kind="stable")
    assigned = np.zeros(3)
    split_of_group: dict[object, str] = {}
    for key, size in zip(stats.index, stats["size"], strict=True):
        deficit = fractions * (assigned.sum() + size) - assigned
        choice = int(np.argmax(deficit))
        assigned[choice] += size
        split_of_group[key] = SPLITS[choice]
    return key_series.map(split_of_group)


def split_df_train_val_test(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    group_col: str = "person_id",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The seed's three-way split, stratified by age and disjoint by person (see `assign_splits`)."""
    labels = assign_splits(
        df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, group_col=group_col
    )
    return tuple(df[labels == name] for name in SPLITS)  # type: ignore[return-value]
