"""Inference on real photos: detection, training-style crops, the predictor, predict CLI, check_your_age."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from age_detect_resnet.cli.predict import main as predict_main
from age_detect_resnet.faces.detection import (
    Face,
    HaarDetector,
    create_detector,
    crop_face,
    expand_box,
    measure_framing,
)
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from conftest import REPO, TEST_IMAGES, UTKFACE, YUNET, require

PHOTOS = ["astronaut.png", "obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"]


@pytest.mark.parametrize("name", PHOTOS)
def test_yunet_finds_exactly_one_face_in_each_real_photo(name):
    from age_detect_resnet.images import load_rgb

    image = load_rgb(require(TEST_IMAGES) / name)
    faces = create_detector("yunet").detect(image)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height and faces[0].score > 0.7


def test_offline_without_yunet_auto_falls_back_to_haar_which_finds_the_face(monkeypatch, caplog):
    """What a fresh offline install does before YuNet is downloaded or given: the package asks for
    opencv < 5, which ships the cascades, so `auto` must still detect."""
    from age_detect_resnet.faces import detection
    from age_detect_resnet.images import load_rgb

    def unavailable(_path=None):
        raise detection.DetectorUnavailableError("could not download the YuNet face detector (offline)")

    monkeypatch.setattr(detection, "resolve_yunet_model", unavailable)
    with caplog.at_level(logging.WARNING):
        detector = create_detector("auto")
    assert isinstance(detector, HaarDetector) and "Falling back to the Haar cascade" in caplog.text
    assert len(detector.detect(load_rgb(require(TEST_IMAGES) / "obama.jpg"))) >= 1


def test_haar_finds_faces_that_fill_the_photo_and_keeps_their_boxes_inside_it(monkeypatch):
    """Face crops (UTKFace, pre-aligned sets) leave the cascade no room round the face: the photo's
    edge is repeated around it first (HAAR_BORDER)."""
    from age_detect_resnet.faces import detection
    from age_detect_resnet.images import load_rgb

    crops = [load_rgb(path) for path in sorted(require(UTKFACE).glob("3*_*.jpg"))[:40]]
    found = [detection.HaarDetector().detect(crop) for crop in crops]
    assert sum(bool(faces) for faces in found) >= 34
    for crop, faces in zip(crops, found, strict=True):
        for face in faces:
            x1, y1, x2, y2 = face.box
            assert 0 <= x1 < x2 <= crop.width and 0 <= y1 < y2 <= crop.height
            assert (x2 - x1) * (y2 - y1) > 0.2 * crop.width * crop.height  # the face, not a detail
    monkeypatch.setattr(detection, "HAAR_BORDER", 0.0)
    assert sum(bool(detection.HaarDetector().detect(crop)) for crop in crops) < 34


def test_an_opencv_without_cascades_gets_an_error_that_says_what_to_do(monkeypatch):
    from age_detect_resnet.faces import detection

    monkeypatch.delattr(detection.cv2, "CascadeClassifier")
    with pytest.raises(detection.DetectorUnavailableError) as err:
        HaarDetector()
    hints = ("--detector-model", "opencv-python-headless<5", "--no-detect")
    assert all(hint in str(err.value) for hint in hints)


def test_crop_is_the_box_enlarged_by_the_margins_and_clipped_at_the_borders():
    margins = dict.fromkeys(("left", "top", "right", "bottom"), 0.4)
    assert expand_box((100, 100, 200, 150), margins, 1000, 1000) == (60, 80, 240, 170)
    assert expand_box((10, 5, 110, 105), margins, 120, 100) == (0, 0, 120, 100)  # clipped
    image = Image.new("RGB", (300, 300))
    crop, box = crop_face(image, Face((100, 100, 200, 200), 0.9), margins)
    assert box == (60, 60, 240, 240) and crop.size == (180, 180)


def test_framing_is_measured_on_training_crops():
    folder = require(UTKFACE)
    paths = sorted(folder.glob("3*_*.jpg"))[:40]
    margins = measure_framing(create_detector("yunet"), paths, min_faces=20)
    # UTKFace crops are tight: far less than IMDB-WIKI's 40% around the detected face
    assert margins is not None and all(-0.1 < v < 0.25 for v in margins.values())


def test_predictor_returns_each_face_with_box_age_and_score(tiny_run):
    model = load_trained_model(tiny_run)
    predictor = AgePredictor(model, detector=create_detector("yunet"))
    faces = predictor.predict(require(TEST_IMAGES) / "obama.jpg")
    assert len(faces) == 1
    face = faces[0]
    assert np.isfinite(face.age) and 0.7 < face.detector_score <= 1
    cx1, cy1, cx2, cy2 = face.crop_box
    x1, y1, x2, y2 = face.box
    assert cx1 <= x1 and cy1 <= y1 and cx2 >= x2 and cy2 >= y2  # the model sees the face plus its margins


def test_batching_gives_the_same_ages_as_one_by_one(tiny_run):
    model = load_trained_model(tiny_run)
    images = [Image.open(require(TEST_IMAGES) / n).convert("RGB") for n in PHOTOS]
    predictor = AgePredictor(model, detector=create_detector("yunet"), batch_size=2)
    together = [faces[0].age for faces in predictor.predict_images(images)]
    alone = [predictor.predict_image(image)[0].age for image in images]
    assert together == pytest.approx(alone, abs=0.05)


def test_photos_searched_in_threads_give_the_same_faces_as_one_at_a_time(tiny_run):
    import threading

    import cv2

    model = load_trained_model(tiny_run)
    images = [Image.open(require(TEST_IMAGES) / n).convert("RGB") for n in PHOTOS] * 2
    opencv_threads = cv2.getNumThreads()
    threaded = AgePredictor(model, detector=create_detector("yunet"), detect_workers=3)
    alone = AgePredictor(model, detector=create_detector("yunet"), detect_workers=1)
    together = threaded.predict_images(images)
    assert cv2.getNumThreads() == opencv_threads  # restored after the threaded section
    for mine, reference in zip(together, alone.predict_images(images), strict=True):
        assert [f.box for f in mine] == [pytest.approx(f.box, abs=1) for f in reference]
        assert [f.age for f in mine] == pytest.approx([f.age for f in reference], abs=0.05)

    class OneThreadOnly:  # no clone(): cannot be copied, so it must be called from one thread
        name = "recording"
        max_side = None

        def __init__(self, detector):
            self.detector, self.threads = detector, set()

        def detect(self, image):
            self.threads.add(threading.get_ident())
            return self.detector.detect(image)

    recording = OneThreadOnly(create_detector("yunet"))
    shared = AgePredictor(model, detector=recording, detect_workers=3)
    assert [len(faces) for faces in shared.predict_images(images)] == [1] * len(images)
    assert recording.threads == {threading.get_ident()}


@pytest.mark.parametrize("kind", ["haar", "yunet-opencv"])
def test_one_opencv_detector_shared_by_threads_gives_each_the_faces_it_gives_alone(kind, monkeypatch):
    """OpenCV's cascade and FaceDetectorYN cannot run in two threads at once: shared by four, the cascade
    gave wrong faces, then the process died (double free); YuNet on OpenCV crashed it at once."""
    import threading

    from age_detect_resnet.images import load_rgb

    if kind == "yunet-opencv":
        monkeypatch.setenv("AGE_DETECT_YUNET_ENGINE", "opencv")
        detector = create_detector("yunet", require(YUNET))
        assert detector.engine == "opencv"
    else:
        detector = create_detector("haar")
    photos = [load_rgb(require(TEST_IMAGES) / name) for name in PHOTOS[1:]]
    alone = [[face.box for face in detector.detect(photo)] for photo in photos]
    found, errors = {}, []

    def detect_all(thread):
        try:
            found[thread] = [[face.box for face in detector.detect(photo)] for photo in photos * 2]
        except Exception as err:  # an OpenCV assertion or an IndexError from its corrupted state
            errors.append(err)

    threads = [threading.Thread(target=detect_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(found) == 4 and all(boxes == alone * 2 for boxes in found.values())


def test_the_predictor_takes_any_photo_and_keeps_each_box_inside_it(tiny_run, tmp_path):
    """As `analyze` does: a path, an array, a PIL image with EXIF rotation; and a run folder for the
    model. The detector's box of a face at the photo's edge reached past it (x1 = -7)."""
    from age_detect_resnet.images import load_rgb

    predictor = AgePredictor(str(tiny_run), detector=create_detector("yunet", require(YUNET)))
    path = require(TEST_IMAGES) / "biden.jpg"
    upright = load_rgb(path)
    (face,) = predictor.predict_image(str(path))
    assert predictor.predict_image(np.asarray(upright))[0].age == face.age
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned, as phones do: turn 90 degrees clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    turned = predictor.predict_image(Image.open(tmp_path / "turned.jpg"))  # was [] (the face lay sideways)
    assert len(turned) == 1 and turned[0].box == pytest.approx(face.box, abs=3)
    cut = upright.crop((500, 150, 970, 700))  # the face's left edge at the photo's edge
    (edge,) = predictor.predict_image(cut)
    x1, y1, x2, y2 = edge.box
    assert 0 == x1 < x2 <= cut.width and 0 <= y1 < y2 <= cut.height
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1, not 0"):
        AgePredictor(tiny_run, batch_size=0)  # was range()'s own error at the first photo
    with pytest.raises(TypeError, match="model must be a loaded age model"):
        AgePredictor(3)


def test_predict_cli_reports_bad_files_and_writes_csv(tiny_run, tmp_path, capsys, caplog):
    photos = require(TEST_IMAGES)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "ages.csv"
    status = predict_main(
        [
            "--model",
            str(tiny_run),
            str(photos / "obama.jpg"),
            str(photos / "biden.jpg"),
            str(tmp_path / "empty.jpg"),
            str(tmp_path / "notes.jpg"),
            str(tmp_path / "missing.jpg"),
            "--output",
            str(out),
            "--annotate",
            str(tmp_path / "annotated"),
        ]
    )
    assert status == 1  # something failed
    table = pd.read_csv(out)
    assert table.columns[0] == "path" and "age" in table.columns
    assert len(table) == 2
    for name in ("empty.jpg", "notes.jpg", "missing.jpg"):
        assert name in caplog.text
    assert (tmp_path / "annotated" / "obama_ages.jpg").is_file()
    assert "obama.jpg\tface 0" in capsys.readouterr().out


@pytest.mark.parametrize("native_bf16", [True, False])
def test_predict_points_cpus_without_bf16_to_the_faster_backend(tiny_run, monkeypatch, caplog, native_bf16):
    from age_detect_resnet import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native_bf16)
    args = ["--model", str(tiny_run), "--device", "cpu", "--no-detect", str(TEST_IMAGES)]
    with caplog.at_level(logging.INFO):
        assert predict_main(args) == 0
    assert ("--backend onnx runs it faster" in caplog.text) is not native_bf16


def test_predict_folders_globs_json_and_no_detect(tiny_run, tmp_path):
    photos = require(TEST_IMAGES)
    out = tmp_path / "ages.json"
    assert (
        predict_main(
            ["--model", str(tiny_run), str(photos / "obama*.jpg"), "--no-detect", "--output", str(out)]
        )
        == 0
    )
    document = json.loads(out.read_text())
    assert [entry["path"].split("/")[-1] for entry in document] == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
    assert all(len(entry["faces"]) == 1 and entry["faces"][0]["x1"] == 0 for entry in document)
    assert predict_main(["--model", str(tiny_run), str(photos)]) == 0


def test_check_your_age_prints_the_age_and_saves_the_annotated_photo(tiny_run, tmp_path):
    photo = require(TEST_IMAGES) / "biden.jpg"
    out = tmp_path / "me_ages.jpg"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "check_your_age.py"),
            str(photo),
            "--model",
            str(tiny_run),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "you look" in done.stdout and out.is_file()


def test_check_your_age_says_where_the_annotated_photo_could_not_go_after_printing_the_age(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """An --out it cannot use is refused before the model loads (test_predict_edge_cases.py); a save
    that fails all the same (a full disk) is one line after the ages, which are printed."""
    from check_your_age import main as check_main

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    photo = require(TEST_IMAGES) / "biden.jpg"
    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "me_ages.jpg"
    assert check_main([str(photo), "--model", str(tiny_run), "--no-detect", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "you look" in printed.out and "No space left on device" in printed.err
    assert "could not save the annotated photo" in printed.err and "--out FILE" in printed.err


def test_predict_json_gives_each_faces_landmarks_where_the_detector_finds_them(tiny_run, tmp_path):
    photo = require(TEST_IMAGES) / "biden.jpg"
    detector = ["--detector", "yunet", "--detector-model", str(require(YUNET))]
    out = tmp_path / "ages.json"
    assert predict_main(["--model", str(tiny_run), str(photo), *detector, "--output", str(out)]) == 0
    (face,) = json.loads(out.read_text())[0]["faces"]
    assert list(face["landmarks"]) == ["right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"]
    assert all(
        face["x1"] <= x <= face["x2"] and face["y1"] <= y <= face["y2"] for x, y in face["landmarks"].values()
    )
    # Without a detector there are none, and the key is left out; the CSV keeps its columns.
    assert predict_main(["--model", str(tiny_run), str(photo), "--no-detect", "--output", str(out)]) == 0
    assert "landmarks" not in json.loads(out.read_text())[0]["faces"][0]
    assert (
        predict_main(["--model", str(tiny_run), str(photo), *detector, "--output", str(tmp_path / "a.csv")])
        == 0
    )
    assert "landmarks" not in pd.read_csv(tmp_path / "a.csv").columns


def test_an_interrupted_batch_keeps_its_photos_and_resume_predicts_only_the_rest(
    tiny_run, tmp_path, monkeypatch, caplog
):
    import shutil

    from age_detect_resnet.cli import predict as predict_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg"):
        shutil.copy(require(TEST_IMAGES) / name, photos / name)
    out = tmp_path / "ages.csv"
    journal = tmp_path / "ages.csv.partial"
    args = ["--model", str(tiny_run), str(photos), "--no-detect", "--output", str(out)]
    assert predict_main([*args[:-1], str(tmp_path / "whole.csv")]) == 0
    whole = pd.read_csv(tmp_path / "whole.csv")

    monkeypatch.setattr(predict_cli, "FILES_PER_CHUNK", 1)
    predicted = []
    original = AgePredictor.predict_images

    def stopped_at_the_third(self, images):
        if len(predicted) == 2:
            raise KeyboardInterrupt
        predicted.append(len(images))
        return original(self, images)

    monkeypatch.setattr(AgePredictor, "predict_images", stopped_at_the_third)
    with caplog.at_level(logging.ERROR):
        assert predict_main(args) == 130
    assert "interrupted after 2 of 4 photos" in caplog.text and "--resume" in caplog.text and not out.exists()
    assert len(journal.read_text().splitlines()) == 1 + 2  # the options, then the two photos

    # Without --resume, or with other options, the kept photos are not thrown away.
    caplog.clear()
    assert predict_main(args) == 2 and "--resume" in caplog.text
    assert predict_main([*args, "--resume", "--tta"]) == 2 and "tta False then, True now" in caplog.text
    detected = [a for a in args if a != "--no-detect"] + [
        "--detector",
        "yunet",
        "--detector-model",
        str(YUNET),
    ]
    assert predict_main([*detected, "--resume"]) == 2 and "detector 'none' then, 'yunet' now" in caplog.text
    assert predict_main(["--model", str(tiny_run), str(photos), "--resume"]) == 2
    assert len(journal.read_text().splitlines()) == 3

    # A line cut off by the kill is dropped, and only the photos not kept are predicted.
    with journal.open("a") as handle:
        handle.write('{"path": "half a li')
    predicted.clear()
    monkeypatch.setattr(
        AgePredictor, "predict_images", lambda self, images: predicted.append(1) or original(self, images)
    )
    assert predict_main([*args, "--resume"]) == 0
    assert len(predicted) == 2 and not journal.exists()
    pd.testing.assert_frame_equal(pd.read_csv(out), whole)


def test_the_journal_names_the_bundled_model_by_its_checksum():
    """`--model default` after a package upgrade is another model: a resumed run must not mix the two."""
    import argparse

    from age_detect_resnet.cli.predict import add_arguments, journal_settings
    from age_detect_resnet.modeling.bundled import AGE_MODEL_SHA256

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert (
        journal_settings(parser.parse_args(["a.jpg"]), "yunet")["model"]
        == f"default ({AGE_MODEL_SHA256[:12]})"
    )


def test_resume_refuses_a_journal_damaged_before_its_last_line(tiny_run, tmp_path, caplog):
    out = tmp_path / "ages.json"
    journal = tmp_path / "ages.json.partial"
    journal.write_text('{"settings": {}}\nnot json\n{"path": "a.jpg", "faces": []}\n')
    photo = str(require(TEST_IMAGES) / "obama.jpg")
    settings = ["--model", str(tiny_run), photo, "--no-detect", "--output", str(out), "--resume"]
    with caplog.at_level(logging.ERROR):
        assert predict_main(settings) == 2
    assert "other options" in caplog.text  # the header is checked first
    import argparse

    from age_detect_resnet.cli.predict import add_arguments, journal_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    header = json.dumps({"settings": journal_settings(parser.parse_args(settings), "none")})
    journal.write_text(header + '\nnot json\n{"path": "a.jpg", "faces": []}\n')
    caplog.clear()
    assert predict_main(settings) == 2 and "line 2 is damaged" in caplog.text


def test_annotated_names_tell_apart_inputs_that_share_a_stem():
    """One --annotate folder for the whole run: a name two inputs would share gets their extension, their
    folders below the ones they share, or both; a unique stem keeps `<stem>_ages.jpg`."""
    from pathlib import Path

    from age_detect_resnet.cli.predict import annotated_names

    def names(*paths):
        return list(annotated_names([Path(p) for p in paths]).values())

    assert names("coll/a/p.jpg", "coll/b/p.jpg", "coll/a/p.png", "coll/q.jpg", "coll/q.mp4") == [
        "a_p_jpg_ages.jpg",
        "b_p_jpg_ages.jpg",
        "a_p_png_ages.jpg",
        "q_ages.jpg",
        "q_ages.mp4",
    ]
    assert names("a/p.jpg", "b/p.jpg", "p.jpg") == ["a_p_ages.jpg", "b_p_ages.jpg", "p_ages.jpg"]
    assert names("p.jpg", "p.PNG", "P.webp") == ["p_jpg_ages.jpg", "p_PNG_ages.jpg", "P_webp_ages.jpg"]
    assert names("v/clip.mp4", "v/clip.avi") == ["clip_mp4_ages.mp4", "clip_avi_ages.mp4"]
    # a disambiguated name another input already has, or the same file named twice: numbered
    assert names("a/p.jpg", "b/p.jpg", "x/a_p.jpg") == ["a_p_2_ages.jpg", "b_p_ages.jpg", "a_p_ages.jpg"]
    same = str(Path("p.jpg").absolute())
    assert names("p.jpg", same) == ["p_jpg_ages.jpg", "p_jpg_2_ages.jpg"]


def test_predict_annotates_photos_sharing_a_stem_into_distinct_files(tiny_run, tmp_path):
    import shutil

    coll = tmp_path / "coll"
    for source, target in (("obama.jpg", "a/p.jpg"), ("biden.jpg", "b/p.jpg"), ("astronaut.png", "a/p.png")):
        (coll / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(require(TEST_IMAGES) / source, coll / target)
    out = tmp_path / "out"
    assert predict_main(["--model", str(tiny_run), str(coll), "--no-detect", "--annotate", str(out)]) == 0
    saved = {p.name: Image.open(p).size for p in out.iterdir()}
    assert saved == {
        "a_p_jpg_ages.jpg": Image.open(coll / "a/p.jpg").size,
        "b_p_jpg_ages.jpg": Image.open(coll / "b/p.jpg").size,
        "a_p_png_ages.jpg": Image.open(coll / "a/p.png").size,
    }


def test_predict_refuses_an_output_or_annotate_it_cannot_write_before_predicting(
    tiny_run, tmp_path, monkeypatch, caplog
):
    photo = str(require(TEST_IMAGES) / "obama.jpg")
    blocked = tmp_path / "a file"
    blocked.write_text("")
    (tmp_path / "d.json").mkdir()

    def not_now(self, images):
        raise AssertionError("predicted before the outputs were checked")

    monkeypatch.setattr(AgePredictor, "predict_images", not_now)
    run = ["--model", str(tiny_run), photo, "--no-detect"]
    cases = {
        ("--annotate", str(blocked)): f"{blocked} is a file, not a folder",
        ("--annotate", str(blocked / "sub")): f"{blocked / 'sub'}: {blocked} is a file, not a folder",
        ("--output", str(tmp_path / "d.json")): f"--output {tmp_path / 'd.json'} is a folder",
        ("--output", str(blocked / "ages.csv")): f"{blocked} is a file, not a folder",
    }
    for option, message in cases.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert predict_main([*run, *option]) == 2
        assert message in caplog.text and "pass a" in caplog.text
    assert not (tmp_path / "d.json.partial").exists() and not list((tmp_path / "d.json").iterdir())


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_predict_refuses_a_file_size_limit_no_photo_can_meet(limit, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict_main(["photo.jpg", "--max-file-mb", limit])
    assert exit_.value.code == 2 and "--max-file-mb must be > 0" in capsys.readouterr().err
