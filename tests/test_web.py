"""The web service through FastAPI's TestClient: the page, the API's answers to good and bad uploads,
the busy answer, and the command's exit status when the model cannot be loaded."""

from __future__ import annotations

import io
import socket
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
from fastapi import HTTPException
from PIL import Image
from starlette.exceptions import StarletteDeprecationWarning

from age_detect_resnet.cli.serve import main
from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.web.app import LiveSessions, create_app
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
    assert 'id="live-button"' in page and 'id="live-overlay"' in page and 'data-live-fps="4"' in page
    assert f'data-max-upload-bytes="{LIMIT}"' in page
    assert "http://" not in page and "https://" not in page  # the machine may be offline: nothing from a CDN
    assert client.get("/api/health").json() == {"status": "ok"}
    for path in ("/", "/api/health"):  # as uptime monitors probe (was 405)
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"", path


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
    # YuNet's five landmarks by name, inside the box, the eyes above the mouth, as `predict`'s JSON
    (right_eye, left_eye, nose, mouth_right, mouth_left) = face["landmarks"].values()
    assert list(face["landmarks"]) == ["right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"]
    assert all(
        face["x1"] <= x <= face["x2"] and face["y1"] <= y <= face["y2"] for x, y in face["landmarks"].values()
    )
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(mouth_right[1], mouth_left[1])


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
    assert response.status_code == 413 and "over the 50 MP limit" in response.json()["detail"]
    assert "178956970" not in response.json()["detail"]  # PIL's own limit, which mixed in


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


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-upload-mb", "1e-9", "--max-upload-mb must be a finite number"),
        ("--max-upload-mb", "nan", "--max-upload-mb must be a finite number"),
        ("--max-upload-mb", "inf", "--max-upload-mb must be a finite number"),
        ("--live-fps", "inf", "--live-fps must be a finite number"),
        ("--live-fps", "1e-320", "--live-fps must be a finite number"),
        ("--port", "99999", "--port must be between 1 and 65535"),
        ("--port", "-5", "--port must be between 1 and 65535"),
    ],
)
def test_serve_refuses_limits_and_ports_it_cannot_use_with_usage_and_exit_2(option, value, message, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--model", "any-run", option, value])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_serve_exits_2_without_showing_a_url_when_the_port_is_taken(tiny_run, caplog, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["--model", str(tiny_run), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text
    assert "http://" not in capsys.readouterr().out


# --- the live camera: POST /api/track ---------------------------------------------------------------

# Per-frame ages the stand-in model gives, in order: the third frame is a wild one (a blurred, turned
# face), which the steady age (the median so far) must shrug off.
FRAME_AGES = [40.0, 42.0, 90.0, 41.0, 39.0]


def frame_jpeg(shift: int, width: int = 480) -> bytes:
    """The shared photo as the page sends a camera frame: a JPEG `width` px wide, moved right by
    `shift` px (the person moving a little between frames)."""
    with Image.open(require(TEST_IMAGES / "obama.jpg")) as image:
        small = image.convert("RGB").resize((width, round(image.height * width / image.width)))
    moved = small.crop((-shift, 0, small.width - shift, small.height))
    buffer = io.BytesIO()
    moved.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def scripted_runner(ages: list[float], calls: list[int]):
    """A stand-in model giving `ages` in turn (one per face), with an interval of -5/+6 years."""

    def runner(images):
        count = len(images)
        calls.append(count)
        start = sum(calls) - count
        age = np.asarray([ages[(start + i) % len(ages)] for i in range(count)])
        return {"age": age, "lower": age - 5, "upper": age + 6}

    return runner


def live_app(calls: list[int], **settings):
    """The app with the real YuNet detector around a scripted model; no frame rate limit unless given."""
    predictor = AgePredictor(
        runner=scripted_runner(FRAME_AGES, calls),
        metadata=FAKE_METADATA,
        detector=create_detector("yunet", require(YUNET)),
    )
    return create_app(predictor, max_upload_bytes=LIMIT, **{"live_fps": 1e6, **settings})


def track(client: TestClient, session: str | None, data: bytes, name: str = "frame.jpg"):
    params = {} if session is None else {"session": session}
    return client.post("/api/track", params=params, files={"file": (name, data, "image/jpeg")})


def test_frames_of_a_moving_face_keep_one_track_and_a_steady_age():
    calls: list[int] = []
    with TestClient(live_app(calls)) as client:
        answers = [track(client, "camera-one", frame_jpeg(shift)) for shift in (0, 6, 12, 18, 24)]
    assert [a.status_code for a in answers] == [200] * 5, answers[-1].text
    faces = [a.json()["faces"] for a in answers]
    assert all(len(f) == 1 for f in faces), faces
    faces = [f[0] for f in faces]
    assert {f["track_id"] for f in faces} == {1}
    assert [f["track_frames"] for f in faces] == [1, 2, 3, 4, 5]
    assert [f["age"] for f in faces] == FRAME_AGES
    # The median so far: the 90 of the third frame moves the steady age by at most a year.
    assert [f["steady_age"] for f in faces] == [40.0, 41.0, 42.0, 41.5, 41.0]
    assert faces[-1]["x1"] - faces[0]["x1"] in range(20, 29)  # the box follows the face
    assert faces[-1]["steady_low"] < faces[-1]["steady_age"] < faces[-1]["steady_high"]
    last = answers[-1].json()
    assert last["session"]["id"] == "camera-one" and last["session"]["frames"] == 5
    assert last["session"]["seconds"] > 0 and last["image"]["width"] == 480


def test_two_cameras_have_their_own_tracks():
    calls: list[int] = []
    with TestClient(live_app(calls)) as client:
        first = [track(client, "camera-one", frame_jpeg(0)) for _ in range(2)]
        other = track(client, "camera-two", frame_jpeg(0))
    assert first[-1].json()["faces"][0]["track_frames"] == 2
    assert other.json()["faces"][0]["track_frames"] == 1 and other.json()["session"]["frames"] == 1


def test_frame_without_a_face_is_answered_with_no_faces():
    """In live mode an empty view is normal (the person stepped away): 200 with no faces, not 422."""
    with TestClient(live_app([])) as client:
        response = track(client, "camera-one", grey_png(), name="grey.png")
    assert response.status_code == 200 and response.json()["faces"] == []


@pytest.mark.parametrize(
    ("session", "message"),
    [
        (None, "no session id"),
        ("short", "'short' is not valid"),
        ("spaces are not allowed", "is not valid"),
        ("x" * 65, "is not valid"),
        ("../../etc/passwd", "is not valid"),
    ],
)
def test_bad_session_ids_are_refused_with_422_before_the_model_runs(session, message):
    calls: list[int] = []
    with TestClient(live_app(calls)) as client:
        response = track(client, session, frame_jpeg(0))
    assert response.status_code == 422
    assert message in response.json()["detail"] and "?session=" in response.json()["detail"]
    assert calls == []


def test_bad_frames_are_refused_like_bad_uploads_and_the_session_goes_on():
    calls: list[int] = []
    with TestClient(live_app(calls)) as client:
        text = track(client, "camera-one", b"not a picture", name="frame.txt")
        cut = track(client, "camera-one", frame_jpeg(0)[:3000], name="cut.jpg")
        huge = track(client, "camera-one", b"\xff" * (LIMIT + 1))
        missing = client.post("/api/track", params={"session": "camera-one"}, data={"comment": "no file"})
        good = track(client, "camera-one", frame_jpeg(0))
    assert text.status_code == 415 and "frame.txt" in text.json()["detail"]
    assert cut.status_code == 415 and "truncated or corrupt" in cut.json()["detail"]
    assert huge.status_code == 413 and "2 MB limit" in huge.json()["detail"]
    assert missing.status_code == 422 and "'file'" in missing.json()["detail"]
    assert good.status_code == 200 and good.json()["faces"][0]["track_frames"] == 1


def test_a_camera_sending_too_fast_gets_429_and_its_frame_is_not_predicted():
    calls: list[int] = []
    with TestClient(live_app(calls, live_fps=0.5)) as client:  # frames at least 1.6 s apart
        first = track(client, "camera-one", frame_jpeg(0))
        again = track(client, "camera-one", frame_jpeg(0))
        other = track(client, "camera-two", frame_jpeg(0))  # the limit is per camera
    assert first.status_code == 200 and other.status_code == 200
    assert again.status_code == 429 and again.headers["retry-after"] == "2"
    assert "1.6 s apart" in again.json()["detail"]
    assert calls == [1, 1]


def test_a_frame_refused_for_its_upload_neither_delays_the_next_one_nor_takes_a_session():
    calls: list[int] = []
    with TestClient(live_app(calls, live_fps=0.5, live_sessions=1)) as client:  # 1.6 s apart
        text = track(client, "camera-one", b"not a picture", name="frame.txt")
        good = track(client, "camera-one", frame_jpeg(0))
        intruder = track(client, "camera-two", b"not a picture", name="frame.txt")
        again = track(client, "camera-one", frame_jpeg(0))
    assert text.status_code == 415 and intruder.status_code == 415
    assert good.status_code == 200, good.text
    assert again.status_code == 429  # camera-one kept its session (and its rate limit)
    assert calls == [1]


def test_beyond_the_session_cap_the_least_recently_used_camera_starts_afresh():
    with TestClient(live_app([], live_sessions=2)) as client:
        for session in ("camera-one", "camera-two", "camera-one", "camera-three"):
            assert track(client, session, frame_jpeg(0)).status_code == 200
        one, two = track(client, "camera-one", frame_jpeg(0)), track(client, "camera-two", frame_jpeg(0))
    assert one.json()["session"]["frames"] == 3  # used most recently before camera-three came: kept
    assert two.json()["session"]["frames"] == 1  # dropped for camera-three: a new session
    assert two.json()["faces"][0]["track_frames"] == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(sessions: LiveSessions, session_id: str) -> HTTPException:
    with pytest.raises(HTTPException) as refused, sessions.frame(session_id) as admit:
        admit()
        pytest.fail(f"the frame of {session_id} was let in")
    return refused.value


def test_sessions_idle_for_a_minute_are_forgotten_and_busy_ones_are_never_dropped():
    clock = FakeClock()
    sessions = LiveSessions(max_sessions=2, min_gap=0.2, idle_s=60, clock=clock)
    with sessions.frame("camera-one") as admit:
        assert admit()[1] == 0
        in_flight = refusal(sessions, "camera-one")
        assert in_flight.status_code == 429 and "still being answered" in in_flight.detail
        with sessions.frame("camera-two") as admit_two:
            admit_two()
            # Both sessions are waiting for an answer: a third camera cannot displace either.
            full = refusal(sessions, "camera-three")
    assert full.status_code == 503 and "2 live cameras" in full.detail
    assert "camera-three" not in sessions
    clock.now += 0.1
    too_soon = refusal(sessions, "camera-one")
    assert too_soon.status_code == 429 and too_soon.headers == {"Retry-After": "1"}
    clock.now += 29.9
    with sessions.frame("camera-one") as admit:
        assert admit()[1] == pytest.approx(30)  # the server's clock since the session's first frame
    clock.now += 45  # camera-two idle 75 s, camera-one 45 s
    with sessions.frame("camera-three") as admit:
        admit()
    assert "camera-two" not in sessions and "camera-one" in sessions and len(sessions) == 2
    clock.now += 61
    with sessions.frame("camera-four") as admit:
        admit()
    assert len(sessions) == 1 and "camera-four" in sessions
    with sessions.frame("camera-five"):
        pass  # its upload was not an image: not admitted
    assert "camera-five" not in sessions and len(sessions) == 1
