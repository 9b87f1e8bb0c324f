"""Error by group (`evaluate --by`): the numbers per attribute value, UTKFace's gender and ethnicity from
the file names, CSV attribute columns, and the report of an evaluation broken down by group."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from age_detect_resnet.cli.evaluate import main as evaluate_main
from age_detect_resnet.data.csv_table import load_csv_table
from age_detect_resnet.data.utkface import load_utkface
from age_detect_resnet.evaluation.groups import attribute_values, group_errors, groups_markdown

Z = 1.959964


def hand_frame() -> pd.DataFrame:
    """a: 4 images (errors +2, -2, +5, -5), b: 2 images (+1, +1), c: 1 image (+20), 2 without a value."""
    rows = [
        ("a", 20, 22),
        ("a", 20, 18),
        ("a", 40, 45),
        ("a", 40, 35),
        ("b", 20, 21),
        ("b", 40, 41),
        ("c", 70, 90),
        (None, 30, 30),
        ("", 30, 31),
    ]
    return pd.DataFrame(rows, columns=["gender", "age", "predicted"])


def test_errors_per_value_with_confidence_intervals_and_reliability_flags():
    by = group_errors(hand_frame(), ["gender"], min_count=2)
    stats = by["attributes"]["gender"]
    assert stats["missing"] == 2  # None and "" are both "not labelled", never a group of their own
    assert list(stats["values"]) == ["a", "b", "c"]
    a, b, c = (stats["values"][v] for v in "abc")
    assert (a["count"], a["mae"], a["mean_signed_error"], a["reliable"]) == (4, 3.5, 0.0, True)
    half = Z * math.sqrt(3) / 2  # sample std of |2, 2, 5, 5| is sqrt(3), over sqrt(4) images
    assert a["mae_ci95"] == pytest.approx([3.5 - half, 3.5 + half])
    assert b["mae_ci95"] == pytest.approx([1.0, 1.0]) and b["mean_signed_error"] == 1.0
    assert (c["count"], c["mae"], c["reliable"], c["mae_ci95"]) == (1, 20.0, False, None)
    assert stats["age_groups"]["a"]["40-49"] == {
        "count": 2,
        "mae": 5.0,
        "mean_signed_error": 0.0,
        "reliable": True,
    }
    assert stats["age_groups"]["b"]["20-29"]["reliable"] is False


def test_photos_of_one_person_count_as_one_draw_in_the_interval():
    frame = pd.DataFrame(
        {"age": [20, 20, 40, 40], "predicted": [22, 18, 45, 35], "gender": "a", "person_id": list("ppqq")}
    )
    a = group_errors(frame, ["gender"], min_count=1)["attributes"]["gender"]["values"]["a"]
    # residuals of |2, 2, 5, 5| from 3.5 summed per person: -3, +3; 2/(2-1) * 18 / 4**2 = 2.25
    assert a["people"] == 2 and a["mae_se"] == pytest.approx(1.5)
    assert a["mae_ci95"] == pytest.approx([3.5 - Z * 1.5, 3.5 + Z * 1.5])  # as if 4 photos: +-Z*0.87
    text = groups_markdown(group_errors(frame, ["gender"], min_count=1))
    assert "| a | 4 (2 people) |" in text and "one person_id counted as one draw" in text


def test_the_gap_leaves_out_small_groups_and_the_worst_cells_compare_at_equal_age():
    stats = group_errors(hand_frame(), ["gender"], min_count=2)["attributes"]["gender"]
    gap = stats["gap"]
    # c's MAE of 20 is one image: it is flagged, not called the worst value.
    assert (gap["best"], gap["worst"], gap["reliable"]) == ("b", "a", True)
    assert gap["mae_gap"] == pytest.approx(2.5)
    half = Z * math.sqrt(3) / 2  # b's errors do not vary, so only a's uncertainty counts
    assert gap["mae_gap_ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    # All images aged 40-49 have |errors| 5, 5, 1 (MAE 11/3); a's two of them 5: 4/3 above.
    assert [(c["value"], c["age_group"]) for c in stats["worst_cells"]] == [("a", "40-49"), ("a", "20-29")]
    assert stats["worst_cells"][0]["excess_mae"] == pytest.approx(5 - 11 / 3)
    assert stats["worst_cells"][1]["age_group_mae"] == pytest.approx(5 / 3)


def test_a_gap_between_photos_of_the_same_people_compares_each_person_with_themselves():
    """Neutral and smiling photos of the same 30 people: what a person adds to both errors cancels in the
    gap, so its interval is the paired one (the spread of each person's difference), far narrower than
    the one for two groups of different people."""
    rng = np.random.default_rng(0)
    people = [f"p{i}" for i in range(30)]
    base = rng.uniform(0, 10, 30)  # how hard each face is, whatever its expression
    smiling = base + 2 + rng.normal(0, 0.5, 30)
    frame = pd.DataFrame(
        {
            "age": 30.0,
            "predicted": 30.0 + np.concatenate([base, smiling]),
            "expression": ["neutral"] * 30 + ["smiling"] * 30,
            "person_id": people * 2,
        }
    )
    by = group_errors(frame, ["expression"], min_count=30)
    stats = by["attributes"]["expression"]
    gap = stats["gap"]
    difference = smiling - base
    se = difference.std(ddof=1) / math.sqrt(30)  # the paired standard error
    assert gap["mae_gap"] == pytest.approx(difference.mean())
    assert gap["mae_gap_ci95"] == pytest.approx([difference.mean() - Z * se, difference.mean() + Z * se])
    independent = math.hypot(*(stats["values"][v]["mae_se"] for v in ("neutral", "smiling")))
    assert se < independent / 4 and gap["people_in_both"] == 30
    assert "30 people in both groups" in groups_markdown(by)


def test_with_too_few_images_everywhere_the_gap_says_it_is_not_reliable():
    stats = group_errors(hand_frame(), ["gender"], min_count=30)["attributes"]["gender"]
    # Nothing is reliable: the gap is among the values with an interval (c has one image), flagged.
    assert (stats["gap"]["best"], stats["gap"]["worst"], stats["gap"]["reliable"]) == ("b", "a", False)
    assert stats["gap"]["mae_gap"] == pytest.approx(2.5) and stats["gap"]["mae_gap_ci95"] is not None
    assert stats["worst_cells"] == []
    text = groups_markdown(group_errors(hand_frame(), ["gender"], min_count=30))
    assert "| c | 1 | 20.00 (n/a) | +20.00 | under 30 images: not reliable |" in text
    assert "not reliable" in text.split("Largest gap")[1]
    assert "2 image(s) with no gender" in text


def test_interval_labelled_data_reports_the_share_inside_per_value():
    frame = pd.DataFrame(
        {
            "age": [24.5, 24.5, 24.5],
            "age_low": [20, 20, 20],
            "age_high": [29, 29, 29],
            "predicted": [25.0, 35.0, 18.0],
            "gender": ["f", "f", "m"],
        }
    )
    values = group_errors(frame, ["gender"], min_count=1)["attributes"]["gender"]["values"]
    assert values["f"]["inside"] == 0.5 and values["f"]["mean_distance"] == 3.0
    assert values["m"]["mean_signed_distance"] == -2.0
    assert "inside the labelled group" in groups_markdown(group_errors(frame, ["gender"], min_count=1))


def test_attribute_values_name_groups_as_text():
    values = attribute_values(pd.Series([1.0, 0.0, np.nan, " white ", "", None, "east_asian"]))
    assert values.tolist() == ["1", "0", None, "white", None, None, "east_asian"]


def test_utkface_names_give_gender_and_ethnicity_words(tmp_path):
    names = {
        "25_0_2_20170116174525125.jpg.chip.jpg": ("male", "asian"),
        "39_1_20170116174525125.jpg.chip.jpg": ("female", None),  # race missing upstream
        "24_0_1_20170116220224657 .jpg.chip.jpg": ("male", "black"),  # stray space
        "30_1_4_20170116.jpg": ("female", "others"),
        "50_0_3_20170116.jpg": ("male", "indian"),
        "60_1_0_20170116.jpg": ("female", "white"),
        "45_20170116.jpg": (None, None),  # only the age: both missing, not a crash
    }
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    table = load_utkface(tmp_path).set_index("path")
    for name, (gender, ethnicity) in names.items():
        row = table.loc[name]
        assert (None if pd.isna(row["gender"]) else row["gender"]) == gender, name
        assert (None if pd.isna(row["ethnicity"]) else row["ethnicity"]) == ethnicity, name


def test_csv_datasets_keep_their_attribute_columns(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,age,person_id,gender,ethnicity,expression\na.jpg,24,p1,female,white,neutral\n")
    row = load_csv_table(csv).iloc[0]
    assert (row["gender"], row["ethnicity"], row["expression"]) == ("female", "white", "neutral")


def attribute_csv(tiny_run: Path, tmp_path: Path) -> Path:
    """12 of the tiny run's UTKFace crops as a CSV with gender and ethnicity columns (one left blank)."""
    root = Path(json.loads((tiny_run / "config.json").read_text())["data"]["data_root"])
    names = sorted(p.name for p in root.iterdir())[:12]
    table = pd.DataFrame(
        {
            "path": [str(root / n) for n in names],
            "age": [int(n.split("_")[0]) for n in names],
            "gender": [("male", "female")[i % 2] for i in range(12)],
            "ethnicity": ["white"] * 6 + ["black"] * 5 + [None],
        }
    )
    csv = tmp_path / "people.csv"
    table.to_csv(csv, index=False)
    return csv


def test_evaluate_by_gender_and_ethnicity_on_a_csv(tiny_run, tmp_path):
    csv = attribute_csv(tiny_run, tmp_path)
    out = tmp_path / "eval"
    args = ["--model", str(tiny_run), "--dataset", "csv", "--data-root", str(csv), "--split", "all"]
    assert evaluate_main([*args, "--by", "gender, ethnicity", "--out", str(out), "--num-workers", "0"]) == 0
    by = json.loads((out / "evaluation.json").read_text())["metrics"]["by"]
    assert list(by["attributes"]) == ["gender", "ethnicity"]
    ethnicity = by["attributes"]["ethnicity"]
    assert {v: s["count"] for v, s in ethnicity["values"].items()} == {"black": 5, "white": 6}
    assert ethnicity["missing"] == 1
    predictions = pd.read_csv(out / "predictions.csv")
    female = predictions[predictions["gender"] == "female"]
    assert by["attributes"]["gender"]["values"]["female"]["mae"] == pytest.approx(
        (female["predicted"] - female["age"]).abs().mean(), abs=1e-3
    )
    markdown = (out / "evaluation.md").read_text()
    assert "## Error by gender" in markdown and "## Error by ethnicity" in markdown
    assert "| black | 5 |" in markdown and "under 30 images: not reliable" in markdown
    assert (out / "plots" / "by_gender.png").is_file() and (out / "plots" / "by_ethnicity.png").is_file()


def test_evaluate_by_on_the_runs_test_split_takes_utkface_attributes_from_the_names(tiny_run, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_run), "--by", "gender,ethnicity", "--out", str(out), "--num-workers", "0"]
    assert evaluate_main(args) == 0
    metrics = json.loads((out / "evaluation.json").read_text())["metrics"]
    gender = metrics["by"]["attributes"]["gender"]
    assert set(gender["values"]) <= {"male", "female"}
    assert sum(s["count"] for s in gender["values"].values()) + gender["missing"] == metrics["count"]
    predictions = pd.read_csv(out / "predictions.csv")
    expected = predictions["path"].map(lambda p: ("male", "female")[int(Path(p).name.split("_")[1])])
    assert (predictions["gender"] == expected).all()  # joined by path: each image keeps its own label


def test_an_unknown_by_column_is_refused_naming_the_available_ones(tiny_run, tmp_path, caplog):
    csv = attribute_csv(tiny_run, tmp_path)
    args = ["--model", str(tiny_run), "--dataset", "csv", "--data-root", str(csv), "--split", "all"]
    with caplog.at_level(logging.ERROR):
        assert evaluate_main([*args, "--by", "race", "--out", str(tmp_path / "eval")]) == 2
    assert "--by race: no such column" in caplog.text and "available: ethnicity, gender" in caplog.text
    assert not (tmp_path / "eval").exists()
