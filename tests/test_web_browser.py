"""The web page in a real headless browser: Debian's Chromium driven by Playwright against a real
uvicorn server. Playwright's own browser downloads are never used (`executable_path`)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.web.app import create_app
from conftest import TEST_IMAGES, YUNET, require
from test_web import grey_png

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium's synthetic camera, with the permission prompt answered "allow".
FAKE_CAMERA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
LIMIT = 2 * 1024 * 1024
TIMEOUT_MS = 60_000  # the CPU may be shared with a training run

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server_url(tiny_run: Path) -> Iterator[str]:
    """A real uvicorn server (in a thread, on a port the OS picked) around the tiny model."""
    predictor = AgePredictor(load_trained_model(tiny_run), detector=create_detector("yunet", require(YUNET)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(predictor, max_upload_bytes=LIMIT), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the uvicorn server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)
    sock.close()


def open_page(playwright, url: str, *extra_args: str):
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args])
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return browser, page


def pixel(page, x: int, y: int) -> list[int]:
    """The RGBA value of the result canvas at (x, y)."""
    context = "document.getElementById('canvas').getContext('2d')"
    return page.evaluate(f"([x, y]) => Array.from({context}.getImageData(x, y, 1, 1).data)", [x, y])


def test_uploaded_photo_is_drawn_with_its_face_boxed_and_aged(server_url):
    photo = require(TEST_IMAGES / "obama.jpg")
    expected = httpx.post(
        server_url + "api/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=60
    )
    [face] = expected.json()["faces"]
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, server_url)
        try:
            assert not page.locator("#camera-button").is_visible()  # headless Chromium has no camera
            page.set_input_files("#file", str(photo))
            item = page.locator("#faces li")
            item.first.wait_for()
            status, text = page.locator("#status").inner_text(), item.first.inner_text()
            size = page.evaluate("() => ['width', 'height'].map((k) => document.getElementById('canvas')[k])")
            middle_of_top_edge = pixel(page, (face["x1"] + face["x2"]) // 2, face["y1"])
            inside_the_face = pixel(page, (face["x1"] + face["x2"]) // 2, (face["y1"] + face["y2"]) // 2)
        finally:
            browser.close()
    assert shown_age(text) == round(face["age"]) and status == "1 face found."
    assert size == [expected.json()["image"]["width"], expected.json()["image"]["height"]]
    red, green, blue, _ = middle_of_top_edge
    assert red > 230 and 180 < green < 225 and blue < 40, (
        f"no yellow box edge at the face: {middle_of_top_edge}"
    )
    assert inside_the_face[:3] != middle_of_top_edge[:3]  # the photo itself is drawn under the box


def shown_age(text: str) -> int:
    """The age the results list shows ("32 years — face 1 at ...")."""
    match = re.match(r"(\d+)( \(\d+-\d+\))? years", text)
    assert match, f"the results list shows no age: {text!r}"
    return int(match.group(1))


def test_page_explains_bad_uploads(server_url):
    bad = [
        ({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}, "Not a usable image"),
        ({"name": "grey.png", "mimeType": "image/png", "buffer": grey_png()}, "No face found"),
        ({"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff" * (LIMIT + 1)}, "Too large"),
        ({"name": "empty.jpg", "mimeType": "image/jpeg", "buffer": b""}, "empty (0 bytes)"),
    ]
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, server_url)
        try:
            for upload, message in bad:
                page.set_input_files("#file", files=[upload])
                sync_api.expect(page.locator("#status.error")).to_contain_text(message, timeout=TIMEOUT_MS)
                assert page.locator("#faces li").count() == 0
        finally:
            browser.close()


def test_camera_snapshot_is_sent_and_answered(server_url):
    """With Chromium's synthetic camera (a test pattern, no face) the button appears, the snapshot is
    posted and decoded by the server (no 415), and its answer is shown."""
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, server_url, *FAKE_CAMERA_ARGS)
        try:
            page.locator("#camera-button").click()
            page.wait_for_function("() => document.getElementById('video').videoWidth > 0")
            with page.expect_response("**/api/predict") as response_info:
                page.locator("#snap-button").click()
            # Not just "face": "Looking for faces…" is shown while the request is in flight.
            answered = re.compile(r"^(No face found|\d+ faces? found)")
            sync_api.expect(page.locator("#status")).to_contain_text(answered, timeout=TIMEOUT_MS)
            status = page.locator("#status").inner_text()
            answer = response_info.value
        finally:
            browser.close()
    assert answer.status in (200, 422), f"the snapshot was refused: {answer.status}"
    assert status.startswith("No face found" if answer.status == 422 else "1 face found"), status
