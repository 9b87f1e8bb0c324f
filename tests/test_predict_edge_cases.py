"""`age-detect predict` and check_your_age.py where a user's files, folders and options are unusual: a
journal torn by a kill, inputs that look like patterns, annotated names that are inputs, an --out that
is the photo itself or a folder, Ctrl-C while the model loads, a batch without faces."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from age_detect_resnet.cli import predict as predict_cli
from age_detect_resnet.cli.predict import (
    PhotoResult,
    PredictionJournal,
    add_arguments,
    annotate_to,
    annotated_names,
    expand_inputs,
    journal_settings,
    write_output,
)
from age_detect_resnet.cli.predict import main as predict_main
from age_detect_resnet.inference.annotate import draw_predictions
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction
from conftest import TEST_IMAGES, YUNET, require


def face(box=(0, 0, 10, 10), age=30.0, interval=None) -> FacePrediction:
    return FacePrediction(0, box, box, 0.9, age, interval)


def copy_photo(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(require(TEST_IMAGES) / name, target)
    return target


# --- the journal ---------------------------------------------------------------------------------------


def test_a_journal_torn_by_a_kill_survives_any_number_of_resumes(tmp_path):
    """A resume used to append straight after the torn tail, gluing its first photo to it: the next
    --resume then refused the journal as damaged, and every photo kept was lost."""
    out = tmp_path / "ages.csv"
    settings = {"model": "m"}
    journal = PredictionJournal(out, settings, resume=False)
    journal.record(PhotoResult(Path("été.jpg"), [face()]))
    journal.close()
    with journal.path.open("ab") as handle:  # killed mid-line, mid-character
        handle.write('{"path": "ét'.encode()[:-1])
    for number, name in enumerate(("b.jpg", "c.jpg"), start=2):
        journal = PredictionJournal(out, settings, resume=True)
        assert len(journal.done) == number - 1
        journal.record(PhotoResult(Path(name), [face()]))
        journal.close()
        with journal.path.open("a") as handle:  # and again
            handle.write('{"path": "x.jpg", "fa')
    journal = PredictionJournal(out, settings, resume=True)
    assert sorted(journal.done) == ["b.jpg", "c.jpg", "été.jpg"]
    journal.close()
    assert journal.path.read_bytes().endswith(b"\n")


def test_resume_refuses_an_annotate_folder_added_or_changed(tiny_run, tmp_path, caplog):
    """The photos kept are not predicted again, so an --annotate added on --resume would miss them."""
    photo = str(copy_photo("obama.jpg", tmp_path / "photos" / "obama.jpg"))
    out = tmp_path / "ages.csv"
    base = ["--model", str(tiny_run), photo, "--no-detect", "--output", str(out)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    journal = PredictionJournal(out, journal_settings(parser.parse_args(base), "none"), resume=False)
    journal.close()
    with caplog.at_level(logging.ERROR):
        assert predict_main([*base, "--resume", "--annotate", str(tmp_path / "ann")]) == 2
    assert "annotate None then" in caplog.text and not (tmp_path / "ann" / "obama_ages.jpg").exists()
    assert predict_main([*base, "--resume"]) == 0


# --- inputs --------------------------------------------------------------------------------------------


def test_an_existing_file_is_taken_literally_and_patterns_search_the_folders_they_match(tmp_path):
    literal = copy_photo("obama.jpg", tmp_path / "me [2023].jpg")
    assert expand_inputs([str(literal)]) == ([literal], [])
    first = copy_photo("obama.jpg", tmp_path / "col1" / "a.jpg")
    second = copy_photo("biden.jpg", tmp_path / "col2" / "deep" / "b.jpg")
    assert expand_inputs([str(tmp_path / "col*")]) == ([first, second], [])


def test_folders_follow_symlinked_subfolders_once_and_end_on_loops(tmp_path):
    library = copy_photo("obama.jpg", tmp_path / "elsewhere" / "o.jpg").parent
    root = tmp_path / "root"
    own = copy_photo("biden.jpg", root / "b.jpg")
    (root / "linked").symlink_to(library, target_is_directory=True)
    (root / "again").symlink_to(library, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    found, problems = expand_inputs([str(root)])
    assert not problems
    assert len(found) == 2 and own in found
    assert {p.resolve() for p in found} == {own.resolve(), (library / "o.jpg").resolve()}


# --- annotated copies ----------------------------------------------------------------------------------


def test_annotated_names_are_never_those_of_inputs_in_the_annotate_folder(tmp_path):
    paths = [tmp_path / "x.jpg", tmp_path / "x_ages.jpg", tmp_path / "elsewhere" / "y_ages.jpg"]
    names = annotated_names(paths, tmp_path)
    assert names[paths[0]] not in {"x_ages.jpg"} and names[paths[1]] == "x_ages_ages.jpg"
    assert len(set(names.values())) == 3
    assert annotated_names(paths, tmp_path / "ann")[paths[0]] == "x_ages.jpg"  # elsewhere: as before
    assert annotated_names(paths, tmp_path) == names  # the same on every run


def test_annotating_into_the_input_folder_writes_over_no_input(tiny_run, tmp_path):
    coll = tmp_path / "coll"
    copy_photo("obama.jpg", coll / "x.jpg")
    copy_photo("biden.jpg", coll / "x_ages.jpg")
    before = (coll / "x_ages.jpg").read_bytes()
    assert predict_main(["--model", str(tiny_run), str(coll), "--no-detect", "--annotate", str(coll)]) == 0
    assert (coll / "x_ages.jpg").read_bytes() == before
    assert Image.open(coll / "x_ages_ages.jpg").size == Image.open(coll / "x_ages.jpg").size
    (written,) = set(p.name for p in coll.iterdir()) - {"x.jpg", "x_ages.jpg", "x_ages_ages.jpg"}
    assert Image.open(coll / written).size == Image.open(coll / "x.jpg").size


def test_annotate_to_draws_on_the_picture_that_was_predicted(tmp_path):
    on_disk = copy_photo("obama.jpg", tmp_path / "p.jpg")
    predicted = Image.new("RGB", (64, 48), (90, 90, 90))
    out = annotate_to(PhotoResult(on_disk, [face()], image=predicted), tmp_path / "ann", "p_ages.jpg")
    assert Image.open(out).size == (64, 48)


def test_the_label_of_a_box_filling_the_photo_is_drawn_inside_it():
    """--no-detect: the box is the whole image; the label went below its bottom edge, out of sight."""
    image = Image.new("RGB", (200, 150), (128, 128, 128))
    annotated = np.asarray(draw_predictions(image, [face((0, 0, 200, 150), age=41.0)]))
    text = annotated.astype(int).sum(axis=2) < 100  # black, smoothed into the green at its edges
    assert text[:30, :60].any() and not text[30:].any()  # at the top-left corner, inside the box


def test_a_video_without_faces_leaves_no_annotated_copy(tiny_run, tmp_path, caplog):
    video = tmp_path / "blank.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for _ in range(10):
        writer.write(np.full((64, 96, 3), 120, np.uint8))
    writer.release()
    detector = ["--detector", "yunet", "--detector-model", str(require(YUNET))]
    ann = tmp_path / "ann"
    run = ["--model", str(tiny_run), str(video), *detector, "--annotate", str(ann)]
    with caplog.at_level(logging.ERROR):
        assert predict_main(run) == 1
    assert "no face found" in caplog.text and not list(ann.iterdir())


# --- outputs and options -------------------------------------------------------------------------------


def test_the_csv_header_is_the_models_whether_or_not_a_face_was_found(tiny_run, tmp_path):
    out = tmp_path / "ages.csv"
    write_output([PhotoResult(Path("none.jpg"), error="no face")], out, intervals=True)
    assert pd.read_csv(out).columns.tolist()[-3:] == ["age", "age_low", "age_high"]
    with_face = [PhotoResult(Path("a.jpg"), [face(interval=(20.0, 40.0))])]
    write_output(with_face, tmp_path / "faces.csv", intervals=True)
    assert pd.read_csv(tmp_path / "faces.csv").columns.tolist() == pd.read_csv(out).columns.tolist()
    # the CLI asks the model: the tiny regression run has no interval, the bundled model has one
    assert AgePredictor(tiny_run).output_names == ("age",)
    (tmp_path / "notimage.jpg").write_text("not an image")
    args = [str(tmp_path / "notimage.jpg"), "--no-detect", "--output", str(out)]
    assert predict_main(["--model", str(tiny_run), *args]) == 1
    assert pd.read_csv(out).columns.tolist()[-1] == "age"
    assert predict_main(args) == 1
    assert pd.read_csv(out).columns.tolist()[-2:] == ["age_low", "age_high"]


def test_threads_must_be_positive_and_apply_to_the_torch_backend(tiny_run, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict_main(["photo.jpg", "--threads", "-5"])
    assert exit_.value.code == 2 and "--threads" in capsys.readouterr().err
    asked = []
    monkeypatch.setattr(predict_cli.torch, "set_num_threads", asked.append)
    photo = str(require(TEST_IMAGES) / "obama.jpg")
    assert predict_main(["--model", str(tiny_run), photo, "--no-detect", "--threads", "1"]) == 0
    assert asked == [1]


def test_ctrl_c_while_the_model_loads_is_one_line_and_status_130(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_cli, "build_predictor", interrupted)
    with caplog.at_level(logging.ERROR):
        assert predict_main(["photo.jpg"]) == 130
    assert caplog.records[-1].getMessage() == "interrupted"


def test_a_photo_with_corrupt_exif_is_read(tmp_path):
    """PIL's own warning is left as it is: catching it to name the file would change the process's
    warning filters from every decoding thread at once (the web app decodes uploads in threads)."""
    from age_detect_resnet.images import load_rgb

    path = tmp_path / "bad exif.jpg"
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"  # cut short
    Image.new("RGB", (32, 24), (100, 100, 100)).save(path, exif=exif)
    assert load_rgb(path).size == (32, 24)


# --- check_your_age.py ---------------------------------------------------------------------------------


@pytest.fixture
def check(monkeypatch):
    """check_your_age's main, and a flag set when it loads the model."""
    from check_your_age import main

    from age_detect_resnet.inference import predictor

    loaded = []
    real = predictor.load_trained_model
    monkeypatch.setattr(predictor, "load_trained_model", lambda *a: loaded.append(1) or real(*a))
    return main, loaded


def test_check_your_age_refuses_to_write_over_the_photo(tmp_path, check, capsys):
    main, loaded = check
    photo = copy_photo("biden.jpg", tmp_path / "mine.jpg")
    before = photo.read_bytes()
    assert main([str(photo), "--out", str(tmp_path / "." / "mine.jpg")]) == 2
    assert photo.read_bytes() == before and not loaded
    assert "is the photo itself" in capsys.readouterr().err


def test_check_your_age_checks_out_before_the_model_and_creates_its_folder(tiny_run, tmp_path, check, capsys):
    main, loaded = check
    photo = str(require(TEST_IMAGES) / "biden.jpg")
    run = [photo, "--model", str(tiny_run), "--no-detect"]
    (tmp_path / "folder").mkdir()
    for out, message in (
        (tmp_path / "folder", "is a folder; pass a file name, such as"),
        (tmp_path / "noext", "needs an image extension"),
        (tmp_path / "x.unknown", "needs an image extension"),
    ):
        assert main([*run, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Errno" not in err and not loaded
    assert main([*run, "--out", str(tmp_path / "new" / "deeper" / "x.png")]) == 0
    assert Image.open(tmp_path / "new" / "deeper" / "x.png").format == "PNG"


def test_check_your_age_says_when_no_viewer_can_show_the_photo(
    tiny_run, tmp_path, check, monkeypatch, capsys
):
    from PIL import ImageShow

    main, _ = check
    shown = []
    monkeypatch.setattr(ImageShow, "show", lambda image, title=None: shown.append(1) or 1)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    out = tmp_path / "me_ages.jpg"
    photo = str(require(TEST_IMAGES) / "biden.jpg")
    assert main([photo, "--model", str(tiny_run), "--no-detect", "--out", str(out), "--show"]) == 0
    assert "could not open an image viewer" in capsys.readouterr().err and not shown and out.is_file()
    monkeypatch.setenv("DISPLAY", ":0")
    assert main([photo, "--model", str(tiny_run), "--no-detect", "--out", str(out), "--show"]) == 0
    assert shown and "could not open" not in capsys.readouterr().err


def test_check_your_age_ctrl_c_while_the_model_loads_is_one_line(monkeypatch, capsys):
    from check_your_age import main

    from age_detect_resnet.inference import predictor

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(predictor, "load_trained_model", interrupted)
    assert main([str(require(TEST_IMAGES) / "biden.jpg")]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# --- the training grid ---------------------------------------------------------------------------------


def test_the_grid_gives_the_ages_predict_age_for_image_gives(tmp_path, monkeypatch):
    """The bundled model was trained on aligned faces: the grid resized the raw photo instead."""
    from age_detect_resnet.inference import predictor
    from age_detect_resnet.inference.predictor import (
        load_trained_model,
        predict_age_for_image,
        prediction_grid,
    )

    require(YUNET)
    model = load_trained_model("default", "cpu")
    paths = [require(TEST_IMAGES) / name for name in ("biden.jpg", "obama.jpg", "obama2.jpg")]
    captions = []
    monkeypatch.setattr(predictor, "plot_prediction_grid", lambda images, c, out, **kw: captions.extend(c))
    prediction_grid(model, paths, [80, 60, 50], tmp_path / "grid.png")
    grid = [float(caption.split("predicted ")[1]) for caption in captions]
    alone = [predict_age_for_image(path, model, "cpu")[0] for path in paths]
    assert grid == pytest.approx(alone, abs=0.06), json.dumps({"grid": grid, "alone": alone})
