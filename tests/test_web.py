"""The web service through FastAPI's TestClient: the page, the API's answers to good and bad uploads,
the busy answer, and the command's exit status when the model cannot be loaded."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image
from starlette.exceptions import StarletteDeprecationWarning

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.web.app import create_app, main
from conftest import TEST_IMAGES, YUNET, require

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient; the httpx it also supports is what we install.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

LIMIT = 2 * 1024 * 1024
FAKE_METADATA = {"image_size": 32, "model": {"backbone": "fake", "head": {"kind": "distribution"}}}


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    """The app around the tiny trained model with the YuNet detector and a 2 MB upload limit."""
    predictor = AgePredictor(load_trained_model(tiny_run), detector=create_detector("yunet", require(YUNET)))
    with TestClient(create_app(predictor, max_upload_bytes=LIMIT)) as test_client:
        yield test_client


def post(client: TestClient, name: str, data: bytes, field: str = "file"):
    return client.post("/api/predict", files={field: (name, data, "application/octet-stream")})


def photo(name: str = "obama.jpg") -> bytes:
    return require(TEST_IMAGES / name).read_bytes()


def grey_png(size: int = 300) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (what a decompression bomb looks like)."""
    data = bytearray(grey_png(1))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])  # depth, colour type, ...
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_page_offers_upload_form_and_camera_without_external_assets(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'id="upload-form"' in page and 'type="file"' in page and 'name="file"' in page
    assert "getUserMedia" in page and 'id="camera-button"' in page
    assert f'data-max-upload-bytes="{LIMIT}"' in page
    assert "http://" not in page and "https://" not in page  # the machine may be offline: nothing from a CDN
    assert client.get("/api/health").json() == {"status": "ok"}


def test_real_photo_gives_one_boxed_face_with_an_age(client):
    response = post(client, "obama.jpg", photo())
    assert response.status_code == 200, response.text
    body = response.json()
    with Image.open(TEST_IMAGES / "obama.jpg") as image:
        assert body["image"] == {"width": image.width, "height": image.height}
    [face] = body["faces"]
    assert 0 <= face["x1"] < face["x2"] <= body["image"]["width"]
    assert 0 <= face["y1"] < face["y2"] <= body["image"]["height"]
    assert face["detector_score"] > 0.5 and 0 < face["age"] < 120
    assert body["model"]["backbone"] == "mobilenet_v2" and body["model"]["detector"] == "yunet"


def test_upload_over_the_limit_is_refused_with_413(client):
    response = post(client, "huge.jpg", b"\xff" * (LIMIT + 1))
    assert response.status_code == 413 and "2 MB limit" in response.json()["detail"]


def test_endless_upload_without_content_length_is_cut_off_at_the_limit():
    """The size limit counts the bytes as they arrive: a body with no Content-Length that never ends
    is answered 413 after about the limit has been read, not after the disk or memory fills."""
    app = create_app(
        fake_predictor(lambda images: pytest.fail("an oversized upload reached the model")),
        max_upload_bytes=LIMIT,
    )
    chunk, received, sent = 64 * 1024, 0, []
    part_header = b'--x\r\nContent-Disposition: form-data; name="file"; filename="endless.jpg"\r\n\r\n'

    async def receive() -> dict:
        nonlocal received
        assert received < 4 * LIMIT, "the server kept reading far past the upload limit"
        body = part_header if received == 0 else b"\xff" * chunk
        received += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert received < LIMIT + 256 * 1024


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.txt", b"these are not the pixels you are looking for\n", "not an image"),
        ("empty.jpg", b"", "empty (0 bytes)"),
        ("cut.jpg", None, "truncated or corrupt"),
    ],
)
def test_unreadable_uploads_are_refused_with_415(client, name, data, message):
    """Text, zero-byte and truncated files are all "not a usable image": 415 naming the file."""
    data = photo()[:4000] if data is None else data
    response = post(client, name, data)
    assert response.status_code == 415
    assert message in response.json()["detail"] and name in response.json()["detail"]


@pytest.mark.parametrize(("width", "height"), [(8000, 7000), (20000, 20000)])
def test_images_over_the_pixel_limit_are_refused_with_413(client, width, height):
    """Over our 50 MP limit, and over PIL's own bomb limit (which PIL raises before ours is checked)."""
    response = post(client, "bomb.png", png_claiming(width, height))
    assert response.status_code == 413 and "MP" in response.json()["detail"]


def test_photo_without_a_face_is_422_with_a_clear_message(client):
    response = post(client, "grey.png", grey_png())
    assert response.status_code == 422 and response.json()["detail"].startswith("no face found in the photo")


def test_missing_file_field_is_422(client):
    assert post(client, "obama.jpg", photo(), field="photo").status_code == 422
    response = client.post("/api/predict", data={"comment": "no file"})
    assert response.status_code == 422 and "'file'" in response.json()["detail"]


def test_server_still_answers_after_bad_uploads(client):
    for name, data in [
        ("a.txt", b"text"),
        ("e.jpg", b""),
        ("huge.jpg", b"\0" * (LIMIT + 1)),
        ("g.png", grey_png()),
    ]:
        assert 400 <= post(client, name, data).status_code < 500
    first, again = post(client, "obama.jpg", photo()), post(client, "obama.jpg", photo())
    assert first.status_code == again.status_code == 200
    assert first.json()["faces"] == again.json()["faces"]


def fake_predictor(runner) -> AgePredictor:
    """A predictor without a detector (whole photo = one face) around a stand-in for the model."""
    return AgePredictor(runner=runner, metadata=FAKE_METADATA)


def test_whole_photo_and_interval_without_detection():
    def runner(images):
        count = len(images)
        return {"age": np.full(count, 41.0), "lower": np.full(count, 35.0), "upper": np.full(count, 48.0)}

    with TestClient(create_app(fake_predictor(runner))) as client:
        response = post(client, "grey.png", grey_png(200))
    assert response.status_code == 200
    [face] = response.json()["faces"]
    assert (face["x1"], face["y1"], face["x2"], face["y2"]) == (0, 0, 200, 200)
    assert (face["age"], face["age_low"], face["age_high"]) == (41.0, 35.0, 48.0)
    assert response.json()["model"]["detector"] is None


def test_busy_server_answers_503_and_stays_responsive():
    """With one prediction running and no queue, the next photo gets 503 + Retry-After at once, while
    the health check still answers (the model runs off the event loop)."""
    started, release = threading.Event(), threading.Event()

    def slow_runner(images):
        started.set()
        release.wait(30)
        return {"age": np.full(len(images), 30.0)}

    app = create_app(fake_predictor(slow_runner), max_concurrent=1, max_queue=0)
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, "grey.png", grey_png(64))
        try:
            assert started.wait(30)
            busy = post(client, "grey.png", grey_png(64))
            health = client.get("/api/health")
        finally:
            release.set()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert health.json() == {"status": "ok"}
        assert first.result(30).status_code == 200
        assert post(client, "grey.png", grey_png(64)).status_code == 200


def test_serve_exits_2_with_a_message_when_the_model_or_detector_cannot_be_loaded(tiny_run, tmp_path, caplog):
    assert main(["--model", str(tmp_path / "missing-run")]) == 2
    assert "missing-run does not exist" in caplog.text
    no_detector = ["--detector", "yunet", "--detector-model", str(tmp_path / "no.onnx")]
    assert main(["--model", str(tiny_run), *no_detector]) == 2
    assert "no.onnx does not exist" in caplog.text
