"""Bad data: each broken input the pipeline meets gives a message naming the file or row; dirty data is
skipped and counted, and input that would give a wrong model stops the work before anything is lost."""

from __future__ import annotations

import datetime as dt
import io
import logging
import resource
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image

from age_detect_resnet.cli import build_meta as build_meta_module
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.data.cache import prepare_cache
from age_detect_resnet.data.csv_table import CsvTableError, load_csv_table
from age_detect_resnet.data.dataset import AgeDataset
from age_detect_resnet.data.imdb_wiki import MetaError, build_meta, read_table
from age_detect_resnet.data.sources import DataError, load_table
from age_detect_resnet.data.splits import prepare_splits
from age_detect_resnet.data.tabular import drop_duplicate_images
from age_detect_resnet.data.utkface import load_utkface
from age_detect_resnet.images import ImageReadError, as_rgb, load_rgb
from age_detect_resnet.training.config import DataConfig
from conftest import train_tiny


def datenum(year: int, month: int, day: int) -> float:
    """MATLAB serial date number of a date, as IMDB-WIKI stores `dob`."""
    return float(dt.date(year, month, day).toordinal() + 366)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels but holds almost no data (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def meta_row(dob: float, photo_taken: int, path: str, face_score: float = 2.0, **fields) -> dict:
    """One metadata row (see the reliability conftest's `mat_struct`)."""
    return {"dob": dob, "photo_taken": photo_taken, "path": path, "face_score": face_score, **fields}


def distinct_jpeg(index: int) -> bytes:
    """A small JPEG whose bytes differ for every index (so deduplication keeps each one)."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (index * 37 % 256, index * 91 % 256, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


# --- IMDB-WIKI metadata -------------------------------------------------------------------------------


def test_build_meta_skips_and_counts_every_kind_of_dirty_row(tmp_path, write_mat, face_jpeg, caplog):
    root = tmp_path / "raw"
    wiki = [  # (what it tests, row)
        ("kept", meta_row(datenum(1980, 3, 10), 2010, "00/10_1980-03-10_2010.jpg", 3.2, name="A")),
        ("kept", meta_row(datenum(1985, 8, 1), 2010, "01/11_1985-08-01_2010.jpg", 1.1, name="B")),
        ("kept", meta_row(datenum(1990, 1, 1), 2015, "02/12_1990-01-01_2015.jpg", gender=np.nan)),
        ("broken date", meta_row(1.0, 2010, "03/13_0000-01-01_2010.jpg")),
        ("broken date", meta_row(366.0, 2010, "04/14_0000-12-31_2010.jpg")),
        ("broken date", meta_row(np.nan, 2010, "05/15_nan_2010.jpg")),
        ("no face", meta_row(datenum(1970, 1, 1), 2000, "06/16_1970-01-01_2000.jpg", -np.inf)),
        ("no face", meta_row(datenum(1971, 1, 1), 2000, "07/17_1971-01-01_2000.jpg", np.nan)),
        ("second face", meta_row(datenum(1972, 1, 1), 2000, "08/18_1972_2000.jpg", second_face_score=1.5)),
        ("too old", meta_row(datenum(1890, 1, 1), 2010, "09/19_1890-01-01_2010.jpg")),
        ("born after the photo", meta_row(datenum(2012, 1, 1), 2010, "10/20_2012-01-01_2010.jpg")),
        ("missing image", meta_row(datenum(1975, 1, 1), 2005, "11/21_1975-01-01_2005.jpg")),
    ]
    imdb = [
        ("kept", meta_row(datenum(1960, 12, 31), 2000, "07/nm0000007_rm1_1960-12-31_2000.jpg", celeb_id=7)),
        ("broken date", meta_row(1.0, 2000, "12/nm0000012_rm2_0-0-0_2000.jpg", 2.5, celeb_id=12)),
    ]
    for folder, rows in (("wiki_crop", wiki), ("imdb_crop", imdb)):
        for what, row in rows:
            if what != "missing image":
                image = root / folder / row["path"]
                image.parent.mkdir(parents=True, exist_ok=True)
                image.write_bytes(face_jpeg + row["path"].encode())  # distinct bytes: no duplicates
    write_mat(root / "wiki_crop" / "wiki.mat", [row for _, row in wiki])
    write_mat(root / "imdb_crop" / "imdb.mat", [row for _, row in imdb], imdb=True)

    with caplog.at_level(logging.WARNING):
        df, filters = build_meta(root)

    assert filters.total == 14
    assert filters.removed == {
        "broken date of birth": 4,
        "no face found": 2,
        "second face found": 1,
        "age outside 0-100": 2,
        "image file missing": 1,
    }
    assert filters.total - sum(filters.removed.values()) == len(df)
    # The official rule: photo taken on 1 July, so a birthday from July on counts one year less.
    assert dict(zip(df["path"], df["age"], strict=True)) == {
        "wiki_crop/00/10_1980-03-10_2010.jpg": 30,
        "wiki_crop/01/11_1985-08-01_2010.jpg": 24,
        "wiki_crop/02/12_1990-01-01_2015.jpg": 25,
        "imdb_crop/07/nm0000007_rm1_1960-12-31_2000.jpg": 39,
    }
    assert set(df["person_id"]) == {"wiki:10", "wiki:11", "wiki:12", "imdb:7"}
    assert "wiki_crop/11/21_1975-01-01_2005.jpg" in caplog.text, "the missing image is named"


def test_imdb_rows_whose_celeb_id_is_no_whole_number_are_dropped_and_counted(tmp_path, write_mat, face_jpeg):
    root = tmp_path / "raw"
    rows = [
        meta_row(datenum(1960, 1, 1), 2000, f"0{i}/nm000000{i}_rm1_1960-1-1_2000.jpg", celeb_id=i)
        for i in range(3)
    ]
    for row in rows:
        (root / "imdb_crop" / row["path"]).parent.mkdir(parents=True)
        (root / "imdb_crop" / row["path"]).write_bytes(face_jpeg + row["path"].encode())
    mat = write_mat(root / "imdb_crop" / "imdb.mat", rows, imdb=True)
    struct_ = scipy.io.loadmat(mat)["imdb"]
    struct_[0, 0]["celeb_id"] = np.array([[7.0, np.nan, 1.5]])  # neither NaN nor 1.5 names a person
    scipy.io.savemat(mat, {"imdb": struct_})

    df, filters = build_meta(root)

    assert df["person_id"].tolist() == ["imdb:7"]
    assert filters.removed["celeb_id not a whole number"] == 2

    struct_[0, 0]["celeb_id"] = np.array([["a", "b", "c"]], dtype=object)
    scipy.io.savemat(mat, {"imdb": struct_})
    with pytest.raises(MetaError, match=rf"{mat}: field 'celeb_id' is not numeric"):
        build_meta(root)


def one_face_wiki(root: Path, write_mat, face_jpeg: bytes) -> Path:
    """`root` holding wiki_crop/wiki.mat with one usable row (face score 3.2) and its image."""
    row = meta_row(datenum(1980, 3, 10), 2010, "00/10_1980-03-10_2010.jpg", 3.2)
    (root / "wiki_crop" / "00").mkdir(parents=True)
    (root / "wiki_crop" / row["path"]).write_bytes(face_jpeg)
    write_mat(root / "wiki_crop" / "wiki.mat", [row])
    return root


def test_a_metadata_table_given_without_its_data_root_is_refused_naming_the_root_it_was_built_from(
    tmp_path, write_mat, face_jpeg, monkeypatch
):
    """`train --meta M` without --data-root split and prepared the whole table, then stopped at its
    first image with advice to skip files."""
    from age_detect_resnet.data.sources import DatasetNotFoundError, load_table

    root = one_face_wiki(tmp_path / "raw", write_mat, face_jpeg)
    meta = tmp_path / "meta.csv"
    assert build_meta_module.main(["--data-root", str(root), "--out", str(meta)]) == 0
    table, _ = load_table("imdb-wiki", root, meta=meta)
    assert len(table) == 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DatasetNotFoundError,
        match=rf"none of the first 1 images of {meta} is in data/raw .*"
        rf"pass --data-root .* \(it was built from {root.resolve()}\)",
    ):
        load_table("imdb-wiki", Path("data/raw"), meta=meta)


def test_build_meta_that_filters_out_every_row_says_which_filters_did(tmp_path, write_mat, face_jpeg):
    root = one_face_wiki(tmp_path / "raw", write_mat, face_jpeg)
    with pytest.raises(MetaError) as caught:
        build_meta(root, min_face_score=100)
    message = str(caught.value)
    assert "face score below 100" in message and "try a lower --min-face-score" in message
    assert "unpacked" not in message  # the images are there: not the hint for missing images
    with pytest.raises(SystemExit) as refused:  # argparse's usage error: nan keeps no row and says nothing
        build_meta_module.main(["--data-root", str(root), "--min-face-score", "nan"])
    assert refused.value.code == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is not a metadata table"),
        ("foo,bar\n1,2\n", "has no path, age, person_id column(s)"),
        ("path,age,person_id\n", "has no rows"),
        ("path,age,person_id\na.jpg,thirty,wiki:1\n", "not numbers"),
    ],
    ids=["empty", "other columns", "no rows", "ages not numbers"],
)
def test_a_meta_file_that_build_meta_did_not_write_is_refused_naming_it(tmp_path, content, message):
    meta = tmp_path / "meta.csv"
    meta.write_text(content)
    with pytest.raises(MetaError) as caught:
        read_table(meta)
    assert str(meta) in str(caught.value) and message in str(caught.value)


def test_a_command_told_to_write_where_it_cannot_says_so_in_one_line(tmp_path, write_mat, face_jpeg, caplog):
    root = one_face_wiki(tmp_path / "raw", write_mat, face_jpeg)
    taken = tmp_path / "meta.csv"
    taken.mkdir()  # --out names a folder
    with caplog.at_level(logging.ERROR):
        assert build_meta_module.main(["--data-root", str(root), "--out", str(taken)]) == 2
    assert f"--out {taken} is a folder: pass the CSV file to write" in caplog.text


def _write_v73_header(path: Path) -> None:
    """The start of a MATLAB v7.3 (HDF5) file: a 128-byte text header, then HDF5."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    path.write_bytes(text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM" + b"\x89HDF\r\n\x1a\n" + b"\0" * 504)


UNUSABLE_MATS = {
    "foreign": "has no 'wiki' struct (found data)",
    "missing fields": "lacks the field(s) photo_taken",
    "truncated": "not a readable MATLAB file",
    "zero bytes": "not a readable MATLAB file",
    "v7.3": "MATLAB v7.3 file",
    "text dates": "field 'dob' is not numeric",
    "empty struct": "struct array of shape (0, 0)",
    "fields of different lengths": "field 'face_score' has 1 entries but dob has 2",
}


@pytest.mark.parametrize("kind", list(UNUSABLE_MATS))
def test_unusable_metadata_file_stops_build_meta_naming_the_file(tmp_path, write_mat, kind, caplog):
    mat = tmp_path / "raw" / "wiki_crop" / "wiki.mat"
    write_mat(mat, [meta_row(datenum(1980, 1, 1), 2010, f"0{i}/{i}_x_2010.jpg") for i in range(2)])
    good = mat.read_bytes()
    if kind == "foreign":
        scipy.io.savemat(mat, {"data": np.zeros((3, 3))})
    elif kind == "missing fields":
        scipy.io.savemat(mat, {"wiki": {"dob": np.zeros((1, 2)), "full_path": np.zeros((1, 2))}})
    elif kind == "truncated":
        mat.write_bytes(good[: len(good) // 2])
    elif kind == "zero bytes":
        mat.write_bytes(b"")
    elif kind == "v7.3":
        _write_v73_header(mat)
    else:
        struct_ = scipy.io.loadmat(mat)["wiki"]
        if kind == "text dates":
            struct_[0, 0]["dob"] = np.array([["1980-01-01", "1981-02-02"]], dtype=object)
        elif kind == "empty struct":
            struct_ = np.zeros((0, 0), dtype=struct_.dtype)
        else:
            struct_[0, 0]["face_score"] = np.array([[2.0]])
        scipy.io.savemat(mat, {"wiki": struct_})
    out = tmp_path / "meta.csv"

    with caplog.at_level(logging.ERROR):
        code = build_meta_module.main(["--data-root", str(tmp_path / "raw"), "--out", str(out)])

    assert code == 2
    assert str(mat) in caplog.text and UNUSABLE_MATS[kind] in caplog.text, caplog.text
    assert not out.exists(), "no table is written from an unusable metadata file"


# --- UTKFace and CSV tables ---------------------------------------------------------------------------


def test_utkface_names_without_an_age_are_skipped_and_named(tmp_path, face_jpeg, caplog):
    good = {
        "25_0_0_20170109150557335.jpg.chip.jpg": 25,
        "39_1_20170116174525125.jpg.chip.jpg": 39,
        "8_1_3_20161220222856346.jpg": 8,
    }
    unparsable = ["notes.jpg", "face_0_0_2017.jpg", "_25_0_0_2017.jpg"]
    for name in [*good, *unparsable, "readme.txt"]:
        (tmp_path / name).write_bytes(face_jpeg)

    with caplog.at_level(logging.WARNING):
        df = load_utkface(tmp_path)

    assert dict(zip(df["path"], df["age"], strict=True)) == good
    assert "skipped 3 UTKFace file(s)" in caplog.text
    assert all(name in caplog.text for name in unparsable)
    assert "readme.txt" not in caplog.text, "files that are not images are not reported as bad names"


def test_csv_rows_with_missing_or_non_numeric_ages_are_skipped_with_their_line_numbers(tmp_path, caplog):
    csv = tmp_path / "faces.csv"
    csv.write_text(
        "path,age\na.jpg,30\nb.jpg,\nc.jpg,thirty\nd.jpg,41.5\n,22\ne.jpg,inf\nf.jpg,NaN\ng.jpg,True\n"
    )

    with caplog.at_level(logging.WARNING):
        df = load_csv_table(csv)

    assert df[["path", "age"]].to_dict("list") == {"path": ["a.jpg", "d.jpg"], "age": [30.0, 41.5]}
    assert str(csv) in caplog.text and "skipped 5 row(s)" in caplog.text
    assert "(lines 3, 4, 7, 8, 9)" in caplog.text, caplog.text
    assert "skipped 1 row(s)" in caplog.text and "with no path (lines 6)" in caplog.text
    assert df.attrs["removed"] == {
        "CSV rows with no path": 1,
        "CSV rows with age missing, not a number or infinite": 5,
    }


def test_csv_line_numbers_count_blank_lines_and_line_breaks_in_quoted_fields(tmp_path, caplog):
    csv = tmp_path / "faces.csv"
    csv.write_text('path,age,note\n\nimgs/p1.jpg,24,"two\nlines"\n\n\nimgs/p4.jpg,abc,x\n  \nimgs/p5.jpg,,\n')

    with caplog.at_level(logging.WARNING):
        df = load_csv_table(csv)

    assert df["path"].tolist() == ["imgs/p1.jpg"]
    assert "(lines 7, 9)" in caplog.text, caplog.text


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.jpg,70,", "with age_high blank or infinite: an open age group such as 70+ needs an upper end"),
        ("a.jpg,70,inf", "with age_high blank or infinite"),
        ("a.jpg,,2", "with age_low blank or infinite: give the group a lower end"),
        ("a.jpg,70+,100", "with age_low or age_high not a number: write the bounds as numbers"),
        ("a.jpg,29,20", "with age_low above age_high: reversed bounds: write the lower end first"),
    ],
    ids=["open", "infinite", "no lower end", "not a number", "reversed"],
)
def test_csv_age_groups_that_cannot_be_used_are_skipped_saying_what_is_wrong(tmp_path, caplog, rows, message):
    csv = tmp_path / "groups.csv"
    csv.write_text(f"path,age_low,age_high\nb.jpg,20,29\n{rows}\n")
    with caplog.at_level(logging.WARNING):
        assert load_csv_table(csv)["path"].tolist() == ["b.jpg"]
    assert f"skipped 1 row(s) of {csv} {message}" in caplog.text and "(lines 3)" in caplog.text, caplog.text


def test_a_csv_age_column_of_group_labels_is_pointed_to_age_low_and_age_high(tmp_path, caplog):
    csv = tmp_path / "fairface.csv"
    csv.write_text("path,age\na.jpg,50-59\nb.jpg,more than 70\nc.jpg,33\n")
    with caplog.at_level(logging.WARNING):
        load_csv_table(csv)
    assert "holds age groups such as 50-59: give them as age_low,age_high columns" in caplog.text


def test_a_csv_column_named_sha1_is_not_taken_for_the_image_content(tmp_path):
    (tmp_path / "faces").mkdir()
    lines = ["path,age,sha1"]
    for i, sha1 in enumerate(["abc", "abc", "abc", "def", "def", "ghi"]):
        (tmp_path / "faces" / f"{i}.jpg").write_bytes(distinct_jpeg(i))
        lines.append(f"faces/{i}.jpg,{20 + i},{sha1}")
    csv = tmp_path / "faces.csv"
    csv.write_text("\n".join(lines) + "\n")

    table, root = load_table("csv", csv)
    kept, removed = drop_duplicate_images(table, root)

    assert len(kept) == 6, "six distinct images: none is a copy of another"
    assert removed["copies with conflicting ages"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,years\na.jpg,30\n", "lacks the column(s) age"),
        (b"Path,Age\na.jpg,30\n", "lacks the column(s) age, path; it needs a header 'path,age' (or "),
        (b"Path,Age\na.jpg,30\n", "in lower case; its header has Path, Age"),
        (b"path;age\na.jpg;30\n", "comma-separated, in lower case; its header has path;age"),
        (b"", "not a readable CSV"),
        (b"path,age\n\xff\xfe\xfa\x00\x81,30\n", "not a readable CSV"),
    ],
    ids=["no age column", "capitalised", "capitalised header listed", "semicolons", "empty", "not text"],
)
def test_unusable_csv_is_refused_naming_the_file(tmp_path, content, message):
    csv = tmp_path / "faces.csv"
    csv.write_bytes(content)
    with pytest.raises(CsvTableError) as caught:
        load_csv_table(csv)
    assert str(csv) in str(caught.value) and message in str(caught.value)


def test_images_missing_from_a_csv_dataset_are_dropped_counted_and_named(tmp_path, caplog):
    lines = ["path,age"]
    for i in range(12):
        lines.append(f"faces/{i}.jpg,{20 + i}")
        if i not in (3, 7):
            (tmp_path / "faces").mkdir(exist_ok=True)
            (tmp_path / "faces" / f"{i}.jpg").write_bytes(distinct_jpeg(i))
    csv = tmp_path / "faces.csv"
    csv.write_text("\n".join(lines) + "\n")
    config = DataConfig(dataset="csv", data_root=str(csv), min_age=0, max_age=100, max_per_age=None)

    with caplog.at_level(logging.WARNING):
        prepared = prepare_splits(config, seed=0)

    assert len(prepared.table) == 10
    assert prepared.removed["unreadable files"] == 2
    assert "faces/3.jpg" in caplog.text and "faces/7.jpg" in caplog.text


def faces_csv(folder: Path, people: list[str | None], content=distinct_jpeg) -> Path:
    """faces.csv in `folder`: one image per entry of `people` (its person_id, or none), ages 20 on."""
    (folder / "faces").mkdir(parents=True)
    lines = ["path,age,person_id"]
    for i, person in enumerate(people):
        (folder / "faces" / f"{i}.jpg").write_bytes(content(i))
        lines.append(f"faces/{i}.jpg,{20 + i},{person or ''}")
    csv = folder / "faces.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_a_split_left_empty_is_refused_before_training_saying_how_many_there_are(tmp_path, caplog):
    one_person = faces_csv(tmp_path, ["p1"] * 6)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = train_main([*TINY_RUN, "--dataset", "csv", "--data-root", str(one_person), "--out", str(out)])
    assert code == 2
    assert f"the validation and test split of {one_person} would be empty" in caplog.text
    assert "6 image(s) of 1 person(s)" in caplog.text and "more persons" in caplog.text
    assert not (out / "best.safetensors").exists()

    no_ids = faces_csv(tmp_path / "no_ids", [None] * 6)  # each image its own person
    config = DataConfig(dataset="csv", data_root=str(no_ids), max_per_age=None, limit=5)
    with pytest.raises(DataError, match=r"test split .* 5 image\(s\) of 5 person\(s\).* raise --limit \(5\)"):
        prepare_splits(config, seed=0)  # 4 train, 1 validation, 0 test


def test_an_epoch_whose_every_image_is_unreadable_stops_rather_than_scoring_0(tmp_path, caplog):
    csv = faces_csv(tmp_path, [None] * 12, content=lambda i: b"not a photo %d" % i)
    out = tmp_path / "run"
    argv = [*TINY_RUN, "--dataset", "csv", "--data-root", str(csv), "--out", str(out), "--skip-bad-images"]
    with caplog.at_level(logging.ERROR):
        assert train_main(argv) == 2
    assert "epoch 1 training: all" in caplog.text and f"image files are in {tmp_path}" in caplog.text
    assert not (out / "best.safetensors").exists() and not (out / "best.json").exists()


# --- images -------------------------------------------------------------------------------------------


def test_unreadable_image_files_raise_image_read_error_naming_them(tmp_path, face_jpeg):
    cases = {
        "empty.jpg": (b"", "empty (0 bytes)"),
        "truncated.jpg": (face_jpeg[: len(face_jpeg) // 3], "truncated or corrupt"),
        "html.jpg": (b"<html><body>404 Not Found</body></html>", "not an image file"),
        "no_pixels.png": (png_header(64, 64), "truncated or corrupt"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError) as caught:
            load_rgb(tmp_path / name)
        assert f"{tmp_path / name} is" in str(caught.value) and message in str(caught.value)
    with pytest.raises(ImageReadError) as caught:
        load_rgb(tmp_path / "gone.jpg")
    assert f"{tmp_path / 'gone.jpg'} does not exist" in str(caught.value)


@pytest.mark.parametrize("size", [30_000, 9_000])
def test_huge_image_is_refused_before_decoding(tmp_path, size):
    # 30000x30000 trips PIL's own decompression-bomb check in Image.open, 9000x9000 (81 MP) our 50 MP limit.
    path = tmp_path / f"huge_{size}.png"
    path.write_bytes(png_header(size, size))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageReadError) as caught:
        load_rgb(path)
    assert str(path) in str(caught.value) and "50 MP limit" in str(caught.value)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100, f"refusing {path.name} took {grown_mib:.0f} MiB: it was decoded"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG", (255, 127, 127)),  # half over white
        (Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("L", (8, 8), 90), "JPEG", (90, 90, 90)),
        (Image.new("P", (8, 8), 3), "GIF", None),
        # 16-bit grey: its full range to 8 bits, so it reads as its 8-bit copy would (90 * 257 -> 90), not
        # stretched to its own brightest pixel (a dark photo brightened changed the age by 1.6 years)
        (Image.fromarray(np.full((8, 8), 90 * 257, dtype=np.uint16)), "PNG", (90, 90, 90)),
        (Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)), "PNG", (16, 16, 16)),
    ],
    ids=[
        "transparent png",
        "half transparent png",
        "grey+alpha png",
        "cmyk jpeg",
        "grey jpeg",
        "palette gif",
        "16-bit png",
        "dark 16-bit png",
    ],
)
def test_any_colour_mode_becomes_8_bit_rgb(image, fmt, expected):
    loaded = load_rgb(_encoded(image, fmt), name=f"x.{fmt.lower()}")
    assert loaded.mode == "RGB" and loaded.size == (8, 8)
    if expected is not None:
        assert np.abs(np.asarray(loaded, dtype=int) - expected).max() <= 3, np.asarray(loaded)[0, 0]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (8, 8), 90).convert("I"), 90),  # 8-bit values in a 32-bit image: not 16-bit
        (Image.fromarray(np.full((8, 8), 90 * 257, dtype=np.int32)), 90),  # 16-bit values read as "I"
        (Image.fromarray(np.full((8, 8), 90 / 255, dtype=np.float32)), 90),  # "F", brightness 0-1
        (Image.fromarray(np.full((8, 8), 90.0, dtype=np.float32)), 90),  # "F", 0-255
    ],
    ids=["I of 8-bit values", "I of 16-bit values", "F in 0-1", "F in 0-255"],
)
def test_a_wide_grey_image_a_caller_holds_keeps_its_brightness(image, expected):
    assert image.mode in ("I", "F")
    rgb = as_rgb(image)
    assert rgb.mode == "RGB" and np.abs(np.asarray(rgb, dtype=int) - expected).max() <= 1


def test_prepared_cache_remembers_unreadable_images(tmp_path, face_jpeg):
    (tmp_path / "good.jpg").write_bytes(face_jpeg)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(face_jpeg[:500])
    cache = prepare_cache(
        tmp_path, ["good.jpg", "empty.jpg", "cut.jpg"], image_size=32, cache_dir=tmp_path / "cache", workers=1
    )
    assert tuple(cache.load(0).shape) == (3, 32, 32)
    strict = AgeDataset(cache, [30.0, 40.0, 50.0])
    with pytest.raises(ImageReadError, match=r"empty\.jpg.*--skip-bad-images"):
        strict[1]
    with pytest.raises(ImageReadError, match=r"cut\.jpg"):
        strict[2]
    lenient = AgeDataset(cache, [30.0, 40.0, 50.0], skip_bad_images=True)
    assert lenient[1] is None and lenient[2] is None
    assert torch.equal(lenient[0][0], cache.load(0))


# --- training over a folder with bad files ------------------------------------------------------------

BAD_FILES = {
    "30_0_0_20170101000000001.jpg.chip.jpg": "empty (0 bytes)",
    "40_1_0_20170101000000002.jpg.chip.jpg": "truncated or corrupt",
    "50_0_1_20170101000000003.jpg.chip.jpg": "not an image file",
}

# Odd but readable: these must be trained on, not skipped.
ODD_BUT_READABLE = {
    "35_1_2_20170101000000004.png": Image.new("RGBA", (64, 64), (200, 120, 90, 128)),
    "45_0_3_20170101000000005.jpg": Image.new("CMYK", (64, 64), (10, 60, 80, 5)),
    "25_1_1_20170101000000006.jpg": Image.new("L", (64, 64), 90),
}


def _add_bad_files(folder: Path) -> None:
    donor = sorted(folder.glob("*.jpg"))[0].read_bytes()
    contents = [b"", donor[: len(donor) // 3], b"<html>rate limited</html>"]
    for name, content in zip(BAD_FILES, contents, strict=True):
        (folder / name).write_bytes(content)
    for name, image in ODD_BUT_READABLE.items():
        image.save(folder / name)


TINY_RUN = shlex.split(
    "--dataset utkface --backbone mobilenet_v2 --no-pretrained --image-size 40 --epochs 2 --batch-size 8 "
    "--num-workers 0 --lr 1e-3 --no-progress --grid-size 4 --no-tensorboard"
)


def test_training_with_skip_bad_images_finishes_and_reports_the_skipped(utkface_sample, tmp_path, caplog):
    _add_bad_files(utkface_sample)
    out = tmp_path / "run"

    with caplog.at_level(logging.WARNING):
        train_tiny(utkface_sample, out, "--skip-bad-images")

    split = pd.read_csv(out / "split.csv")
    skipping = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert not [m for m in skipping if any(name in m for name in ODD_BUT_READABLE)], "readable images skipped"
    skipped = int(pd.read_csv(out / "metrics.csv")["skipped"].iloc[-1])
    assert skipped > 0
    assert f"unreadable images skipped: {skipped}" in (out / "report.md").read_text()
    seen = split[split["split"].isin(["train", "val"])]["path"]
    for name, message in BAD_FILES.items():
        if name in set(seen):
            assert any(name in m and message in m for m in skipping), f"{name} was not reported"
    predicted = set(pd.read_csv(out / "predictions.csv")["path"])
    test_paths = set(split.loc[split["split"] == "test", "path"])
    assert predicted == test_paths - set(BAD_FILES), "every readable test image is evaluated, none unreadable"


def test_training_without_skip_stops_at_the_first_unreadable_image_naming_it(
    utkface_sample, tmp_path, caplog
):
    (utkface_sample / "30_0_0_20170101000000001.jpg.chip.jpg").write_bytes(b"")
    out = tmp_path / "run"

    with caplog.at_level(logging.ERROR):
        code = train_main([*TINY_RUN, "--data-root", str(utkface_sample), "--out", str(out)])

    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "30_0_0_20170101000000001.jpg.chip.jpg is empty (0 bytes)" in e and "--skip-bad-images" in e
        for e in errors
    ), errors


def test_heic_photos_are_read_where_pillow_heif_is_installed(tmp_path):
    pytest.importorskip("pillow_heif")
    from age_detect_resnet.images import heif_support

    assert heif_support()
    face = Image.new("RGB", (64, 48), (200, 120, 40))
    face.save(tmp_path / "IMG_0001.HEIC", quality=95)
    loaded = load_rgb(tmp_path / "IMG_0001.HEIC")
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    assert np.abs(np.asarray(loaded, dtype=int) - (200, 120, 40)).mean() < 8
    assert load_rgb((tmp_path / "IMG_0001.HEIC").read_bytes()).size == (64, 48)  # an upload


def test_a_heic_photo_without_pillow_heif_says_what_to_install(tmp_path, monkeypatch):
    from age_detect_resnet import images

    monkeypatch.setattr(images, "heif_support", lambda: False)
    # The start of an iPhone photo (an ISO media `ftyp` box of brand heic), which PIL cannot identify
    # without pillow-heif (nor with it: the rest is missing).
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    (tmp_path / "IMG_0002.heic").write_bytes(heic)
    for source in (tmp_path / "IMG_0002.heic", heic):
        with pytest.raises(ImageReadError, match=r"HEIC/HEIF.*age-detect-resnet\[heic\]"):
            load_rgb(source)
    (tmp_path / "note.heic").write_bytes(b"just text, not a photo")
    with pytest.raises(ImageReadError, match="not an image file"):
        load_rgb(tmp_path / "note.heic")


def test_folders_of_scans_and_phone_photos_are_searched(tmp_path):
    from age_detect_resnet.cli.predict import expand_inputs

    for name in ("scan.TIF", "scan2.tiff", "IMG_1.heic", "clip.gif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found, problems = expand_inputs([str(tmp_path)])
    assert [p.name for p in found] == ["IMG_1.heic", "clip.gif", "scan.TIF", "scan2.tiff"] and not problems


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise ImageReadError(f"photos/{index}.jpg does not exist or is not a file")


def test_an_error_raised_in_a_data_loader_worker_is_reported_by_its_own_message():
    from age_detect_resnet.cli.common import user_message

    loader = torch.utils.data.DataLoader(_Unreadable(), batch_size=1, num_workers=1)
    with pytest.raises(ImageReadError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what PyTorch hands the main process
    assert user_message(caught.value) == "photos/0.jpg does not exist or is not a file"
    plain = ImageReadError("a.jpg is empty (0 bytes)")
    assert user_message(plain) == "a.jpg is empty (0 bytes)"


def test_evaluate_names_a_missing_photo_in_one_line_not_a_worker_traceback(tmp_path, caplog):
    from age_detect_resnet.cli.evaluate import main as evaluate_main
    from conftest import TEST_IMAGES, YUNET, require

    photo = require(TEST_IMAGES / "obama.jpg")
    (tmp_path / "obama.jpg").write_bytes(photo.read_bytes())
    (tmp_path / "labels.csv").write_text("path,age\nobama.jpg,51\ngone.jpg,30\n")
    with caplog.at_level(logging.ERROR):
        code = evaluate_main(
            [
                "--dataset",
                "csv",
                "--data-root",
                str(tmp_path / "labels.csv"),
                "--split",
                "all",
                "--detector-model",
                str(require(YUNET)),
                "--num-workers",
                "2",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"{tmp_path / 'gone.jpg'} does not exist or is not a file (pass --skip-bad-images to skip such files)"
    ]


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"train": {"epochs": "two"}}', "setting 'epochs' in .* must be int, got 'two'"),
        ('{"train": {"epochs": 1.5}}', "setting 'epochs' in .* must be int, got 1.5"),
        ('{"optim": {"lr": "fast"}}', "setting 'lr' in .* must be float"),
        ('{"data": {"align": "yes"}}', "setting 'align' in .* must be bool"),
        ('{"optim": {"lr": -1}}', "need lr >= 0 and weight_decay >= 0"),
        ('{"optim": {"weight_decay": -0.1}}', "need lr >= 0 and weight_decay >= 0"),
    ],
    ids=["text for a number", "fraction for a count", "text for a rate", "text for a switch", "lr", "decay"],
)
def test_settings_of_the_wrong_type_or_range_are_refused_naming_them(tmp_path, text, message):
    from age_detect_resnet.training.config import ConfigError, resolve_config

    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_config([path])


def test_settings_of_a_kind_that_converts_exactly_are_taken(tmp_path):
    from age_detect_resnet.training.config import resolve_config

    path = tmp_path / "settings.json"
    path.write_text('{"train": {"epochs": 4.0}, "optim": {"lr": 1}}')
    config = resolve_config([path], {"data_root": tmp_path})  # a Path from Python: its text
    assert config.train.epochs == 4 and isinstance(config.train.epochs, int)
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.data_root == str(tmp_path)
