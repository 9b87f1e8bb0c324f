"""Fuzzing (hypothesis, a few hundred examples so CI stays quick): hostile bytes and text on the image
decoding and metadata paths raise only the project's own errors, and what they accept is well formed.

Not fuzzed: the type codes inside a .mat file's element tags. scipy's v5 reader indexes a C array with
them unchecked, so a single flipped tag byte can segfault the interpreter (scipy PRs #25349/#25829);
the metadata fuzz below changes the header, the payloads (every value and path) and the length instead.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from age_detect_resnet.data.csv_table import CsvTableError, load_csv_table
from age_detect_resnet.data.imdb_wiki import MetaError, build_meta, read_mat
from age_detect_resnet.data.utkface import parse_utkface_name
from age_detect_resnet.images import ImageReadError, load_rgb

# No deadline and no slowness check: CI machines are shared and slow; the examples stay the same.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=40)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seed_images() -> list[bytes]:
    """One small file per format and colour mode the decoder meets, to mutate."""
    rgb = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: exercises the EXIF transpose
    return [
        _encoded(rgb, "JPEG", exif=exif),
        _encoded(rgb.convert("RGBA"), "PNG"),
        _encoded(rgb.convert("P"), "GIF"),
        _encoded(rgb, "TIFF"),
        _encoded(rgb, "WEBP"),
        _encoded(rgb, "BMP"),
        _encoded(rgb.convert("CMYK"), "JPEG"),
        _encoded(Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24) * 100), "PNG"),
    ]


SEED_IMAGES = _seed_images()


def _assert_decodes_or_refuses(data: bytes) -> None:
    try:
        image = load_rgb(data, name="fuzzed.jpg")
    except ImageReadError as err:
        assert "fuzzed.jpg" in str(err)
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    image.resize((8, 8))  # usable downstream: the pixels are really there


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_decode_to_rgb_or_raise_image_read_error(data):
    _assert_decodes_or_refuses(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF it meets
@FUZZ
@given(
    seed=st.integers(0, len(SEED_IMAGES)),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
    keep=st.floats(0.02, 1.0),
)
def test_mutated_real_images_decode_to_rgb_or_raise_image_read_error(face_jpeg, seed, edits, keep):
    data = bytearray(([face_jpeg, *SEED_IMAGES])[seed])
    for where, value in edits:
        data[int(where * (len(data) - 1))] = value
    _assert_decodes_or_refuses(bytes(data[: max(1, int(len(data) * keep))]))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before ours
@FEW
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_any_claimed_image_size_is_decoded_or_refused(width, height):
    """A PNG header may claim any size (decompression bombs); the claim alone must never crash or hang."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")]
    framed = [
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    ]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(framed)
    _assert_decodes_or_refuses(data)


# --- IMDB-WIKI metadata -------------------------------------------------------------------------------


def _official_age(dob: float, photo_taken: int) -> int | None:
    """The documented rule, computed independently of the project: None for a broken date of birth."""
    if not math.isfinite(dob) or not 1 <= math.floor(dob) - 366 <= dt.date.max.toordinal():
        return None
    born = dt.date.fromordinal(math.floor(dob) - 366)
    return photo_taken - born.year - (born.month >= 7)


row_strategy = st.fixed_dictionaries(
    {
        "dob": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(690_000, 740_000),
            st.sampled_from([0.0, 1.0, 366.0, 367.0, 3_652_425.0, 3_652_426.0, -1.0]),
        ),
        "photo_taken": st.integers(0, 65_535) | st.integers(1990, 2015),
        "face_score": st.floats(allow_nan=True, allow_infinity=True),
        "second_face_score": st.just(float("nan")) | st.floats(allow_nan=True, allow_infinity=True),
        "gender": st.sampled_from([0.0, 1.0, float("nan"), 0.5]),
        "image": st.booleans(),
    }
)


@FEW
@given(rows=st.lists(row_strategy, min_size=1, max_size=12))
def test_build_meta_keeps_exactly_the_valid_rows_of_any_metadata(tmp_path, write_mat, rows):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    for i, row in enumerate(rows):
        row["path"] = f"{i % 100:02d}/{i}_x_{row['photo_taken']}.jpg"
        if row["image"]:
            (root / "wiki_crop" / row["path"]).parent.mkdir(parents=True, exist_ok=True)
            (root / "wiki_crop" / row["path"]).write_bytes(b"jpeg %d" % i)
    write_mat(root / "wiki_crop" / "wiki.mat", rows)

    expected = {}
    for row in rows:
        age = _official_age(row["dob"], row["photo_taken"])
        if (
            age is not None
            and math.isfinite(row["face_score"])
            and math.isnan(row["second_face_score"])
            and 0 <= age <= 100
            and row["image"]
        ):
            expected[f"wiki_crop/{row['path']}"] = age
    try:
        df, filters = build_meta(root)
    except MetaError as err:
        assert not expected and "no usable rows" in str(err)
        return
    assert dict(zip(df["path"], df["age"], strict=True)) == expected
    assert filters.total == len(rows) and filters.total - sum(filters.removed.values()) == len(df)


@pytest.fixture
def wiki_mat(tmp_path, write_mat) -> tuple[Path, bytes, list[tuple[int, int]]]:
    """A valid wiki.mat, its bytes, and the (offset, length) of every value and path payload in it."""
    rows = [
        {
            "dob": 723_000.0 + 17.5 * i,
            "photo_taken": 2000 + i,
            "path": f"0{i}/{i}_19{i}0-01-01_2000.jpg",
            "face_score": 1.5 + i,
            "gender": float(i % 2),
            "name": f"N{i}",
        }
        for i in range(4)
    ]
    path = write_mat(tmp_path / "raw" / "wiki_crop" / "wiki.mat", rows)
    for row in rows:
        (path.parent / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / row["path"]).write_bytes(row["path"].encode())
    data = path.read_bytes()
    payloads = [
        np.array([r[name] for r in rows], dtype=dtype).tobytes()
        for name, dtype in (
            ("dob", float),
            ("photo_taken", np.uint16),
            ("face_score", float),
            ("gender", float),
        )
    ]
    payloads += [row["path"].encode() for row in rows]
    regions = [(data.find(payload), len(payload)) for payload in payloads]
    assert all(offset > 128 for offset, _ in regions)
    return path, data, regions


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.booleans()), max_size=6),
    keep=st.none() | st.floats(0, 1),
)
def test_mutated_metadata_gives_a_table_or_meta_error(wiki_mat, edits, keep):
    path, good, regions = wiki_mat
    data = bytearray(good)
    for where, value, in_header in edits:
        if in_header:
            data[where % 128] = value
        else:
            offset, length = regions[where % len(regions)]
            data[offset + where % length] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    path.write_bytes(bytes(data))
    try:
        df, filters = build_meta(path.parent.parent)
    except MetaError as err:
        assert str(path) in str(err) or "no usable rows" in str(err)
        return
    assert df["age"].between(0, 100).all() and np.isfinite(df["face_score"]).all()
    assert filters.total - sum(filters.removed.values()) == len(df)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_as_metadata_raise_meta_error(tmp_path, data):
    path = tmp_path / "wiki.mat"
    path.write_bytes(data)
    with pytest.raises(MetaError) as caught:
        read_mat(path)
    assert str(path) in str(caught.value)


# --- UTKFace names and CSV tables ---------------------------------------------------------------------


@FUZZ
@given(name=st.text(max_size=60))
def test_any_file_name_parses_to_labels_or_none(name):
    labels = parse_utkface_name(name)
    if labels is None:
        return
    assert type(labels["age"]) is int and 0 <= labels["age"] <= 999
    assert labels["gender"] in ("male", "female", "") and labels["race"] in range(-1, 5)


@FUZZ
@given(
    age=st.integers(0, 116),
    gender=st.sampled_from([0, 1]),
    race=st.integers(0, 4),
    stamp=st.from_regex(r"[0-9]{17}", fullmatch=True),
    suffix=st.sampled_from([".jpg.chip.jpg", ".jpg"]),
)
def test_every_real_utkface_name_round_trips(age, gender, race, stamp, suffix):
    labels = parse_utkface_name(f"{age}_{gender}_{race}_{stamp}{suffix}")
    assert labels == {"age": age, "gender": ("male", "female")[gender], "race": race}


age_cells = st.one_of(
    st.integers(-5, 150).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "",
            "abc",
            "NaN",
            "n/a",
            "?",
            "thirty",
            "12y",
            "1.2.3",
            "True",
            " 40 ",
            "inf",
            "-inf",
            "1e400",
            "NULL",
            "#N/A",
        ]
    ),
)
path_cells = st.just("") | st.from_regex(r'[A-Za-z0-9_/ ,"\n]{0,12}\.jpg', fullmatch=True)


def _usable_age(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@FUZZ
@given(rows=st.lists(st.tuples(path_cells, age_cells), max_size=15))
def test_csv_keeps_exactly_the_rows_with_a_path_and_a_numeric_age_once(tmp_path, rows):
    """Rows with a path and a numeric age are kept, each image once: a repeated row is dropped, and every
    row of an image listed with ages that disagree (which is right cannot be told)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "age"])
    writer.writerows(rows)
    table = tmp_path / "faces.csv"
    table.write_text(buffer.getvalue(), encoding="utf-8")
    try:
        df = load_csv_table(table)
    except CsvTableError as err:
        assert not rows and "not a readable CSV" in str(err)  # a header alone has no data to read
        return
    usable = [(p, _usable_age(a)) for p, a in rows if p and _usable_age(a) is not None]
    place = {p: os.path.normpath(tmp_path / p) for p, _ in usable}  # the file a path names
    ages_of: dict[str, set[float]] = {}
    for p, age in usable:
        ages_of.setdefault(place[p], set()).add(age)
    seen, expected = set(), []
    for p, age in usable:
        if len(ages_of[place[p]]) == 1 and place[p] not in seen:
            seen.add(place[p])
            expected.append((p, age))
    assert list(zip(df["path"], df["age"].astype(float), strict=True)) == expected


@FUZZ
@given(
    text=st.one_of(st.text(max_size=300), st.text(max_size=300).map(lambda t: "path,age\n" + t)),
    raw=st.none() | st.binary(max_size=300),
)
def test_any_csv_file_gives_a_table_or_csv_table_error(tmp_path, text, raw):
    table = tmp_path / "faces.csv"
    table.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
    try:
        df = load_csv_table(table)
    except CsvTableError as err:
        assert str(table) in str(err)
        return
    assert {"path", "age"} <= set(df.columns)
    assert np.isfinite(pd.to_numeric(df["age"])).all() and df["path"].notna().all()
