"""Dataset adapters: UTKFace names (malformed ones too), CSV tables, and recognising a dataset folder."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from age_detect_resnet.data.csv_table import CsvTableError, load_csv_table
from age_detect_resnet.data.sources import DatasetNotFoundError, guess_dataset, load_table
from age_detect_resnet.data.utkface import load_utkface, parse_utkface_name
from conftest import REPLICA, UTKFACE, require


@pytest.mark.parametrize(
    ("name", "age", "gender", "race"),
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", 25, "male", 2),
        ("39_1_20170116174525125.jpg.chip.jpg", 39, "female", -1),  # race missing upstream
        ("24_0_1_20170116220224657 .jpg.chip.jpg", 24, "male", 1),  # stray space
        ("55_0_0_20170116232725357jpg.chip.jpg", 55, "male", 0),  # missing dot
        ("100_1_0_20170112213500903.jpg.chip.jpg", 100, "female", 0),
    ],
)
def test_utkface_names_parse_including_upstream_defects(name, age, gender, race):
    assert parse_utkface_name(name) == {"age": age, "gender": gender, "race": race}


def test_unparsable_utkface_names_are_reported_not_fatal(tmp_path, caplog):
    for name in ("30_0_1_2017.jpg.chip.jpg", "portrait.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "README.md").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        table = load_utkface(tmp_path)
    assert table["path"].tolist() == ["30_0_1_2017.jpg.chip.jpg"]
    assert "portrait.jpg" in caplog.text


def test_the_whole_utkface_folder_loads_with_every_image_labelled():
    folder = require(UTKFACE)
    table = load_utkface(folder)
    assert len(table) == 23708  # all of them, malformed names included
    assert table["age"].between(1, 116).all()


def test_csv_paths_relative_to_the_csv_and_bad_rows_reported(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.jpg")
    csv = tmp_path / "faces.csv"
    # Two images (one image listed twice with two ages is left out: test_evaluation_labels.py)
    csv.write_text(f"path,age\nimg/a.jpg,31\n{tmp_path / 'img' / 'd.jpg'},40\nimg/b.jpg,\nimg/c.jpg,old\n")
    with caplog.at_level(logging.WARNING):
        table, root = load_table("csv", csv)
    assert root == tmp_path
    assert table["age"].tolist() == [31, 40]
    assert "lines 4, 5" in caplog.text


def test_csv_without_the_needed_columns_is_refused(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("file,years\na.jpg,3\n")
    with pytest.raises(CsvTableError, match=r"path, age|age, path|lacks"):
        load_csv_table(csv)


def test_csv_person_ids_are_text_so_distinct_ids_stay_distinct_persons(tmp_path):
    csv = tmp_path / "faces.csv"
    ids = ["1", "01", "1.0", "10000000000000001", "10000000000000002"]
    csv.write_text("path,age,person_id\n" + "".join(f"{i}.jpg,30,{id_}\n" for i, id_ in enumerate(ids)))
    assert load_csv_table(csv)["person_id"].tolist() == ids


def test_a_data_root_of_the_wrong_kind_says_which_kind_is_needed(tmp_path):
    csv = tmp_path / "faces.csv"
    csv.write_text("path,age\na.jpg,30\n")
    with pytest.raises(
        CsvTableError, match=rf"^{tmp_path} is a folder; --dataset csv needs --data-root FILE\.csv"
    ):
        load_table("csv", tmp_path)
    with pytest.raises(
        DatasetNotFoundError, match=r"is a file \(a CSV: pass --dataset csv\); --dataset utkface"
    ):
        load_table("utkface", csv)


def test_dataset_kind_is_recognised_from_the_folder(tmp_path):
    assert guess_dataset(require(REPLICA)) == "imdb-wiki"
    assert guess_dataset(require(UTKFACE)) == "utkface"
    csv = tmp_path / "a.csv"
    csv.write_text("path,age\n")
    assert guess_dataset(csv) == "csv"
    with pytest.raises(DatasetNotFoundError, match=r"imdb_crop\.tar"):
        guess_dataset(tmp_path / "nothing-here")


def test_a_folder_whose_dataset_is_one_level_down_names_that_folder(tmp_path):
    """An archive unpacked into its own folder (UTKFace/): the generic 'download it' advice misled."""
    (tmp_path / "UTKFace").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "UTKFace" / "30_0_0_20170101000000000.jpg.chip.jpg")
    (tmp_path / "notes").mkdir()
    with pytest.raises(
        DatasetNotFoundError, match=rf"holds a utkface dataset: pass --data-root {tmp_path}/UTKFace$"
    ):
        guess_dataset(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path}/UTKFace holds a utkface dataset"):
        load_table("utkface", tmp_path)


def test_an_imdb_wiki_crop_folder_given_itself_names_the_folder_above_it(tmp_path):
    """wiki_crop/ holds wiki.mat and numbered folders of images: not a UTKFace set one level down."""
    crop = tmp_path / "raw" / "wiki_crop"
    (crop / "00").mkdir(parents=True)
    (crop / "wiki.mat").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(crop / "00" / "10_1980-03-10_2010.jpg")
    expected = rf"IMDB-WIKI's crop folders; pass --data-root {tmp_path}/raw,"
    with pytest.raises(DatasetNotFoundError, match=expected):
        guess_dataset(crop)


def test_a_utkface_folder_without_utkface_images_says_what_to_put_there(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "holiday.jpg").write_bytes(b"not read: the name carries no age")
    for folder in ("empty", "named"):
        with pytest.raises(DatasetNotFoundError, match=r"(?s)holds no UTKFace images.*UTKFace\.tar\.gz"):
            load_table("utkface", tmp_path / folder)


def test_train_and_evaluate_read_a_data_root_by_its_kind_when_no_dataset_is_named(tmp_path, caplog):
    import argparse
    import logging

    from age_detect_resnet.cli.train import add_arguments, config_for_run
    from age_detect_resnet.evaluation.evaluate import evaluation_table

    csv = tmp_path / "faces.csv"
    csv.write_text("path,age\na.jpg,30\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def dataset(*argv: str) -> str:
        return config_for_run(parser.parse_args([*argv, "--out", str(tmp_path / "run")])).data.dataset

    with caplog.at_level(logging.INFO):
        assert dataset("--data-root", str(csv)) == "csv"  # the default dataset is imdb-wiki
    assert "reading it as --dataset csv" in caplog.text
    assert dataset("--data-root", str(require(UTKFACE)), "--config", "seed-cpu") == "utkface"
    # Named, or unrecognisable, the dataset is left as set: its adapter then says what is wrong.
    assert dataset("--data-root", str(csv), "--dataset", "utkface") == "utkface"
    assert dataset("--data-root", str(tmp_path / "nothing-here")) == "imdb-wiki"
    assert dataset("--data-root", str(csv), "--meta", str(csv)) == "imdb-wiki"

    table, root, kind = evaluation_table(
        None, dataset=None, data_root=csv, meta=None, split="all", by=(), min_age=0, max_age=100, limit=None
    )
    assert kind == "csv" and root == tmp_path and table["age"].tolist() == [30]
