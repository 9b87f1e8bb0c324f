"""Evaluation labels: repeated and contradictory CSV rows, CSVs mixing exact ages with age groups, what the
report says it measured (the MAE, the interval's coverage, the worst groups), the options a saved split
refuses, and the tables built from several reports (compare, real_photos_table)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from age_detect_resnet.cli.evaluate import main as evaluate_main
from age_detect_resnet.data.csv_table import load_csv_table
from age_detect_resnet.evaluation.compare import comparison_table
from age_detect_resnet.evaluation.evaluate import evaluation_table, flip_text, labelled_in_range
from age_detect_resnet.evaluation.groups import error_bars, group_errors, groups_markdown
from age_detect_resnet.evaluation.metrics import MIN_RELIABLE_COUNT, interval_label_metrics
from age_detect_resnet.evaluation.report import evaluation_metrics, metrics_markdown
from conftest import load_script

HEAD = SimpleNamespace(interval=0.8)  # all evaluation_metrics reads of a regression head here


def write_csv(folder: Path, text: str, images: str = "abcdef") -> Path:
    (folder / "img").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8)).save(folder / "img" / f"{name}.jpg")
    csv = folder / "faces.csv"
    csv.write_text(text)
    return csv


# A: duplicates


def test_a_repeated_row_counts_once_and_an_image_with_conflicting_labels_is_left_out(tmp_path, caplog):
    csv = write_csv(
        tmp_path,
        "path,age,gender\n"
        "img/a.jpg,31,f\n"
        "img/b.jpg,40,m\n"
        "./img/a.jpg,31,f\n"  # the same file and labels again (spelled otherwise)
        f"{tmp_path / 'img' / 'a.jpg'},31.0,f\n"  # and again, absolute, the age written as 31.0
        "img/c.jpg,20,f\n"
        "img/c.jpg,25,f\n"  # the same image, another age: which is right cannot be told
        "img/d.jpg,50,f\n"
        "img/d.jpg,50,m\n",  # another gender: also a conflict
    )
    with caplog.at_level(logging.WARNING):
        table = load_csv_table(csv)
    assert table["path"].tolist() == ["img/a.jpg", "img/b.jpg"]
    assert table.attrs["removed"] == {
        "CSV rows with conflicting labels for an image listed again": 4,
        "CSV rows with a repeat of an earlier row": 2,
    }
    assert "lines 6, 7, 8, 9" in caplog.text and "delete the others" in caplog.text
    assert "lines 4, 5" in caplog.text and "delete the repeated rows" in caplog.text
    # evaluate's table keeps the adapter's counts, which its report lists
    table, _, _ = evaluation_table(
        None, dataset="csv", data_root=csv, meta=None, split="all", by=(), min_age=0, max_age=100, limit=None
    )
    assert table.attrs["removed"]["CSV rows with a repeat of an earlier row"] == 2


def test_a_row_ruled_out_for_its_own_reason_does_not_make_a_conflict(tmp_path):
    csv = write_csv(tmp_path, "path,age\nimg/a.jpg,31\nimg/a.jpg,old\n")
    table = load_csv_table(csv)
    assert table["age"].tolist() == [31]
    assert table.attrs["removed"] == {"CSV rows with age missing, not a number or infinite": 1}


# B and C: ages with groups, and CSVs mixing the two


def test_an_age_outside_its_own_group_is_left_out_with_advice(tmp_path, caplog):
    csv = write_csv(tmp_path, "path,age,age_low,age_high\nimg/a.jpg,25,20,29\nimg/b.jpg,45,20,29\n")
    with caplog.at_level(logging.WARNING):
        table = load_csv_table(csv)
    assert table["path"].tolist() == ["img/a.jpg"] and table["age"].tolist() == [25]
    assert table["age_from_group"].tolist() == [False]
    assert table.attrs["removed"] == {"CSV rows with an age outside its own age_low-age_high": 1}
    assert "correct one of them (lines 3)" in caplog.text


def test_a_mixed_csv_takes_the_midpoint_where_only_a_group_is_given(tmp_path, caplog):
    csv = write_csv(
        tmp_path,
        "path,age,age_low,age_high\n"
        "img/a.jpg,31,,\n"  # an exact age alone
        "img/b.jpg,,20,29\n"  # a group alone: its midpoint, as in a CSV of groups
        "img/c.jpg,22,20,29\n"  # both
        "img/d.jpg,,70,\n"  # an open group without its upper end
        "img/e.jpg,,,\n",  # nothing
    )
    with caplog.at_level(logging.WARNING):
        table = load_csv_table(csv)
    assert table["path"].tolist() == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    assert table["age"].tolist() == [31, 24.5, 22]
    assert table["age_from_group"].tolist() == [False, True, False]
    assert table.attrs["removed"] == {
        "CSV rows with age_high blank or infinite": 1,
        "CSV rows with age missing, not a number or infinite": 1,
    }
    # The open-group advice for the row with a lower end only; not for the rows with an age alone
    assert caplog.text.count("70+ needs an upper end") == 1 and "(lines 5)" in caplog.text
    assert "give each row an age, or its age group as age_low,age_high" in caplog.text


def mixed_frame() -> pd.DataFrame:
    """Two rows with an exact age alone, two labelled 20-29 (one of them with an exact age too)."""
    return pd.DataFrame(
        {
            "path": list("abcd"),
            "age": [31.0, 40.0, 24.5, 22.0],
            "predicted": [30.0, 44.0, 25.0, 35.0],
            "age_low": [np.nan, np.nan, 20, 20],
            "age_high": [np.nan, np.nan, 29, 29],
            "age_from_group": [False, False, True, False],
            "lower": [28.0, 41.0, 20.0, 30.0],
            "upper": [32.0, 47.0, 30.0, 40.0],
        }
    )


def test_group_figures_of_a_mixed_csv_are_over_the_rows_with_a_group_and_say_so():
    metrics = evaluation_metrics(mixed_frame(), HEAD)
    labelled = metrics["labelled_groups"]
    # Rows without bounds were counted as outside their (missing) group, with a NaN distance
    assert labelled["count"] == 2 and labelled["inside"] == 0.5
    assert labelled["mean_distance"] == pytest.approx(3.0) and list(labelled["groups"]) == ["20-29"]
    text = metrics_markdown(metrics)
    assert "(2 of the 4 images; the others have an exact age alone)" in text
    assert "to the exact age where one is given, and to the group's midpoint for the 1 images" in text
    by = group_errors(mixed_frame().assign(gender=["f", "f", "m", "m"]), ["gender"], min_count=1)
    values = by["attributes"]["gender"]["values"]
    assert "inside" not in values["f"] and values["m"]["inside"] == 0.5
    assert "| f | 2 |" in groups_markdown(by) and " – | – |" in groups_markdown(by)


def test_with_an_exact_age_on_every_row_the_mae_is_not_called_the_midpoints():
    frame = mixed_frame().iloc[2:].assign(age_from_group=False)
    text = metrics_markdown(evaluation_metrics(frame, HEAD))
    assert "the MAE below is to the exact ages given" in text and "midpoint" not in text


# E: the interval's coverage


def test_interval_coverage_is_measured_on_exact_ages_only():
    metrics = evaluation_metrics(mixed_frame(), HEAD)
    # Exact ages 31 in 28-32, 40 not in 41-47, 22 not in 30-40; the midpoint row is not measured
    assert metrics["interval"]["coverage"] == pytest.approx(1 / 3)
    assert metrics["interval"]["coverage_images"] == 3
    assert "real coverage 33.3% on the 3 images with an exact age" in metrics_markdown(metrics)
    groups_only = mixed_frame().iloc[2:3]
    metrics = evaluation_metrics(groups_only, HEAD)
    assert metrics["interval"]["coverage"] is None
    assert "its real coverage is not measured" in metrics_markdown(metrics)


# F: a blank group name


def test_a_blank_group_name_is_named_from_its_bounds():
    low, high = np.array([20, 20, 70, 0.0]), np.array([29, 29, 100, 2.0])
    labels = np.array([np.nan, "20-29", "", "0-2"], dtype=object)
    result = interval_label_metrics(low, high, np.array([25, 25, 80, 1.0]), labels)
    assert list(result["groups"]) == ["0-2", "20-29", "70+"] and result["groups"]["20-29"]["count"] == 2


# G: the worst groups


def test_worst_groups_leave_out_groups_too_small_to_compare_and_the_table_marks_them():
    true = np.r_[np.full(MIN_RELIABLE_COUNT, 25.0), np.full(MIN_RELIABLE_COUNT, 45.0), [75.0]]
    pred = np.r_[true[:MIN_RELIABLE_COUNT] + 1, true[MIN_RELIABLE_COUNT:-1] + 3, [100.0]]
    frame = pd.DataFrame({"age": true, "predicted": pred})
    metrics = evaluation_metrics(frame, HEAD)
    assert metrics["worst_groups"] == ["40-49", "20-29"]  # not 70+, one image 25 years off
    text = metrics_markdown(metrics)
    assert "| 70+ | 1* |" in text and f"| 20-29 | {MIN_RELIABLE_COUNT} |" in text
    assert f"Worst groups (of {MIN_RELIABLE_COUNT}+ images): 40-49, 20-29." in text
    small = evaluation_metrics(frame.tail(1), HEAD)
    assert small["worst_groups"] == [] and "No age group has" in metrics_markdown(small)


# D: options a saved split refuses


def test_age_range_and_limit_are_refused_with_a_saved_split(tiny_run, caplog):
    for option in (["--limit", "5"], ["--min-age", "20"], ["--max-age", "60", "--limit", "3"]):
        caplog.clear()
        assert evaluate_main(["--model", str(tiny_run), "--split", "test", *option]) == 2
        assert f"{option[0]}" in caplog.text and "to --split all" in caplog.text


# H: compare with another interval


def run_entry(name: str, level: float | None) -> dict:
    metrics = {"mae": 5.0, "rmse": 6.0, "cs": {"5": 0.6}, "groups": {}, "count": 10}
    if level is not None:
        metrics["interval"] = {"nominal": level, "coverage": 0.85, "mean_width": 10.0}
    return {
        "name": name,
        "run": {"epochs_run": 1, "wall_time": 60, "best_val_mae": 5.0},
        "metrics": metrics,
        "config": {
            "model": {"backbone": "resnet18", "head": "regression", "interval": level},
            "optim": {"age_weighting": False},
            "data": {"image_size": 64},
        },
    }


def test_compare_heads_the_coverage_with_the_runs_interval_level():
    assert "| 90% interval coverage |" in comparison_table([run_entry("a", 0.9), run_entry("b", None)])
    mixed = comparison_table([run_entry("a", 0.9), run_entry("b", 0.8)])
    assert "| interval coverage |" in mixed and "85.0% of 90%" in mixed and "85.0% of 80%" in mixed


# I: real_photos_table


def write_report(path: Path, metrics: dict, split: str = "all") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, "metrics": metrics}))


def real_photos_folder(folder: Path, groups: dict[str, dict], utk_split: str = "test") -> Path:
    write_report(folder / "portraits" / "evaluation.json", {"mae": 7.0})
    group_stats = {g: {"count": 1, "inside": 0.5, "mean_distance": d} for g, d in groups.items()}
    labelled = {"inside": 0.5, "mean_distance": 3.0, "groups": group_stats}
    write_report(folder / "fairface" / "evaluation.json", {"mae": 6.0, "labelled_groups": labelled})
    write_report(folder / "utkface-test" / "evaluation.json", {"mae": 5.0, "count": 9}, split=utk_split)
    return folder


def test_real_photos_table_takes_every_models_groups_in_age_order(tmp_path, capsys):
    table = load_script("experiments/real_photos_table.py")
    one = real_photos_folder(tmp_path / "one", {"20-29": 1.0, "70+": 2.0})
    two = real_photos_folder(tmp_path / "two", {"3-9": 3.0, "20-29": 4.0})
    assert table.main([f"one={one}", f"two={two}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| FairFace mean distance (inside)"))
    assert header.endswith("| 3-9 | 20-29 | 70+ |")
    assert "| one | – | 1.00 (50%) | 2.00 (50%) |" in lines
    assert "| two | 3.00 (50%) | 4.00 (50%) | – |" in lines


def test_real_photos_table_refuses_a_utkface_evaluation_not_of_the_test_split(tmp_path):
    table = load_script("experiments/real_photos_table.py")
    folder = real_photos_folder(tmp_path / "one", {"20-29": 1.0}, utk_split="all")
    with pytest.raises(SystemExit, match=r"utkface-test/evaluation.json: an evaluation of --split all"):
        table.main([f"one={folder}"])


# J: groups overlapping the age range, the plot's bars, the flip built into a model


def test_an_age_group_overlapping_the_age_range_is_kept(tmp_path):
    csv = write_csv(
        tmp_path,
        "path,age,age_low,age_high\nimg/a.jpg,,90,130\nimg/b.jpg,,101,130\nimg/c.jpg,105,,\nimg/d.jpg,99,90,130\n",
    )
    kept, _, _ = evaluation_table(
        None, dataset="csv", data_root=csv, meta=None, split="all", by=(), min_age=0, max_age=100, limit=None
    )
    # 90-130 overlaps 0-100 (its midpoint, 110, does not); 101-130 does not; exact ages by themselves
    assert kept["path"].tolist() == ["img/a.jpg", "img/d.jpg"]
    assert labelled_in_range(load_csv_table(csv), 0, 100).tolist() == [True, False, False, True]


def test_a_value_without_an_interval_gets_no_error_bar():
    values = {
        "a": {"mae": 3.0, "mae_ci95": [2.0, 5.0]},
        "b": {"mae": 4.0, "mae_ci95": None},  # one person
    }
    with_ci, yerr = error_bars(values)
    assert with_ci == [0] and yerr.tolist() == [[1.0], [2.0]]
    assert error_bars({"b": values["b"]})[1].shape == (2, 0)


def test_a_mirrored_model_reports_its_flip_as_built_in():
    assert flip_text({"model": {"mirror": True}}, False).startswith("built into the model")
    assert flip_text({"model": {"mirror": True}}, True).startswith("built into the model")
    assert flip_text({"model": {}}, True) is True and flip_text({}, False) is False
