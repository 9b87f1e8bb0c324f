"""Table operations: age range, balancing, duplicate images and the person-disjoint stratified split."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from age_detect_resnet.data.tabular import (
    assign_splits,
    drop_duplicate_images,
    filter_age_range,
    limit_classes_to_n,
    split_df_train_val_test,
)


def people_table(n_people: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(n_people):
        base = int(rng.integers(10, 76))
        for k in range(int(rng.integers(1, 8))):
            rows.append(
                {"path": f"p{person}_{k}.jpg", "age": min(75, base + k), "person_id": f"wiki:{person}"}
            )
    return pd.DataFrame(rows)


def test_filter_age_range_is_inclusive():
    df = pd.DataFrame({"age": [9, 10, 40, 75, 76]})
    assert filter_age_range(df)["age"].tolist() == [10, 40, 75]
    assert filter_age_range(df, 0, 100)["age"].tolist() == [9, 10, 40, 75, 76]


def test_limit_classes_caps_each_age_reproducibly():
    df = pd.DataFrame({"age": [20] * 50 + [30] * 5, "path": [f"{i}.jpg" for i in range(55)]})
    capped = limit_classes_to_n(df, 10, seed=1)
    assert capped["age"].value_counts().to_dict() == {20: 10, 30: 5}
    assert capped.equals(limit_classes_to_n(df, 10, seed=1))
    assert not capped.equals(limit_classes_to_n(df, 10, seed=2))
    assert len(limit_classes_to_n(df, None)) == 55


def test_duplicates_keep_one_copy_and_drop_conflicting_ages(tmp_path):
    def save(name: str, colour: tuple[int, int, int]) -> str:
        Image.new("RGB", (8, 8), colour).save(tmp_path / name, format="PNG")
        return name

    df = pd.DataFrame(
        {
            "path": [
                save("a.png", (1, 2, 3)),
                save("a_copy.png", (1, 2, 3)),
                save("b.png", (9, 9, 9)),
                save("b_copy.png", (9, 9, 9)),
                save("c.png", (5, 5, 5)),
            ],
            "age": [30, 30, 20, 45, 50],
        }
    )
    kept, counts = drop_duplicate_images(df, tmp_path)
    assert sorted(kept["path"]) == ["a.png", "c.png"]  # b's copies disagree (20 vs 45): both dropped
    assert counts == {"unreadable files": 0, "copies with conflicting ages": 2, "repeated copies": 1}


def test_split_never_shares_a_person_and_keeps_the_proportions():
    df = people_table()
    train, val, test = split_df_train_val_test(df, seed=0)
    persons = [set(part["person_id"]) for part in (train, val, test)]
    assert not (persons[0] & persons[1]) and not (persons[0] & persons[2]) and not (persons[1] & persons[2])
    assert len(train) + len(val) + len(test) == len(df)
    assert abs(len(val) / len(df) - 0.1) < 0.02 and abs(len(test) / len(df) - 0.1) < 0.02


def test_split_is_stratified_by_age():
    df = people_table(n_people=1500)
    labels = assign_splits(df, seed=3)
    young, old = df["age"] < 30, df["age"] >= 55
    for mask in (young, old):  # every stretch of ages gets its share of test images
        share = (labels[mask] == "test").mean()
        assert 0.06 < share < 0.14


def test_split_is_reproducible_from_the_seed():
    df = people_table()
    assert assign_splits(df, seed=7).equals(assign_splits(df, seed=7))
    assert not assign_splits(df, seed=7).equals(assign_splits(df, seed=8))


def test_rows_without_a_person_id_are_their_own_group():
    df = pd.DataFrame(
        {"path": [f"{i}.jpg" for i in range(200)], "age": np.arange(200) % 60 + 10, "person_id": None}
    )
    labels = assign_splits(df, seed=0)
    assert set(labels) == {"train", "val", "test"}
    assert (labels == "train").mean() > 0.7
