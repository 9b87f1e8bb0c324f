"""From a dataset to the labelled train/val/test table a run trains and is evaluated on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from age_detect_resnet.atomic import atomic_path
from age_detect_resnet.data.sources import DataError, load_table
from age_detect_resnet.data.tabular import (
    SPLITS,
    assign_splits,
    drop_duplicate_images,
    filter_age_range,
    limit_classes_to_n,
)

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "age", "person_id", "split"]


class SplitSettings(Protocol):
    """What `prepare_splits` reads of a data config (training's `DataConfig` is one)."""

    dataset: str
    data_root: str
    meta: str | None
    min_face_score: float | None
    min_age: int
    max_age: int
    max_per_age: int | None
    val_fraction: float
    test_fraction: float
    limit: int | None
    train_share: float


@dataclass
class PreparedData:
    table: pd.DataFrame  # path, age, person_id, split (+ adapter columns)
    root: Path  # relative paths in `table` are under this folder
    removed: dict[str, int] = field(default_factory=dict)  # rows removed by each step, for the report

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name].reset_index(drop=True)


def prepare_splits(data: SplitSettings, *, seed: int) -> PreparedData:
    """Load, deduplicate, keep the age range, balance, cap, and split by person, stratified by age."""
    table, root = load_table(
        data.dataset,
        Path(data.data_root),
        meta=Path(data.meta) if data.meta else None,
        min_face_score=data.min_face_score,
    )
    removed: dict[str, int] = dict(table.attrs.get("removed", {}))
    read = len(table)
    table, duplicates = drop_duplicate_images(table, root)
    removed.update(duplicates)
    before = len(table)
    table = filter_age_range(table, data.min_age, data.max_age)
    removed[_age_reason(data)] = before - len(table)
    before = len(table)
    table = limit_classes_to_n(table, data.max_per_age, seed=seed)
    removed[f"over {data.max_per_age} per age"] = before - len(table)
    if data.limit is not None and data.limit < len(table):
        removed["over --limit"] = len(table) - data.limit
        table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), data.limit, replace=False))]
    if table.empty:
        raise DataError(nothing_left_message(data, read, removed))
    table = table.assign(
        split=assign_splits(
            table, val_fraction=data.val_fraction, test_fraction=data.test_fraction, seed=seed
        )
    )
    if data.train_share < 1:
        before = len(table)
        table = keep_training_share(table, data.train_share, seed=seed)
        removed[f"training faces beyond --train-share {data.train_share:g}"] = before - len(table)
    if "person_id" not in table.columns:
        table = table.assign(person_id=None)
    check_no_split_empty(table, data)
    return PreparedData(table.reset_index(drop=True), root, removed)


def nothing_left_message(data: SplitSettings, read: int, removed: dict[str, int]) -> str:
    """Why no image is left to split: how many were read and what removed them, so that the option
    to change (the age range, above all) is named, not just the empty result. --limit and --max-per-age
    cannot empty a table: the settings refuse values below 1."""
    causes = [f"{count:,} {reason}" for reason, count in removed.items() if count]
    text = f"no images of ages {data.min_age}-{data.max_age} left in {data.data_root}: {read:,} read"
    if causes:
        text += f", removed: {', '.join(causes)}"
    if removed.get(_age_reason(data)):
        text += f"; widen --min-age {data.min_age} / --max-age {data.max_age}"
    return text


def _age_reason(data: SplitSettings) -> str:
    """The report's name of the rows the age range removed."""
    return f"age outside {data.min_age}-{data.max_age}"


def check_no_split_empty(table: pd.DataFrame, data: SplitSettings) -> None:
    """Refuse a split without images: a run would validate on nothing (a best model of MAE 0) or fail
    at its final test. Splits are dealt whole persons, so too few persons empty one however many images."""
    counts = table["split"].value_counts()
    empty = [name for name in SPLITS if not counts.get(name, 0)]
    if not empty:
        return
    ids = table["person_id"]
    persons = ids.nunique() + int(ids.isna().sum())  # rows without an id are each their own person
    names = {"train": "training", "val": "validation", "test": "test"}
    remedies = [f"raise --limit ({data.limit})"] if data.limit is not None else []
    if "train" in empty and data.train_share < 1:
        remedies.append(f"raise --train-share ({data.train_share:g})")
    remedies.append("use a dataset with more persons")
    raise DataError(
        f"the {' and '.join(names[name] for name in empty)} split of {data.data_root} would be empty: "
        f"{len(table):,} image(s) of {persons:,} person(s) are left to split after filtering, and each "
        f"split gets whole persons; {', or '.join(remedies)}"
    )


def keep_training_share(table: pd.DataFrame, share: float, *, seed: int) -> pd.DataFrame:
    """`table` with `share` of its training rows, drawn within each age (so the training ages keep their
    mix) and seeded; the validation and test rows are all kept, so runs of any share are judged on the
    same faces."""
    train = table[table["split"] == "train"]
    kept = train.groupby("age", group_keys=False).sample(frac=share, random_state=seed)
    return table[(table["split"] != "train") | table.index.isin(kept.index)]


def save_split(prepared: PreparedData, path: Path) -> None:
    with atomic_path(path) as tmp:
        prepared.table[SPLIT_COLUMNS].to_csv(tmp, index=False)


def load_split(path: Path, root: Path) -> PreparedData:
    """A split saved with a run, so evaluation later uses exactly the same test images."""
    table = pd.read_csv(path, dtype={"path": str, "person_id": str})
    return PreparedData(table, Path(root))
