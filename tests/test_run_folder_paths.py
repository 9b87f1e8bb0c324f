"""Paths a run folder records, read from any working folder: an older run's relative --init, averaged or
ensembled models and data root are found where the run was made, never in a folder of the same name
that holds another model; and the held-out check compares the image files two splits name, not their
paths relative to each dataset's folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from age_detect_resnet.run_folder import RunFolder, SavedSplit, lineage
from age_detect_resnet.training.combined_run import _validation_table, check_held_out
from age_detect_resnet.training.config import ConfigError


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _calibration(tiny_run: Path, folder: Path) -> Path:
    """tiny_run's split with two of the faces tiny_run trained on moved to test."""
    calibration = shutil.copytree(tiny_run, folder)
    split = pd.read_csv(calibration / "split.csv")
    split.loc[split.index[split["split"] == "train"][:2], "split"] = "test"
    split.to_csv(calibration / "split.csv", index=False)
    return calibration


def _old_run(source: Path, folder: Path, *, out: str, init: str | None = None) -> Path:
    """A copy of `source` recorded as an older run records itself: --init and --out as typed."""
    run = shutil.copytree(source, folder)

    def record(config: dict) -> None:
        config["model"]["init"] = init
        config["train"]["out"] = out

    _edit(run / "config.json", record)
    return run


def test_a_relative_init_is_found_where_the_run_was_made_from_any_folder(
    tiny_run, tmp_path, monkeypatch, caplog
):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    start = shutil.copytree(tiny_run, project / "runs" / "start")  # trained on the two held-out faces
    calibration = _calibration(tiny_run, tmp_path / "calibration")
    child = _old_run(calibration, project / "runs" / "child", out="runs/child", init="runs/start")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert RunFolder(child).made_in == project
    with pytest.raises(ConfigError, match=rf"{start} \(which {child} was made from\) trained on 2 of"):
        check_held_out([str(child)], RunFolder(calibration))
    # A folder of that name in the current folder, holding a model that saw none of them, is not taken.
    shutil.copytree(calibration, elsewhere / "runs" / "start")
    assert lineage(str(child)) == [str(child), str(start)]
    with pytest.raises(ConfigError, match="trained on 2 of"):
        check_held_out([str(child)], RunFolder(calibration))

    # Moved (its --out no longer says where it was made): the folders above it still hold its start.
    moved = _old_run(calibration, project / "runs" / "moved", out="elsewhere/x", init="runs/start")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"{start} \(which {moved} was made from\) trained on 2 of"):
        check_held_out([str(moved)], RunFolder(calibration))
    # Nowhere to be found: a warning; a folder of that name with another architecture is no start.
    lost = _old_run(calibration, tmp_path / "lost" / "run", out="x", init="gone/start")
    wrong = shutil.copytree(calibration, tmp_path / "gone" / "start")
    _edit(wrong / "best.json", lambda metadata: metadata["model"].update(backbone="resnet18"))
    with caplog.at_level(logging.WARNING):
        check_held_out([str(lost)], RunFolder(calibration))
    assert f"gone/start (which {lost} was made from) is recorded relative to the folder {lost}" in caplog.text
    assert (
        f"{wrong} is a resnet18 with a regression head, and {lost} fine-tuned a mobilenet_v2" in caplog.text
    )
    assert lineage(str(lost)) == [str(lost)]


def test_a_relative_averaged_model_is_the_one_of_the_recorded_sha256(tiny_run, tmp_path, monkeypatch, caplog):
    project = tmp_path / "project"
    start = shutil.copytree(tiny_run, project / "runs" / "start")
    sha256 = json.loads((start / "best.json").read_text())["sha256"]
    calibration = _calibration(tiny_run, tmp_path / "calibration")
    averaged = _old_run(calibration, project / "runs" / "averaged", out="runs/calibration")
    _edit(
        averaged / "best.json",
        lambda metadata: metadata.update(
            averaged_from=[{"model": "runs/start", "sha256": sha256, "weight": 1}]
        ),
    )
    monkeypatch.chdir(tmp_path)
    other = shutil.copytree(calibration, tmp_path / "runs" / "start")  # another model by that name
    _edit(other / "best.json", lambda metadata: metadata.update(sha256="0" * 64))
    assert lineage(str(averaged)) == [str(averaged), str(start)]
    with pytest.raises(ConfigError, match=rf"{start} \(which {averaged} was made from\) trained on 2 of"):
        check_held_out([str(averaged)], RunFolder(calibration))
    shutil.rmtree(start)
    with caplog.at_level(logging.WARNING):
        check_held_out([str(averaged)], RunFolder(calibration))
    assert f"{other} is another model (not the SHA-256 recorded)" in caplog.text


def _split(path: Path, dataset: str, data_root: Path | None, rows: list[tuple[str, str]]) -> SavedSplit:
    pd.DataFrame(rows, columns=["path", "split"]).assign(age=30).to_csv(path, index=False)
    return SavedSplit(path, dataset, data_root, str(path))


def test_splits_share_the_images_they_name_whatever_their_data_roots(tmp_path):
    faces = tmp_path / "data" / "faces"
    faces.mkdir(parents=True)
    elsewhere = tmp_path / "other" / "faces"
    elsewhere.mkdir(parents=True)
    folder = _split(tmp_path / "a.csv", "utkface", faces, [("a.jpg", "train"), ("b.jpg", "val")])
    # A CSV beside faces/ naming the same files by faces/NAME: they are those images.
    listed = _split(
        tmp_path / "b.csv",
        "csv",
        tmp_path / "data" / "labels.csv",
        [("faces/a.jpg", "test"), ("faces/b.jpg", "train")],
    )
    assert folder.shared(("val", "test"), listed, ("train",)) == {"b.jpg"}
    assert listed.shared(("val", "test"), folder, ("train",)) == {"faces/a.jpg"}
    # A copy of UTKFace in another folder (on a scratch disk, say): its names identify the same photos.
    copy = _split(tmp_path / "c.csv", "utkface", elsewhere, [("a.jpg", "val"), ("b.jpg", "train")])
    assert folder.shared(("val", "test"), copy, ("train",)) == {"b.jpg"}
    # Two CSV tables whose own images happen to share names elsewhere: no image in common.
    mine = _split(tmp_path / "e.csv", "csv", tmp_path / "data" / "labels.csv", [("faces/b.jpg", "val")])
    theirs = _split(tmp_path / "f.csv", "csv", tmp_path / "other" / "t.csv", [("faces/b.jpg", "train")])
    assert mine.shared(("val", "test"), theirs, ("train",)) == set()
    # The bundled model's split has no folder: its UTKFace names identify the photos.
    bundled = _split(tmp_path / "d.csv", "utkface", None, [("b.jpg", "train")])
    assert listed.shared(("val", "test"), bundled, ("train",)) == set()
    assert folder.shared(("val", "test"), bundled, ("train",)) == {"b.jpg"}


def test_a_member_on_a_csv_of_the_calibration_runs_faces_is_refused(tiny_run, tmp_path):
    calibration = _calibration(tiny_run, tmp_path / "calibration")
    root = Path(json.loads((tiny_run / "config.json").read_text())["data"]["data_root"])
    # A run on a CSV beside that folder, naming its images as FOLDER/NAME, on tiny_run's split.
    listed = shutil.copytree(tiny_run, tmp_path / "listed")
    _edit(
        listed / "config.json",
        lambda c: c["data"].update(dataset="csv", data_root=str(root.parent / "x.csv")),
    )
    split = pd.read_csv(listed / "split.csv")
    split.assign(path=root.name + "/" + split["path"]).to_csv(listed / "split.csv", index=False)
    with pytest.raises(ConfigError, match=rf"{listed} trained on 2 of"):
        check_held_out([str(listed)], RunFolder(calibration))
    # A UTKFace run on another folder holding those names: UTKFace's names identify the photos (a copy).
    other = shutil.copytree(tiny_run, tmp_path / "other")
    (tmp_path / "faces").mkdir()
    _edit(other / "config.json", lambda c: c["data"].update(data_root=str(tmp_path / "faces")))
    with pytest.raises(ConfigError, match=rf"{other} trained on 2 of"):
        check_held_out([str(other)], RunFolder(calibration))


def test_a_relative_data_root_is_found_where_the_run_was_made(tiny_run, tmp_path, monkeypatch):
    root = Path(json.loads((tiny_run / "config.json").read_text())["data"]["data_root"])
    project = tmp_path / "project"
    shutil.copytree(root, project / "faces")
    run = shutil.copytree(tiny_run, project / "runs" / "run")

    def relative(config: dict) -> None:
        config["data"]["data_root"] = "faces"
        config["train"]["out"] = "runs/run"

    _edit(run / "config.json", relative)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert RunFolder(run).data_root == project / "faces"
    table, folder = _validation_table(RunFolder(run))
    assert folder == project / "faces" and len(table) > 0
    # Nowhere to be found: the message says what to do, for commands that have no --data-root.
    moved = shutil.copytree(run, tmp_path / "moved")
    with pytest.raises(
        ConfigError, match=r"data_root faces, relative to the folder it was trained in\): run"
    ):
        _validation_table(RunFolder(moved))


def test_combined_runs_record_their_models_by_absolute_paths(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from age_detect_resnet.training.combined_run import _sources

    monkeypatch.chdir(tmp_path)
    loaded = [SimpleNamespace(metadata={"sha256": "a"}), SimpleNamespace(metadata={"sha256": "b"})]
    sources = _sources(["runs/a", "default"], loaded, [0.5, 0.5])
    assert [source["model"] for source in sources] == [str(tmp_path / "runs" / "a"), "default"]


def test_a_run_under_a_linked_runs_folder_was_made_in_the_links_folder(tmp_path, monkeypatch):
    """runs/ as a link to a bigger disk: the run was made in the project folder the link is in, where
    its relative data root is, not on the disk the link points to."""
    disk, project = tmp_path / "disk", tmp_path / "project"
    (disk / "runs" / "x").mkdir(parents=True)
    (project / "data" / "raw").mkdir(parents=True)
    (project / "runs").symlink_to(disk / "runs")
    settings = {"train": {"out": "runs/x"}, "data": {"dataset": "utkface", "data_root": "data/raw"}}
    (disk / "runs" / "x" / "config.json").write_text(json.dumps(settings))
    monkeypatch.chdir(tmp_path)
    run = RunFolder(project / "runs" / "x")
    assert run.made_in == project
    assert run.data_root == project / "data" / "raw"
