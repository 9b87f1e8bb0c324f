"""Face alignment: the similarity fit, the aligner on real photos (upright and rotated), the aligned
training cache, and the framing every inference path shares."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from age_detect_resnet.data.cache import CacheAlignment, prepare_cache
from age_detect_resnet.data.dataset import train_transform
from age_detect_resnet.faces.align import (
    TURNED_HEAD,
    Aligner,
    LandmarkFraming,
    MarginFraming,
    eyes_mouth_matrix,
    framing_of,
    head_pose,
    head_turn,
    similarity_matrix,
)
from age_detect_resnet.faces.detection import (
    SMALL_FACES_LOOK_SETTINGS,
    Face,
    YuNetDetector,
    create_detector,
    largest_face,
    subject_face,
    subject_faces,
    tilt_degrees,
    uniform_margins,
)
from conftest import TEST_IMAGES, UTKFACE, YUNET, require


def test_similarity_fit_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = np.deg2rad(20), 1.7, np.array([12.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    matrix = similarity_matrix(points, moved)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    with pytest.raises(ValueError, match="collapse"):
        similarity_matrix(np.ones((5, 2)), moved)


@pytest.mark.parametrize("version", [1, 2])
def test_aligned_landmarks_land_on_the_template(version):
    aligner = Aligner(version=version)
    # A face rotated and scaled: its landmarks are the template moved by a similarity transform.
    template = np.asarray(aligner.template) * 100
    angle = np.deg2rad(-25)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ (2.5 * rotation).T + [300, 200]
    matrix = aligner.matrix(landmarks, 64)
    placed = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(placed, np.asarray(aligner.template) * 64, atol=1e-6)
    # With context, the same points sit in the centre window of the larger crop.
    out = aligner.output_size(64, 1.25)
    assert out == 80 and (out - 64) % 2 == 0
    matrix = aligner.matrix(landmarks, 64, context=1.25)
    placed = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(placed, np.asarray(aligner.template) * 64 + 8, atol=1e-6)


def _turned_head(yaw_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Five landmarks of a frontal face (the template, 300 px across) and of the same face turned
    sideways by `yaw_degrees`: widths about the midline shrink by cos(yaw), heights stay, and the nose
    tip, which stands out of the face, moves towards the turned side."""
    frontal = np.asarray(Aligner().template) * 300 + [50, 20]
    midline = frontal[:, 0].mean()
    yaw = np.deg2rad(yaw_degrees)
    turned = frontal.copy()
    turned[:, 0] = midline + (frontal[:, 0] - midline) * np.cos(yaw)
    turned[2, 0] += 0.35 * 106 * np.sin(yaw)  # the nose tip stands ~a third of the eye distance out
    return frontal, turned


def test_eyes_and_mouth_alignment_keeps_a_turned_head_whole():
    frontal, turned = _turned_head(55)

    def crop_side(matrix: np.ndarray) -> float:  # the photo's pixels the 128 px crop spans
        return 128 / float(np.hypot(*matrix[:, 0]))

    least_squares, eyes_mouth = Aligner(version=1), Aligner(version=2)
    side = crop_side(least_squares.matrix(frontal, 128))
    assert crop_side(eyes_mouth.matrix(frontal, 128)) == pytest.approx(side)
    # Turned, the least-squares fit zooms in (the eyes came closer) and follows the nose; eyes and mouth
    # keep the frontal face's size (its height did not change) and its centre on the face's midline.
    assert crop_side(least_squares.matrix(turned, 128)) < 0.93 * side  # measured 0.90
    matrix = eyes_mouth.matrix(turned, 128)
    assert crop_side(matrix) == pytest.approx(side)
    centre = (turned[:2].mean(axis=0) + turned[3:].mean(axis=0)) / 2
    template = np.asarray(eyes_mouth.template) * 128
    expected = (template[:2].mean(axis=0) + template[3:].mean(axis=0)) / 2
    np.testing.assert_allclose(matrix[:, :2] @ centre + matrix[:, 2], expected, atol=1e-6)
    np.testing.assert_allclose(matrix[:, :2], np.eye(2) * matrix[0, 0], atol=1e-9)  # still upright
    with pytest.raises(ValueError, match="collapse"):
        eyes_mouth_matrix(np.ones((5, 2)), template)


def test_head_pose_tells_a_turned_head_from_a_frontal_one():
    frontal, turned = _turned_head(55)
    slightly = _turned_head(10)[1]
    assert head_turn(frontal) == pytest.approx(0.0, abs=1e-9)
    assert 0 < head_turn(slightly) < TURNED_HEAD < head_turn(turned)
    assert head_turn(turned * [-1, 1]) == pytest.approx(-head_turn(turned))  # mirrored: the other way
    pose = {
        name: head_pose(Face((0, 0, 1, 1), 0.9, tuple(map(tuple, points))))
        for name, points in (("frontal", frontal), ("slightly", slightly), ("turned", turned))
    }
    assert pose == {"frontal": "frontal", "slightly": "frontal", "turned": "turned"}
    assert head_pose(None) is None and head_pose(Face((0, 0, 1, 1), 0.9)) is None  # no face, no landmarks


def test_metadata_round_trip_and_old_models_keep_margins():
    for aligner in (Aligner(), Aligner(version=2)):
        framing = framing_of({"alignment": aligner.to_metadata()})
        assert isinstance(framing, LandmarkFraming) and framing.aligner == aligner
    aligner = Aligner()
    old = framing_of({"crop": {"margins": uniform_margins(0.1)}})
    assert isinstance(old, MarginFraming) and old.margins["left"] == 0.1
    with pytest.raises(ValueError, match="upgrade"):
        framing_of({"alignment": {**aligner.to_metadata(), "version": 99}})


def _largest(detector, image: Image.Image) -> Face:
    faces = detector.detect(image)
    assert faces, "YuNet found no face in a test photo"
    return max(faces, key=lambda f: f.area)


@pytest.mark.parametrize("version", [1, 2])
def test_a_photo_rotated_by_20_degrees_gives_nearly_the_same_aligned_face(version):
    require(YUNET)
    detector = create_detector("yunet", YUNET)
    upright = Image.open(require(TEST_IMAGES / "obama.jpg")).convert("RGB")
    rotated = upright.rotate(20, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128, 128, 128))
    aligned = LandmarkFraming(Aligner(version=version))
    margins = MarginFraming(uniform_margins(0.1))
    crops = {}
    for name, framing in (("aligned", aligned), ("margins", margins)):
        a, _ = framing.crop(upright, _largest(detector, upright), 96)
        b, _ = framing.crop(rotated, _largest(detector, rotated), 96)
        crops[name] = float(np.abs(a.astype(float) - b.astype(float)).mean())
    # The aligner turns the face upright again (the crops differ by a pixel or two of shift, which
    # costs ~18 grey levels on this textured photo), where the box + margin crop of the rotated photo
    # shows a tilted face.
    assert crops["aligned"] < 25, crops
    assert crops["margins"] > 2 * crops["aligned"], crops


def test_a_tilted_face_is_detected_again_upright_so_its_landmarks_show_the_whole_tilt():
    require(YUNET)
    upright = Image.open(require(TEST_IMAGES / "astronaut.png")).convert("RGB")
    turned = upright.rotate(-20, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128,) * 3)
    first_look = YuNetDetector(YUNET, **SMALL_FACES_LOOK_SETTINGS, upright_passes=0)  # no second look here
    default = create_detector("yunet", YUNET)
    assert default.upright_passes == 2
    seen = {}
    for name, detector in (("first look", first_look), ("default", default)):
        seen[name] = abs(tilt_degrees(_largest(detector, turned)) - tilt_degrees(_largest(detector, upright)))
    # Of the photo turned by 20 degrees, YuNet's first look sees almost none of the turn (measured 2.7);
    # looked at again upright, at one face size, all of it (20.0).
    assert seen["first look"] < 8 and 16 < seen["default"] < 24, seen


@pytest.mark.parametrize("photo", ["biden.jpg", "obama2.jpg"])
def test_landmarks_stay_put_when_the_photo_is_made_smaller(photo):
    """Every face's landmarks come from a look at one face size: the photo at half and at a third of its
    size gives them within 4% of the eye distance of the full-size photo's (measured 1.8-2.5%), where
    the look at small faces only moved them by 7-14%, and the aligned crop and the age with them."""
    require(YUNET)
    image = Image.open(require(TEST_IMAGES / photo)).convert("RGB")
    shifts = {}
    for name, detector in (
        ("default", create_detector("yunet", YUNET)),
        ("small faces only", YuNetDetector(YUNET, **SMALL_FACES_LOOK_SETTINGS)),
    ):
        full = np.asarray(_largest(detector, image).landmarks)
        eyes = float(np.hypot(*(full[1] - full[0])))
        for scale in (0.5, 0.35):
            size = (round(image.width * scale), round(image.height * scale))
            small = np.asarray(_largest(detector, image.resize(size, Image.Resampling.LANCZOS)).landmarks)
            shifts[name, scale] = float(np.hypot(*(small / scale - full).T).mean()) / eyes
    assert all(shifts["default", scale] < 0.04 for scale in (0.5, 0.35)), shifts
    assert sum(shifts["small faces only", s] for s in (0.5, 0.35)) > 2 * sum(
        shifts["default", s] for s in (0.5, 0.35)
    ), shifts


def test_the_subject_of_a_photo_is_its_large_central_face_not_a_larger_one_at_the_edge():
    size = (800, 600)
    edge = Face((0, 0, 200, 200), 0.9)  # a parent's face in the corner: 40,000 px
    centre = Face((330, 230, 470, 370), 0.9)  # the child the photo is of: 19,600 px
    assert largest_face([edge, centre]) is edge
    assert subject_face([edge, centre], size) is centre
    # Of faces equally far from the centre, the larger one, as before.
    left, right = Face((100, 250, 200, 350), 0.9), Face((560, 230, 740, 370), 0.9)
    assert subject_face([left, right], size) is right
    assert subject_face([], size) is None


def test_evaluation_frames_the_central_face_of_a_photo_with_two(tmp_path):
    require(YUNET)
    large = Image.open(require(TEST_IMAGES / "astronaut.png")).convert("RGB")
    small = Image.open(require(TEST_IMAGES / "obama.jpg")).convert("RGB").resize((228, 284))
    photo = Image.new("RGB", (1200, 800), (128, 128, 128))
    photo.paste(large, (-140, -40))  # its face ends up in the top-left corner, twice the other's area
    photo.paste(small, (446, 218))  # this face near the centre
    photo.save(tmp_path / "two.png")
    (face,) = subject_faces([tmp_path / "two.png"], kind="yunet", model_path=YUNET, workers=1)
    x1, y1, x2, y2 = face.box
    assert 450 < (x1 + x2) / 2 < 700 and 200 < (y1 + y2) / 2 < 400, face.box


class _InProcessPool:
    """ProcessPoolExecutor's part that subject_faces uses, run in this process, keeping the workers'
    initialiser arguments for the test to read."""

    initargs: ClassVar[list[tuple]] = []

    def __init__(self, max_workers, initializer, initargs):
        _InProcessPool.initargs.append(initargs)
        initializer(*initargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, items, chunksize=1):
        return map(function, items)


def test_subject_faces_decides_the_detector_once_and_its_workers_build_that_one(
    tmp_path, monkeypatch, caplog
):
    import age_detect_resnet.faces.detection as detection

    Image.open(require(TEST_IMAGES / "obama.jpg")).convert("RGB").save(tmp_path / "photo.png")
    monkeypatch.setattr(detection, "ProcessPoolExecutor", _InProcessPool)
    _InProcessPool.initargs = []

    # `auto` without YuNet (no file given, none found: as offline before the download): the fall-back
    # to Haar is said once, and the workers are told "haar".
    monkeypatch.setenv(detection.YUNET_ENV, str(tmp_path / "missing.onnx"))
    with caplog.at_level("WARNING"):
        (face,) = subject_faces([tmp_path / "photo.png"], kind="auto", model_path=None, workers=2)
    assert face is not None and face.landmarks is None  # Haar's box
    assert _InProcessPool.initargs == [("haar", None)]
    assert sum("Falling back to the Haar cascade" in r.getMessage() for r in caplog.records) == 1

    # With YuNet given, the workers load the file the parent resolved.
    (face,) = subject_faces([tmp_path / "photo.png"], kind="auto", model_path=require(YUNET), workers=2)
    assert face.landmarks is not None
    assert _InProcessPool.initargs[-1] == ("yunet", str(YUNET))


def test_the_crop_box_is_the_photo_region_the_model_sees():
    image = Image.new("RGB", (400, 300), (90, 90, 90))
    face = Face((150, 100, 250, 200), 0.9)  # no landmarks: estimated from the box (Haar-style)
    pixels, box = LandmarkFraming(Aligner()).crop(image, face, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    x1, y1, x2, y2 = box
    assert 0 <= x1 < 150 and 0 <= y1 < 110 and 250 < x2 <= 400 and 190 < y2 <= 300


def test_aligned_cache_counts_faceless_images_and_serves_centre_crops(tmp_path):
    require(YUNET)
    source = require(UTKFACE)
    folder = tmp_path / "img"
    folder.mkdir()
    names = sorted(p.name for p in source.glob("*.jpg"))[::2000][:6]
    for name in names:
        shutil.copy(source / name, folder / name)
    Image.new("RGB", (200, 200), (120, 120, 120)).save(folder / "blank.jpg")  # no face in it
    paths = [*names, "blank.jpg"]
    framing = CacheAlignment(Aligner(), detector_model=str(YUNET), context=1.25)
    cache = prepare_cache(
        folder, paths, image_size=48, cache_dir=tmp_path / "cache", workers=1, framing=framing
    )
    assert cache.stored_size == 60 and cache.alignment["faces_found"] == len(names)
    assert cache.alignment["no_face_median_landmarks"] == 1
    assert cache.alignment["no_face_examples"] == [str(folder / "blank.jpg")]
    full, centre = cache.load(0), cache.centre(48).load(0)
    assert full.shape == (3, 60, 60) and centre.shape == (3, 48, 48)
    assert torch.equal(full[:, 6:54, 6:54], centre)
    assert torch.equal(cache.centre(48).load_many([0, 1])[1], cache.centre(48).load(1))
    # A plain resize and an aligned cache of the same files are different caches.
    plain = prepare_cache(folder, paths, image_size=48, cache_dir=tmp_path / "cache", workers=1)
    assert plain.folder != cache.folder and plain.stored_size == 48
    index = json.loads((cache.folder / "index.json").read_text())
    assert index["alignment"]["faces_found"] == len(names)


@pytest.mark.parametrize("aligned", [False, True])
def test_a_stopped_cache_preparation_goes_on_from_its_last_saved_block(tmp_path, monkeypatch, aligned):
    """Preparing IMDB-WIKI's faces takes long: a stop (Ctrl-C, the end of a session) loses at most one
    block, and the finished cache is byte for byte the one an unbroken preparation makes."""
    from age_detect_resnet.data import cache as cache_module

    source = require(UTKFACE)
    folder = tmp_path / "img"
    folder.mkdir()
    names = sorted(p.name for p in source.glob("*.jpg"))[::3000][:7]
    for name in names:
        shutil.copy(source / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    paths = sorted([*names, "broken.jpg"])
    framing = CacheAlignment(Aligner(), detector_model=str(require(YUNET))) if aligned else None

    def prepare(cache_dir):
        return prepare_cache(folder, paths, image_size=32, cache_dir=cache_dir, workers=1, framing=framing)

    whole = prepare(tmp_path / "whole")
    monkeypatch.setattr(cache_module, "SAVE_EVERY", 3)
    real_progress, seen = cache_module.progress, []

    def stopped_at_the_fifth(iterable, **kwargs):
        for item in real_progress(iterable, **kwargs):
            if len(seen) == 4:
                raise KeyboardInterrupt
            seen.append(item)
            yield item

    monkeypatch.setattr(cache_module, "progress", stopped_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "stopped")
    (partial_folder,) = (tmp_path / "stopped").iterdir()
    assert json.loads((partial_folder / "progress.json").read_text())["done"] == 3  # one block saved
    assert not (partial_folder / "index.json").exists()

    seen.clear()
    monkeypatch.setattr(
        cache_module, "progress", lambda iterable, **kwargs: (seen.append(1) or x for x in iterable)
    )
    resumed = prepare(tmp_path / "stopped")
    assert len(seen) == len(paths) - 3  # only the rows not saved
    assert sorted(p.name for p in resumed.folder.iterdir()) == ["images.u8", "index.json"]
    assert (resumed.folder / "images.u8").read_bytes() == (whole.folder / "images.u8").read_bytes()
    assert (resumed.folder / "index.json").read_text() == (whole.folder / "index.json").read_text()
    assert resumed.errors == whole.errors and len(resumed.errors) == 1


def test_photo_augmentation_turns_the_context_crop_into_the_model_input():
    torch.manual_seed(0)
    transform = train_transform("photo", 48)
    image = torch.randint(0, 256, (3, 60, 60), dtype=torch.uint8)
    outputs = [transform(image) for _ in range(8)]
    assert all(o.shape == (3, 48, 48) and o.dtype == torch.uint8 for o in outputs)
    assert len({o.float().mean().item() for o in outputs}) > 1  # random, not a fixed crop


def test_training_with_align_needs_the_cache():
    from age_detect_resnet.training.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="--cache"):
        resolve_config(None, {"align": True, "cache": False})
    assert resolve_config("cpu").data.align


def test_the_aligner_version_is_a_setting_and_part_of_the_cache_key():
    from age_detect_resnet.training.config import ConfigError, resolve_config
    from age_detect_resnet.training.loaders import cache_alignment

    framings = [cache_alignment(resolve_config("cpu", {"alignment": v})) for v in (1, 2)]
    assert [f.aligner.version for f in framings] == [1, 2]
    from age_detect_resnet.faces.align import ALIGNMENT_VERSIONS
    from age_detect_resnet.training.config import ALIGNMENT_VERSIONS as SETTING_CHOICES

    assert SETTING_CHOICES == ALIGNMENT_VERSIONS  # the setting offers every version the aligner knows
    assert framings[0].key() != framings[1].key()  # each version prepares its own cache
    with pytest.raises(ConfigError, match="alignment"):
        resolve_config("cpu", {"alignment": 3})
    with pytest.raises(ConfigError, match="add --align"):
        resolve_config(None, {"alignment": 2})


def test_an_aligned_run_frames_photos_as_it_was_trained(utkface_sample, tmp_path):
    """--align end to end: the cache aligns the training faces, the model's metadata carries the
    aligner, and prediction aligns photos the same way (a rotated photo keeps its age)."""
    from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
    from conftest import train_tiny

    require(YUNET)
    extra = ["--align", "--cache", "--cache-dir", str(tmp_path / "cache"), "--augment", "photo"]
    run = train_tiny(utkface_sample, tmp_path / "aligned", *extra, "--detector-model", str(YUNET))
    meta = json.loads((run / "best.json").read_text())
    assert meta["alignment"]["version"] == 1
    assert meta["alignment"]["training_images"]["faces_found"] >= 55  # of 60 UTKFace crops
    assert "faces aligned by their detected landmarks" in (run / "report.md").read_text()
    predictor = AgePredictor(load_trained_model(run), detector=create_detector("yunet", YUNET))
    upright = Image.open(require(TEST_IMAGES / "obama.jpg")).convert("RGB")
    rotated = upright.rotate(20, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128, 128, 128))
    ages = [predictor.predict_image(image)[0].age for image in (upright, rotated)]
    assert abs(ages[0] - ages[1]) < 1.5, ages


def test_a_face_that_fills_its_photo_keeps_its_first_looks_landmarks():
    """The second look needs the face's surroundings: around a face filling a tight crop its region would
    be mostly the photo's repeated edge, so such a face keeps the landmarks of the first look (on a
    photo with room around the face, the second look moves them)."""
    require(YUNET)
    photo = Image.open(require(TEST_IMAGES / "obama.jpg")).convert("RGB")
    first_look = YuNetDetector(YUNET, **SMALL_FACES_LOOK_SETTINGS, upright_passes=0)
    default = YuNetDetector(YUNET, upright_passes=0)
    x1, y1, x2, y2 = _largest(first_look, photo).box
    tight = photo.crop((round(x1), round(y1), round(x2), round(y2))).resize((160, 160))
    roomy = photo.resize((photo.width // 4, photo.height // 4))  # under 640 px: no second look before
    assert default._region_inside(tight, _largest(default, tight)) < 0.5
    for image, same in ((tight, True), (roomy, False)):
        ours, first = (np.asarray(_largest(d, image).landmarks) for d in (default, first_look))
        assert np.allclose(ours, first) == same, (ours, first)
