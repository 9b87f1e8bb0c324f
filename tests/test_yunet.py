"""YuNet's runtimes (faces/yunet.py): ONNX Runtime must find what OpenCV's FaceDetectorYN finds."""

from __future__ import annotations

import numpy as np
import pytest

from age_detect_resnet.faces import yunet
from age_detect_resnet.faces.detection import DetectorUnavailableError, YuNetDetector, detection_copy
from age_detect_resnet.faces.yunet import decode_yunet, yunet_engine
from age_detect_resnet.images import load_rgb
from conftest import SHARED, TEST_IMAGES, YUNET, require

PORTRAITS = SHARED / "data" / "real_photos" / "portraits"


def photos() -> list:
    found = sorted(require(TEST_IMAGES).glob("*.jpg"))
    if PORTRAITS.is_dir():
        found += sorted(PORTRAITS.rglob("*.jpg"))[:6]
    return found


def bgr_of(path, max_side: int | None = 640) -> np.ndarray:
    image, _ = detection_copy(load_rgb(path), max_side)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


@pytest.mark.parametrize("max_side", [640, 300])
def test_onnxruntime_finds_the_faces_and_landmarks_opencv_finds(max_side):
    opencv = yunet_engine(require(YUNET), engine="opencv")
    onnxruntime = yunet_engine(YUNET, engine="onnxruntime")
    assert (opencv.name, onnxruntime.name) == ("opencv", "onnxruntime")
    for path in photos():
        bgr = bgr_of(path, max_side)  # odd sizes: the padding to 32 is exercised
        expected, found = opencv(bgr), onnxruntime(bgr)
        assert len(found) == len(expected) >= 1, path.name
        expected = expected[np.argsort(-expected[:, 14])]
        np.testing.assert_allclose(found, expected, atol=0.01, err_msg=path.name)


def test_clones_share_the_session_and_give_the_same_faces():
    engine = yunet_engine(require(YUNET), engine="onnxruntime")
    twin = engine.clone()
    assert twin._session is engine._session
    bgr = bgr_of(TEST_IMAGES / "obama.jpg")
    np.testing.assert_array_equal(twin(bgr), engine(bgr))


def one_cell_outputs(pad_w: int, pad_h: int) -> dict[str, np.ndarray]:
    """YuNet outputs with nothing found but at stride 16, cells (row 1, col 2) and (row 1, col 3)."""
    outputs = {}
    for stride in yunet.STRIDES:
        cells = (pad_w // stride) * (pad_h // stride)
        outputs |= {
            f"cls_{stride}": np.zeros((1, cells, 1), np.float32),
            f"obj_{stride}": np.zeros((1, cells, 1), np.float32),
            f"bbox_{stride}": np.zeros((1, cells, 4), np.float32),
            f"kps_{stride}": np.zeros((1, cells, 10), np.float32),
        }
    cols = pad_w // 16
    for index, (cls, obj) in ((1 * cols + 2, (1.2, 0.81)), (1 * cols + 3, (0.85, 0.85))):
        outputs["cls_16"][0, index, 0], outputs["obj_16"][0, index, 0] = cls, obj
    first = 1 * cols + 2
    outputs["bbox_16"][0, first] = (0.5, 0.25, np.log(2.0), np.log(3.0))
    outputs["kps_16"][0, first] = np.arange(10, dtype=np.float32) / 10
    # the second cell's face, 8 px to the right of the first one's (IoU 0.6) with a lower score
    outputs["bbox_16"][0, first + 1] = (0.0, 0.25, np.log(2.0), np.log(3.0))
    return outputs


def test_decoding_places_boxes_and_landmarks_on_the_grid_and_suppresses_overlaps():
    faces = decode_yunet(one_cell_outputs(64, 64), 64, 64, score_threshold=0.7, nms_threshold=0.3)
    assert faces.shape == (1, 15)
    x, y, w, h = faces[0, :4]
    # centre ((2 + 0.5) * 16, (1 + 0.25) * 16) = (40, 20); size (2 * 16, 3 * 16); cls clamped to 1
    assert (x, y, w, h) == pytest.approx((40 - 16, 20 - 24, 32, 48), abs=1e-4)
    points = faces[0, 4:14].reshape(5, 2)
    expected = (np.arange(10).reshape(5, 2) / 10 + (2, 1)) * 16
    np.testing.assert_allclose(points, expected, atol=1e-4)
    assert faces[0, 14] == pytest.approx(np.sqrt(1.0 * 0.81))
    # under a looser overlap threshold both faces stay, highest score first
    both = decode_yunet(one_cell_outputs(64, 64), 64, 64, score_threshold=0.7, nms_threshold=0.95)
    assert len(both) == 2 and both[0, 14] > both[1, 14]
    # above both scores: nothing
    assert decode_yunet(one_cell_outputs(64, 64), 64, 64, 0.95, 0.3).shape == (0, 15)


def test_engine_choice_default_environment_fallback_and_errors(monkeypatch):
    require(YUNET)
    monkeypatch.delenv(yunet.ENGINE_ENV, raising=False)
    assert YuNetDetector(YUNET).engine == "onnxruntime"
    monkeypatch.setenv(yunet.ENGINE_ENV, "opencv")
    assert YuNetDetector(YUNET).engine == "opencv"
    assert YuNetDetector(YUNET, engine="onnxruntime").engine == "onnxruntime"  # the argument wins
    monkeypatch.delenv(yunet.ENGINE_ENV)
    monkeypatch.setattr(yunet, "onnxruntime_available", lambda: False)
    assert YuNetDetector(YUNET).engine == "opencv"  # no ONNX Runtime installed: OpenCV
    with pytest.raises(DetectorUnavailableError, match="needs ONNX Runtime: pip install onnxruntime"):
        YuNetDetector(YUNET, engine="onnxruntime")
    with pytest.raises(ValueError, match="unknown YuNet engine 'tensorrt'"):
        yunet_engine(YUNET, engine="tensorrt")


@pytest.mark.parametrize("engine", ["onnxruntime", "opencv"])
def test_a_file_that_is_not_yunet_is_refused_by_name(tmp_path, engine, monkeypatch):
    bad = tmp_path / "detector.onnx"
    bad.write_bytes(b"not an ONNX model")
    with pytest.raises(DetectorUnavailableError, match=r"detector\.onnx is not a YuNet face detector model"):
        YuNetDetector(bad, engine=engine)
    monkeypatch.setenv(yunet.ENGINE_ENV, "tensorrt")
    with pytest.raises(DetectorUnavailableError, match="unknown YuNet engine 'tensorrt'"):
        YuNetDetector(require(YUNET))


def test_a_failed_download_is_tried_once_a_while_not_at_every_ask(tmp_path, monkeypatch):
    """Offline, each try can wait for the timeout; one command asks several times."""
    import urllib.error

    from age_detect_resnet.faces import detection

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(detection.YUNET_ENV, raising=False)
    monkeypatch.setattr(detection, "bundled_yunet_path", lambda: None)
    monkeypatch.setattr(detection, "_yunet_download_failure", None)
    tries = []

    def offline(url, timeout):
        tries.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(detection.urllib.request, "urlopen", offline)
    clock = [1000.0]
    monkeypatch.setattr(detection.time, "monotonic", lambda: clock[0])
    for _ in range(3):
        with pytest.raises(
            DetectorUnavailableError, match=r"could not download .*no network.*--detector-model"
        ):
            detection.resolve_yunet_model()
    assert len(tries) == 1
    clock[0] += detection.YUNET_RETRY_AFTER_S + 1
    with pytest.raises(DetectorUnavailableError):
        detection.resolve_yunet_model()
    assert len(tries) == 2


def test_a_detector_file_given_that_is_missing_is_an_error_not_a_switch_to_haar(tmp_path):
    from age_detect_resnet.faces.detection import create_detector

    with pytest.raises(DetectorUnavailableError, match=r"nofile\.onnx does not exist"):
        create_detector("auto", tmp_path / "nofile.onnx")  # --detector-model: it fell back to Haar
