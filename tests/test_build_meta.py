"""build_meta: the real .mat layout, the official age rule, and exactly the rows each filter removes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from age_detect_resnet.data.imdb_wiki import (
    DATASET_PAGE,
    MetaError,
    build_meta,
    datenum_to_year_month,
    official_age,
)
from conftest import REPLICA, require


def datenum(year: int, month: int, day: int) -> float:
    from datetime import date

    return float(date(year, month, day).toordinal() + 366)


def _cells(values: list) -> np.ndarray:
    cells = np.empty((1, len(values)), dtype=object)
    for i, value in enumerate(values):
        cells[0, i] = value
    return cells


def write_wiki(root: Path, rows: list[dict]) -> None:
    """A wiki.mat in the real layout ((1,1) struct of (1,N) fields) and a JPEG per row."""
    crop = root / "wiki_crop"
    for row in rows:
        path = crop / row["full_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (len(row["full_path"]) * 7 % 255, 90, 120)).save(path)
    struct = {
        "dob": np.array([[r["dob"] for r in rows]]),
        "photo_taken": np.array([[r["photo_taken"] for r in rows]], dtype=np.uint16),
        "full_path": _cells([np.array([r["full_path"]]) for r in rows]),
        "gender": np.array([[r.get("gender", 1.0) for r in rows]]),
        "name": _cells([np.array([f"Person {i}"]) for i in range(len(rows))]),
        "face_location": _cells([np.array([[10.0, 10.0, 50.0, 50.0]]) for _ in rows]),
        "face_score": np.array([[r["face_score"] for r in rows]]),
        "second_face_score": np.array([[r["second_face_score"] for r in rows]]),
    }
    scipy.io.savemat(crop / "wiki.mat", {"wiki": struct})


def test_datenum_conversion_and_official_age_rule():
    year, month, valid = datenum_to_year_month(
        np.array([datenum(1981, 5, 5), datenum(1970, 7, 1), 1.0, 366.0, np.nan])
    )
    assert list(year[:2]) == [1981, 1970] and list(month[:2]) == [5, 7]
    assert list(valid) == [True, True, False, False, False]
    # photo taken on 1 July: born in May -> had the birthday; born in July or later -> not yet
    ages = official_age(
        np.array([datenum(1981, 5, 5), datenum(1981, 7, 2), 1.0]), np.array([2009, 2009, 2009])
    )
    assert ages[0] == 28 and ages[1] == 27 and np.isnan(ages[2])


def test_filters_remove_exactly_the_rows_they_should(tmp_path):
    ok = {"face_score": 2.5, "second_face_score": np.nan, "photo_taken": 2009}
    rows = [
        {**ok, "full_path": "17/10000217_1981-05-05_2009.jpg", "dob": datenum(1981, 5, 5)},  # kept, age 28
        {
            **ok,
            "full_path": "17/10000217_1981-05-05_2010.jpg",
            "dob": datenum(1981, 5, 5),
            "photo_taken": 2010,
            "face_score": 3.5,
        },
        {**ok, "full_path": "20/20000020_1990-01-01_2009.jpg", "dob": 1.0},  # broken date of birth
        {
            **ok,
            "full_path": "21/20000021_1990-01-01_2009.jpg",
            "dob": datenum(1990, 1, 1),
            "face_score": -np.inf,
        },
        {
            **ok,
            "full_path": "22/20000022_1990-01-01_2009.jpg",
            "dob": datenum(1990, 1, 1),
            "second_face_score": 1.2,
        },
        {**ok, "full_path": "23/20000023_2015-01-01_2009.jpg", "dob": datenum(2015, 1, 1)},  # negative age
        {**ok, "full_path": "24/20000024_1880-01-01_2009.jpg", "dob": datenum(1880, 1, 1)},  # 129 years old
        {**ok, "full_path": "25/20000025_1990-01-01_2009.jpg", "dob": datenum(1990, 1, 1), "face_score": 0.5},
    ]
    write_wiki(tmp_path, rows)
    (tmp_path / "wiki_crop" / "25" / "20000025_1990-01-01_2009.jpg").unlink()  # listed but missing on disk
    df, filters = build_meta(tmp_path)
    assert filters.total == 8
    assert filters.removed == {
        "broken date of birth": 1,
        "no face found": 1,
        "second face found": 1,
        "age outside 0-100": 2,
        "image file missing": 1,
    }
    assert df["path"].tolist() == [
        "wiki_crop/17/10000217_1981-05-05_2009.jpg",
        "wiki_crop/17/10000217_1981-05-05_2010.jpg",
    ]
    assert df["age"].tolist() == [28, 29]
    assert set(df["person_id"]) == {"wiki:10000217"}  # one person: the id from the file name
    assert {"gender", "face_score", "second_face_score", "source", "sha1"} <= set(df.columns)

    _, strict_filters = build_meta(tmp_path, min_face_score=3.0)
    # runs before the age filter: the 2.5-scored rows (kept, too young, too old) and the 0.5 row
    assert strict_filters.removed["face score below 3"] == 4


def test_a_path_leaving_the_crop_folder_is_dropped_and_counted(tmp_path):
    ok = {"face_score": 2.5, "second_face_score": np.nan, "photo_taken": 2009, "dob": datenum(1981, 5, 5)}
    rows = [
        {**ok, "full_path": "17/10000217_1981-05-05_2009.jpg"},
        {**ok, "full_path": "../outside/10000218_1981-05-05_2009.jpg"},  # a real file, beside wiki_crop/
    ]
    write_wiki(tmp_path, rows)
    assert (tmp_path / "outside" / "10000218_1981-05-05_2009.jpg").is_file()
    df, filters = build_meta(tmp_path)
    assert df["path"].tolist() == ["wiki_crop/17/10000217_1981-05-05_2009.jpg"]
    assert filters.removed["path leaves its crop folder"] == 1
    assert "path leaves its crop folder" in filters.summary(len(df))


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(MetaError, match="imdb-wiki"):
        build_meta(tmp_path)


@pytest.mark.parametrize("source", ["wiki", "imdb"])
def test_matches_the_replica_oracle(source, tmp_path):
    """The kept rows and their ages equal the oracle CSV written by the replica's authors."""
    replica = require(REPLICA)
    root = tmp_path / "raw"
    root.mkdir()
    (root / f"{source}_crop").symlink_to(replica / f"{source}_crop")
    df, _ = build_meta(root)
    expected = pd.read_csv(replica / f"{source}_expected.csv")
    expected = expected[expected["face_found"] & expected["single_face"] & expected["age"].between(0, 100)]
    expected_ages = dict(zip(f"{source}_crop/" + expected["full_path"], expected["age"], strict=True))
    assert dict(zip(df["path"], df["age"], strict=True)) == expected_ages
    if source == "imdb":  # the identity is celeb_id
        assert df["person_id"].str.startswith("imdb:").all()


def test_module_path_from_the_seed_writes_the_table(tmp_path):
    replica = require(REPLICA)
    out = tmp_path / "processed" / "meta.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "age_detect_resnet.preprocessing.build_meta",
            "--data-root",
            str(replica),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "no face found" in done.stdout and "rows kept" in done.stdout
    table = pd.read_csv(out)
    assert set(table["source"]) == {"imdb", "wiki"}
    assert table["age"].between(0, 100).all()


def test_an_out_folder_is_refused_naming_out_before_the_metadata_is_built(tmp_path, caplog):
    from age_detect_resnet.cli.build_meta import main

    ok = {"face_score": 2.5, "second_face_score": np.nan, "photo_taken": 2009, "dob": datenum(1981, 5, 5)}
    write_wiki(tmp_path / "raw", [{**ok, "full_path": "17/10000217_1981-05-05_2009.jpg"}])
    folder = tmp_path / "out"
    folder.mkdir()
    with caplog.at_level(logging.ERROR):
        status = main(["--data-root", str(tmp_path / "raw"), "--out", str(folder)])
    assert status == 2  # was "[Errno 21] Is a directory: '.../.meta.cc02dd74.tmp' -> ..."
    assert f"--out {folder} is a folder: pass the CSV file to write, e.g. --out {folder / 'meta.csv'}" in (
        caplog.text
    )
    assert list(folder.iterdir()) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_a_utkface_folder_is_named_as_one_that_needs_no_build_meta(tmp_path, caplog):
    from age_detect_resnet.cli.build_meta import main

    Image.new("RGB", (32, 32)).save(tmp_path / "25_0_2_20170116174525125.jpg.chip.jpg")
    with caplog.at_level(logging.ERROR):
        status = main(["--data-root", str(tmp_path), "--out", str(tmp_path / "meta.csv")])
    assert status == 2
    assert "looks like UTKFace" in caplog.text and DATASET_PAGE not in caplog.text  # not: download IMDB-WIKI
    assert f"train with --dataset utkface --data-root {tmp_path}" in caplog.text
    assert not (tmp_path / "meta.csv").exists()
