"""The web page in a real headless browser: Debian's Chromium driven by Playwright against a real
uvicorn server. Playwright's own browser downloads are never used (`executable_path`)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.web.app import create_app
from conftest import TEST_IMAGES, YUNET, require
from test_web import FRAME_AGES, grey_png, live_app

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


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """`app` in a real uvicorn server (in a thread, on a port the OS picked); yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the uvicorn server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(tiny_run: Path) -> Iterator[str]:
    """The app around the tiny model."""
    predictor = AgePredictor(load_trained_model(tiny_run), detector=create_detector("yunet", require(YUNET)))
    with serve(create_app(predictor, max_upload_bytes=LIMIT)) as url:
        yield url


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


def write_y4m(photo: Path, out: Path, *, width: int = 480, frames: int = 10) -> Path:
    """A short Y4M clip (what Chromium's fake camera plays, in a loop) of `photo` at `width` px,
    moving right by 2 px a frame: planar YUV 4:2:0 with full-range (JPEG) BT.601 colours."""
    with Image.open(photo) as image:
        height = round(image.height * width / image.width) // 2 * 2
        still = image.convert("RGB").resize((width, height))
    with out.open("wb") as file:
        file.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            shift = 2 * index
            frame = still.crop((-shift, 0, width - shift, height)).convert("YCbCr")
            y, cb, cr = (np.asarray(channel) for channel in frame.split())
            # 4:2:0: each chroma sample is the mean of a 2x2 block.
            halves = [
                c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8)
                for c in (cb, cr)
            ]
            file.write(b"FRAME\n" + y.tobytes() + halves[0].tobytes() + halves[1].tobytes())
    return out


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    """The app around the YuNet detector and a stand-in model giving FRAME_AGES in turn, with the
    default live camera limits (4 frames/s)."""
    with serve(live_app([], live_fps=4)) as url:
        yield url


def live_faces(page) -> list[dict]:
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('#live-faces li'), (li) => ({
            track: li.dataset.trackId, steady: Number(li.dataset.steadyAge),
            box: li.dataset.box.split(',').map(Number), text: li.innerText}))"""
    )


def overlay_pixel(page, x: int, y: int) -> list[int]:
    context = "document.getElementById('live-overlay').getContext('2d')"
    return page.evaluate(f"([x, y]) => Array.from({context}.getImageData(x, y, 1, 1).data)", [x, y])


def test_live_camera_boxes_the_face_with_a_steady_age_and_stops_cleanly(live_url, tmp_path):
    """Chromium's fake camera plays a clip of a real photo: the page sends frames at the server's rate,
    one at a time, and shows one track whose steady age is the median of the model's ages; stopping
    ends the camera's stream."""
    clip = write_y4m(require(TEST_IMAGES / "obama.jpg"), tmp_path / "face.y4m")
    answers: list[tuple[float, int]] = []
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(
            playwright, live_url, *FAKE_CAMERA_ARGS, f"--use-file-for-fake-video-capture={clip}"
        )
        try:
            page.on(
                "response",
                lambda r: answers.append((time.monotonic(), r.status)) if "/api/track" in r.url else None,
            )
            page.locator("#live-button").click()
            # Three frames of the same track: the steady age is then the median of 40, 42 and 90.
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('#live-faces li'))"
                ".some((li) => li.innerText.includes('seen in 3 frames'))"
            )
            [face] = live_faces(page)
            x1, y1, x2, y2 = face["box"]
            box_edge = overlay_pixel(page, (x1 + x2) // 2, y1)
            inside = overlay_pixel(page, (x1 + x2) // 2, (y1 + y2) // 2)
            overlay_size = page.evaluate("() => [document.getElementById('live-overlay').width]")
            page.evaluate("() => { window.liveStream = document.getElementById('live-video').srcObject; }")
            page.locator("#live-button").click()
            stopped = page.evaluate(
                """() => ({ended: window.liveStream.getTracks().every((t) => t.readyState === 'ended'),
                          video: document.getElementById('live-video').srcObject,
                          faces: document.querySelectorAll('#live-faces li').length,
                          button: document.getElementById('live-button').innerText})"""
            )
            sent_before_stop = len(answers)
            page.wait_for_timeout(800)
        finally:
            browser.close()
    assert face["track"] == "1" and face["steady"] == sorted(FRAME_AGES[:3])[1]
    label = re.match(r"42 \((\d+)-(\d+)\) years \u2014 person 1, seen in 3 frames", face["text"])
    assert label and int(label.group(1)) < 42 < int(label.group(2)), face["text"]
    assert overlay_size == [480] and 0 <= x1 < x2 <= 480
    assert box_edge[0] > 230 and 180 < box_edge[1] < 225 and box_edge[2] < 40, box_edge
    assert inside[3] == 0  # the overlay is transparent over the face: the video shows through
    assert stopped == {"ended": True, "video": None, "faces": 0, "button": "Start live camera"}
    assert len(answers) == sent_before_stop  # no frame sent after the stop
    statuses = [status for _, status in answers]
    assert statuses.count(200) >= 3 and 429 not in statuses, statuses  # the page keeps to the rate
    span = answers[-1][0] - answers[0][0]
    assert len(answers) <= 4 * span + 2, f"{len(answers)} frames in {span:.2f} s"


def test_live_camera_explains_a_missing_camera(live_url):
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, live_url)  # no fake devices: headless Chromium has no camera
        try:
            page.locator("#live-button").click()
            sync_api.expect(page.locator("#status.error")).to_contain_text("No camera was found")
            running = page.locator("#live-button").get_attribute("aria-pressed")
        finally:
            browser.close()
    assert running == "false"


def test_live_camera_explains_a_denied_camera(live_url):
    with sync_api.sync_playwright() as playwright:
        # A camera, but nobody to say "allow": Playwright answers the permission prompt "deny".
        browser, page = open_page(playwright, live_url, "--use-fake-device-for-media-stream")
        try:
            page.locator("#live-button").click()
            sync_api.expect(page.locator("#status.error")).to_contain_text("Camera access was denied")
        finally:
            browser.close()
