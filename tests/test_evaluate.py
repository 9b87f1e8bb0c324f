"""Evaluation: sample-level metrics, the run's own test split, any dataset, detection on uncropped photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from age_detect_resnet.cli.evaluate import main as evaluate_main
from age_detect_resnet.evaluation.evaluate import evaluate_model
from age_detect_resnet.evaluation.metrics import age_group_label, age_metrics, classification_metrics
from age_detect_resnet.run_folder import evaluation_name
from age_detect_resnet.training.config import ConfigError
from conftest import TEST_IMAGES, require


def test_mae_is_over_samples_not_a_mean_of_batch_means():
    true = np.array([10, 20, 30, 40, 50.0])
    pred = np.array([12, 20, 30, 40, 40.0])
    metrics = age_metrics(true, pred)
    assert metrics["mae"] == pytest.approx(12 / 5)  # batches of (2, 3) would give mean(1, 3.33) = 2.17
    assert metrics["rmse"] == pytest.approx(np.sqrt((4 + 100) / 5))
    assert metrics["cs"]["5"] == pytest.approx(0.8)
    assert metrics["groups"]["50-59"] == {"count": 1, "mae": 10.0, "mean_signed_error": -10.0}
    assert [age_group_label(a) for a in (0, 9.9, 10, 69, 70, 95)] == [
        "0-9",
        "0-9",
        "10-19",
        "60-69",
        "70+",
        "70+",
    ]


def test_classification_metrics():
    result = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert result["accuracy"] == 0.75
    assert result["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert result["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_evaluate_reproduces_the_runs_test_report(tiny_run, tmp_path):
    out = tmp_path / "again"
    assert evaluate_main(["--model", str(tiny_run), "--out", str(out), "--num-workers", "0"]) == 0
    again = json.loads((out / "evaluation.json").read_text())["metrics"]
    original = json.loads((tiny_run / "evaluation.json").read_text())["metrics"]
    assert again["count"] == original["count"]
    assert again["mae"] == pytest.approx(original["mae"], abs=0.01)
    for name in ("evaluation.md", "predictions.csv", "plots/pred_vs_true.png", "plots/group_errors.png"):
        assert (out / name).is_file()


def test_evaluate_any_csv_dataset_with_split_all(tiny_run, tmp_path):
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    names = sorted(p.name for p in __import__("pathlib").Path(root).iterdir())[:12]
    csv = tmp_path / "other.csv"
    pd.DataFrame(
        {"path": [f"{root}/{n}" for n in names], "age": [int(n.split("_")[0]) for n in names]}
    ).to_csv(csv, index=False)
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                "--model",
                str(tiny_run),
                "--dataset",
                "csv",
                "--data-root",
                str(csv),
                "--split",
                "all",
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--tta",
            ]
        )
        == 0
    )
    document = json.loads((out / "evaluation.json").read_text())
    assert document["metrics"]["count"] == 12 and document["test-time flip"] is True


def test_evaluations_of_other_csvs_or_views_report_into_folders_of_their_own(tiny_run, tmp_path):
    """Without --out, a second CSV, or the same one with --tta, overwrote the first report
    (both went to <run>/eval-csv-all)."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    root = json.loads((run / "config.json").read_text())["data"]["data_root"]
    names = sorted(p.name for p in Path(root).iterdir())[:4]
    table = pd.DataFrame(
        {"path": [f"{root}/{n}" for n in names], "age": [int(n.split("_")[0]) for n in names]}
    )
    for stem in ("mine", "theirs"):
        table.to_csv(tmp_path / f"{stem}.csv", index=False)
    common = ["--model", str(run), "--dataset", "csv", "--split", "all", "--num-workers", "0"]
    for extra in (["--data-root", str(tmp_path / "mine.csv")], ["--data-root", str(tmp_path / "theirs.csv")]):
        assert evaluate_main([*common, *extra]) == 0
    assert evaluate_main([*common, "--data-root", str(tmp_path / "mine.csv"), "--tta"]) == 0
    reports = sorted(p.name for p in run.glob("eval-*") if (p / "evaluation.json").is_file())
    assert reports == ["eval-csv-mine-all", "eval-csv-mine-all-tta", "eval-csv-theirs-all"]
    assert evaluation_name("utkface", "test") == "eval-utkface-test"  # a run's own test split, as before
    assert evaluation_name("csv", "all", csv="x/photos.csv", backend="onnx") == "eval-csv-photos-all-onnx"


def test_a_report_written_over_an_earlier_one_keeps_none_of_its_figures(tiny_run, tmp_path):
    """An earlier --by's plots/by_gender.png survived a rerun without --by, read as the new report's."""
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    names = sorted(p.name for p in Path(root).iterdir())[:6]
    csv = tmp_path / "faces.csv"
    pd.DataFrame(
        {
            "path": [f"{root}/{n}" for n in names],
            "age": [int(n.split("_")[0]) for n in names],
            "gender": ["female", "male"] * 3,
        }
    ).to_csv(csv, index=False)
    out = tmp_path / "report"
    common = ["--model", str(tiny_run), "--dataset", "csv", "--data-root", str(csv), "--split", "all"]
    common += ["--out", str(out), "--num-workers", "0"]
    assert evaluate_main([*common, "--by", "gender"]) == 0
    assert (out / "plots" / "by_gender.png").is_file()
    assert evaluate_main(common) == 0
    assert not (out / "plots" / "by_gender.png").exists() and (out / "plots" / "cs_curve.png").is_file()


def test_split_test_on_another_dataset_is_refused_with_advice(tiny_run, tmp_path, caplog):
    csv = tmp_path / "x.csv"
    csv.write_text("path,age\na.jpg,20\n")
    assert evaluate_main(["--model", str(tiny_run), "--dataset", "csv", "--data-root", str(csv)]) == 2
    assert "--split all" in caplog.text


def test_evaluate_with_detection_on_uncropped_photos(tiny_run, tmp_path):
    photos = require(TEST_IMAGES)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for name in ("obama.jpg", "biden.jpg"):
        shutil.copy(photos / name, folder / name)
        rows.append({"path": name, "age": 50})
    from PIL import Image

    Image.new("RGB", (200, 200), (128, 128, 128)).save(folder / "blank.png")  # no face: whole image used
    rows.append({"path": "blank.png", "age": 30})
    pd.DataFrame(rows).to_csv(folder / "photos.csv", index=False)
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                "--model",
                str(tiny_run),
                "--dataset",
                "csv",
                "--data-root",
                str(folder / "photos.csv"),
                "--split",
                "all",
                "--detect",
                "--by",
                "head_pose",
                "--out",
                str(out),
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "evaluation.json").read_text())["metrics"]
    assert metrics["detection"] == {"faces_found": 2, "whole_image_used": 1}
    # Both portraits face the camera; the blank image has no landmarks, so no pose.
    pose = metrics["by"]["attributes"]["head_pose"]
    assert (
        pose["missing"] == 1
        and list(pose["values"]) == ["frontal"]
        and pose["values"]["frontal"]["count"] == 2
    )
    # Without --detect (a model not trained on aligned faces), the pose is unknown: refused with advice.
    with pytest.raises(ConfigError, match="add --detect"):
        evaluate_model(
            tiny_run, dataset="csv", data_root=folder / "photos.csv", split="all", by=["head_pose"]
        )


def test_interval_labels_report_the_share_inside_and_the_distance_to_the_group():
    from age_detect_resnet.evaluation.metrics import interval_label_metrics

    low, high = np.array([0, 0, 20, 70.0]), np.array([2, 2, 29, 100.0])
    pred = np.array([1.5, 5.0, 18.0, 80.0])
    result = interval_label_metrics(low, high, pred, np.array(["0-2", "0-2", "20-29", "70+"]))
    assert result["inside"] == 0.5 and result["mean_distance"] == pytest.approx((3 + 2) / 4)
    assert result["groups"]["0-2"] == {
        "count": 2,
        "inside": 0.5,
        "mean_distance": 1.5,
        "mean_signed_distance": 1.5,
    }
    assert result["groups"]["20-29"]["mean_signed_distance"] == -2.0  # predicted younger than the group
    assert list(result["groups"]) == ["0-2", "20-29", "70+"]  # in age order


def test_a_csv_labelled_with_age_groups_is_evaluated_by_group(tiny_run, tmp_path, caplog):
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    *names, other = sorted(p.name for p in __import__("pathlib").Path(root).iterdir())[:11]
    csv = tmp_path / "groups.csv"
    rows = [{"path": f"{root}/{n}", "age_group": "20-39", "age_low": 20, "age_high": 39} for n in names]
    rows.append({"path": f"{root}/{names[0]}", "age_group": "bad", "age_low": "x", "age_high": 3})
    # Another image: one listed with two groups is left out as conflicting (test_evaluation_labels.py);
    # a group with none of its ages in 0-100 (110-119; 100-109 would overlap at 100 and be kept).
    rows.append({"path": f"{root}/{other}", "age_group": "110-119", "age_low": 110, "age_high": 119})
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "eval"
    args = ["--model", str(tiny_run), "--dataset", "csv", "--data-root", str(csv), "--split", "all"]
    assert evaluate_main([*args, "--out", str(out), "--num-workers", "0"]) == 0
    assert "skipped 1 row" in caplog.text and "lines 12" in caplog.text  # the bad label, by line
    # The group beyond the evaluated ages (none of its ages in 0-100) is left out, and said to be.
    assert "1 of the 11 images in" in caplog.text and "outside ages 0-100" in caplog.text
    # Both are counted in the report too, beside the unreadable images: they change its figures.
    document = json.loads((out / "evaluation.json").read_text())
    assert document["CSV rows with age_low or age_high not a number skipped"] == 1
    assert document["images labelled outside ages 0-100 skipped"] == 1
    assert document["dataset"] == f"csv at {csv}"  # the CSV itself, not its folder
    assert (
        "- CSV rows with age_low or age_high not a number skipped: 1" in (out / "evaluation.md").read_text()
    )
    metrics = document["metrics"]
    groups = metrics["labelled_groups"]
    assert groups["count"] == 10 and set(groups["groups"]) == {"20-39"}
    predictions = pd.read_csv(out / "predictions.csv")
    inside = predictions["predicted"].between(20, 39).mean()
    assert groups["inside"] == pytest.approx(inside)
    assert "fall inside the labelled group" in (out / "evaluation.md").read_text()


def test_compare_tables_finished_runs_and_names_a_folder_it_cannot_read(tiny_run, tmp_path, capsys):
    from age_detect_resnet.cli.compare import main as compare_main

    assert compare_main([str(tiny_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = ([cell.strip() for cell in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    cells = dict(zip(header, row, strict=True))
    assert cells["run"] == tiny_run.name
    # a test MAE is read with the number of faces it was measured on (runs may differ in their splits)
    count = json.loads((tiny_run / "evaluation.json").read_text())["metrics"]["count"]
    assert cells["test images"] == f"{count:,}"
    assert compare_main([str(tiny_run), str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    broken = shutil.copytree(tiny_run, tmp_path / "broken")
    (broken / "run.json").write_text("{bad")
    assert compare_main([str(broken)]) == 2  # was a JSONDecodeError traceback
    assert f"{broken / 'run.json'} cannot be read" in capsys.readouterr().err
