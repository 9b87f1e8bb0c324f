"""`age-detect serve`: a web page and a JSON API that give the age of every face in a photo.

    age-detect serve --model runs/utkface-resnet50-regression        # then open http://127.0.0.1:8000
    curl -F file=@photo.jpg http://127.0.0.1:8000/api/predict

POST /api/predict takes the photo in the multipart field `file` and answers
  200  {"faces": [{face_index, x1, y1, x2, y2, detector_score, age[, age_low, age_high][, landmarks]},
        ...], "image": {"width", "height"}, "model": {...}}; landmarks: {"right_eye": [x, y], "left_eye",
        "nose_tip", "mouth_right", "mouth_left"} in pixels (the person's own sides), where the detector
        gives them (YuNet; not the Haar cascade)
  413  the upload is over --max-upload-mb, or the image is over the decoder's pixel limit
  415  the file is not an image this server can read: text, truncated, unknown format, or empty (0 bytes)
  422  the field `file` is missing, or no face was found in the photo
  503  --max-concurrent photos are being predicted and --max-queue more are waiting (with Retry-After)
Every error body is {"detail": "a sentence for the user"}.

Memory stays bounded under load: a request is admitted (or refused with 503) before its body is read,
so at most max-concurrent + max-queue uploads of at most max-upload-mb are held, and only
max-concurrent photos are decoded at a time; the model runs in worker threads, so the page and the
health check keep answering while photos queue.

Live camera. The page's "Live camera" mode films with getUserMedia and sends a frame (a JPEG at most
640 px wide) every 1/--live-fps seconds, the next one only after the previous answer, to
POST /api/track?session=ID, where ID is chosen by the page (8-64 letters, digits, "-" or "_"; a new one
each time the camera is started) and the frame is the multipart field `file`, as for /api/predict.
Each session has its own FaceTracker (age_detect_resnet.video.tracking), so a person keeps a track id
and a steady age (the median over their frames) while they stay in view:
  200  {"faces": [{track_id, x1, y1, x2, y2, age, steady_age[, steady_low, steady_high], track_frames}],
        "image": {"width", "height"}, "session": {"id", "frames", "seconds"}}; no face is not an error here
  422  the session id is missing or malformed (and as for /api/predict: no multipart field `file`)
  429  (with Retry-After) the session's previous frame is still being answered, or this frame came
       sooner than 0.8/--live-fps seconds after the session's previous one: the frame is dropped, unread,
       and the client simply sends a later one; the 20% slack absorbs network jitter for a page that
       keeps to --live-fps
  503  --live-sessions cameras are each waiting for an answer, or the prediction queue is full
  413, 415 as for /api/predict; the upload and pixel limits, and the admission queue, are shared with it;
       a frame refused for its upload neither counts for the rate limit nor opens or keeps a session
Frame times are the server's clock at the frame's arrival (seconds since the session's first frame),
not a client timestamp: it cannot go backwards or be forged, and it is the clock the rate limit uses.
Work per client is bounded: one frame in flight and --live-fps frames per second per session, and at
most --live-sessions sessions; a session with no frame for 60 s is forgotten, and when all are taken a
new session replaces the least recently used one that is not waiting for an answer (that camera's next
frame starts afresh with new track ids).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from age_detect_resnet.faces.detection import Face, FaceDetector
from age_detect_resnet.images import MAX_IMAGE_PIXELS, ImageReadError, ImageTooLargeError, load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction
from age_detect_resnet.video.tracking import FaceTracker

log = logging.getLogger(__name__)

MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 10.0  # a 12 MP phone JPEG is 3-6 MB
# Multipart framing around the file (boundary lines, part headers): a body longer than the file limit
# plus this cannot carry an acceptable file, so reading stops there.
MULTIPART_OVERHEAD = 64 * 1024
# On a CPU two predictions at once already keep the cores busy; the queue absorbs bursts.
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 16
PAGE_PLACEHOLDER = "__MAX_UPLOAD_BYTES__"
LIVE_FPS_PLACEHOLDER = "__LIVE_FPS__"
DEFAULT_LIVE_FPS = 4.0  # enough for boxes that follow a face; each frame costs a full prediction
# A frame may reach the server up to 20% sooner than 1/fps after the previous one: the page keeps to
# the rate when it sends, and network delays vary from request to request.
FRAME_GAP_SLACK = 0.8
DEFAULT_LIVE_SESSIONS = 32
SESSION_IDLE_S = 60.0  # a page whose camera was stopped (or closed) frees its session after this
# The page sends a frame every 1/fps s, but a busy server answers later than that; two seconds keeps a
# person's track through a few slow answers, and is still short enough that someone else stepping in
# where they were later gets a new track.
LIVE_MAX_MISSED = 2.0
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
NO_FACE = (
    "no face found in the photo; use one where the face is large, sharp, lit from the front "
    "and turned to the camera"
)
UPLOAD_FIELD = "file"
# The body of POST /api/predict, for /openapi.json (the endpoint parses the stream itself).
PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {
                        UPLOAD_FIELD: {"type": "string", "format": "binary", "description": "the photo"}
                    },
                }
            }
        },
    }
}


TRACK_OPENAPI = {
    **PREDICT_OPENAPI,
    "parameters": [
        {
            "name": "session",
            "in": "query",
            "required": True,
            "description": "the camera's session id, chosen by the client: 8-64 of A-Z a-z 0-9 - _",
            "schema": {"type": "string", "pattern": SESSION_ID.pattern},
        }
    ],
}


class UploadTooLargeError(Exception):
    """The request body outgrew the upload limit while it was being read."""


class SerializedDetector:
    """A face detector that runs for one thread at a time: OpenCV's detectors keep per-call state
    (YuNet's input size), and concurrent predictions share the app's detector."""

    def __init__(self, detector: FaceDetector) -> None:
        self.detector = detector
        self.name = detector.name
        self._lock = threading.Lock()

    def detect(self, image: Image.Image) -> list[Face]:
        with self._lock:
            return self.detector.detect(image)


class PredictionGate:
    """Bounds what uploads can hold in memory: at most `max_concurrent + max_queue` requests are read
    and predicted at a time (later ones get 503 before their body is read), and of those at most
    `max_concurrent` run the model."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(
                f"max_concurrent must be >= 1 and max_queue >= 0, not {max_concurrent}, {max_queue}"
            )
        self.model_slots = anyio.Semaphore(max_concurrent)
        self._capacity = max_concurrent + max_queue
        self._admitted = 0  # requests between admission and answer; only touched on the event loop

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        if self._admitted >= self._capacity:
            raise HTTPException(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the server is busy with other photos; retry in a moment",
                headers={"Retry-After": "1"},
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1


@dataclass
class LiveSession:
    """One camera's state between frames: its tracker, and what the rate limit needs."""

    tracker: FaceTracker
    started: float  # server clock at the first frame
    last_frame: float  # server clock at the last frame let in
    busy: bool = False  # a frame is between arrival and answer
    frames: int = 0  # frames tracked


class LiveSessions:
    """The live cameras' trackers, keyed by the client's session id, with the work each may cause
    bounded: one frame at a time per session, frames at least `min_gap` seconds apart, at most
    `max_sessions` sessions (idle ones forgotten after `idle_s`, otherwise the least recently used one
    that is not busy gives way to a new one).

    Only touched on the event loop (the model runs in worker threads, the tracker does not), so it
    needs no lock; `clock` is the server's clock, also the time axis of every tracker.
    """

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_LIVE_SESSIONS,
        min_gap: float = FRAME_GAP_SLACK / DEFAULT_LIVE_FPS,
        idle_s: float = SESSION_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or min_gap < 0 or idle_s <= 0:
            raise ValueError(
                f"max_sessions must be >= 1, min_gap >= 0 and idle_s > 0, not {max_sessions}, "
                f"{min_gap}, {idle_s}"
            )
        self.max_sessions = max_sessions
        self.min_gap = min_gap
        self.idle_s = idle_s
        self.clock = clock
        self._sessions: OrderedDict[str, LiveSession] = OrderedDict()  # least recently used first
        self._opening: set[str] = set()  # new sessions whose first frame is not yet read as an image

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @contextlib.contextmanager
    def frame(self, session_id: str) -> Iterator[Callable[[], tuple[LiveSession, float]]]:
        """Let one frame of `session_id` in (or refuse it: 429, 503) and hold the session busy until
        the frame is answered; yields `admit`, to call once the upload was read as an image, which
        counts the frame (its time for the rate limit, the session's place, opened if new) and returns
        the session and the frame's time in seconds since its start. A frame refused for its upload
        (413, 415, 422) thus neither delays the camera's next frame nor takes a session's place."""
        now = self.clock()
        self._forget_idle(now)
        session = self._sessions.get(session_id)
        if (session is not None and session.busy) or session_id in self._opening:
            raise HTTPException(
                HTTPStatus.TOO_MANY_REQUESTS,
                "this camera's previous frame is still being answered; send the next frame after its answer",
                headers={"Retry-After": "1"},
            )
        if session is not None and now - session.last_frame < self.min_gap:
            raise HTTPException(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"frames of one camera must come at least {self.min_gap:.3g} s apart; this one was "
                "dropped, send a later one",
                headers={"Retry-After": str(max(1, math.ceil(self.min_gap)))},
            )
        if session is None:
            self._room()  # a full server refuses before the upload is read; admit() checks again
            self._opening.add(session_id)
        else:
            session.busy = True

        def admit() -> tuple[LiveSession, float]:
            nonlocal session
            if session is None:
                session = self._open(session_id, now)
                session.busy = True
                self._opening.discard(session_id)
            self._sessions.move_to_end(session_id)
            session.last_frame = now
            return session, now - session.started

        try:
            yield admit
        finally:
            self._opening.discard(session_id)
            if session is not None:
                session.busy = False

    def _forget_idle(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if not session.busy and now - session.last_frame > self.idle_s:
                del self._sessions[session_id]

    def _room(self) -> str | None:
        """None when a new session fits, else the least recently used session it replaces; 503 when
        every session is waiting for an answer."""
        if len(self._sessions) < self.max_sessions:
            return None
        victim = next((key for key, s in self._sessions.items() if not s.busy), None)
        if victim is None:
            raise HTTPException(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server is already following {self.max_sessions} live cameras; retry in a moment",
                headers={"Retry-After": "1"},
            )
        return victim

    def _open(self, session_id: str, now: float) -> LiveSession:
        victim = self._room()
        if victim is not None:
            log.info("live session %s replaced by %s: %d sessions at most", victim, session_id, len(self))
            del self._sessions[victim]
        session = LiveSession(FaceTracker(max_missed=LIVE_MAX_MISSED), started=now, last_frame=now)
        self._sessions[session_id] = session
        return session


def checked_session_id(value: str | None) -> str:
    """The query parameter `session`, or 422 saying what a valid one looks like."""
    if value is None or not SESSION_ID.fullmatch(value):
        shown = "no session id" if value is None else f"the session id {value[:80]!r} is not valid"
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"{shown}; pass ?session= with 8-64 letters, digits, '-' or '_' (the same for every frame "
            "of one camera)",
        )
    return value


def too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the upload is larger than the {max_bytes / MB:.3g} MB limit; send a smaller photo",
    )


async def capped(stream: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    """`stream`, raising UploadTooLargeError as soon as more than `cap` bytes arrived.

    The check counts what is read, so a missing or false Content-Length does not get past it; the
    server (uvicorn) discards the unread rest of the body and answers on the same connection.
    """
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > cap:
            raise UploadTooLargeError
        yield chunk


def display_name(filename: str | None) -> str:
    """The upload's file name for messages: no directories, bounded length."""
    name = Path(filename or "").name[:100]
    return name or "the uploaded file"


def check_upload_headers(request: Request, max_bytes: int) -> None:
    """Refuse what the headers already show: 413 for a declared body over the limit, 422 for a request
    that is not a multipart upload."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise too_large(max_bytes)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"send the photo as multipart/form-data in the field '{UPLOAD_FIELD}'",
        )


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and display name of the multipart field `file`; 413 as soon as the body outgrows
    `max_bytes`, 422 when the field is missing, 400 when the client hangs up halfway."""
    cap = max_bytes + MULTIPART_OVERHEAD
    parser = MultiPartParser(request.headers, capped(request.stream(), cap), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except ClientDisconnect:
        raise HTTPException(HTTPStatus.BAD_REQUEST, "the upload was interrupted") from None
    except UploadTooLargeError:
        raise too_large(max_bytes) from None
    except MultiPartException as err:
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"the upload is not valid multipart/form-data ({err})"
        ) from None
    try:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"the request has no file in the field '{UPLOAD_FIELD}'; attach the photo there",
            )
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large(max_bytes)
        return data, display_name(upload.filename)
    finally:
        await form.close()


def decode_photo(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The upload as an upright RGB image; 413 when it has too many pixels, 415 when it is not readable."""
    try:
        return load_rgb(data, name=name, max_pixels=max_pixels)
    except ImageTooLargeError as err:
        raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(err)) from None
    except ImageReadError as err:
        raise HTTPException(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(err)) from None


def predict_photo(
    predictor: AgePredictor, data: bytes, name: str, *, max_pixels: int
) -> tuple[list[FacePrediction], tuple[int, int]]:
    """Decode and predict one upload (blocking: runs in a worker thread); its faces and the image size."""
    image = decode_photo(data, name, max_pixels)
    return predictor.predict_image(image), image.size


def model_summary(predictor: AgePredictor) -> dict[str, Any]:
    """What the page shows about the model: architecture, training data, accuracy, detector."""
    metadata = predictor.metadata
    description = metadata.get("model") or {}
    head = description.get("head")
    val_mae = metadata.get("val_mae")
    return {
        "backbone": description.get("backbone"),
        "head": head.get("kind") if isinstance(head, dict) else head,
        "dataset": metadata.get("dataset"),
        "image_size": predictor.image_size,
        "val_mae": round(float(val_mae), 2) if val_mae is not None else None,
        "detector": predictor.detector.name if predictor.detector is not None else None,
    }


def index_page(max_upload_bytes: int, live_fps: float) -> str:
    page = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")
    return page.replace(PAGE_PLACEHOLDER, str(max_upload_bytes)).replace(
        LIVE_FPS_PLACEHOLDER, f"{live_fps:g}"
    )


def create_app(
    predictor: AgePredictor,
    *,
    max_upload_bytes: int = round(DEFAULT_MAX_UPLOAD_MB * MB),
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    live_fps: float = DEFAULT_LIVE_FPS,
    live_sessions: int = DEFAULT_LIVE_SESSIONS,
    session_idle_s: float = SESSION_IDLE_S,
) -> FastAPI:
    """The web app around `predictor`: GET / (the page), GET /api/health, POST /api/predict and
    POST /api/track (the live camera, `live_fps` frames per second per session at most)."""
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, not {max_upload_bytes}")
    if not live_fps > 0:
        raise ValueError(f"live_fps must be positive, not {live_fps}")
    predictor = copy.copy(predictor)  # the app's own handle, whose detector is safe to share between threads
    if predictor.detector is not None:
        predictor.detector = SerializedDetector(predictor.detector)
    gate = PredictionGate(max_concurrent, max_queue)
    sessions = LiveSessions(
        max_sessions=live_sessions, min_gap=FRAME_GAP_SLACK / live_fps, idle_s=session_idle_s
    )
    summary = model_summary(predictor)
    page = index_page(max_upload_bytes, live_fps)
    # The interactive docs load their scripts from a CDN, which an offline machine cannot reach.
    app = FastAPI(
        title="age-detect", summary="Age estimation from face photos", docs_url=None, redoc_url=None
    )

    # HEAD too: uptime monitors and load balancers probe with it, and a 405 reads as the service down.
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.api_route("/api/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/predict", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request) -> dict[str, Any]:
        check_upload_headers(request, max_upload_bytes)
        async with gate.admission():
            data, name = await read_upload(request, max_upload_bytes)
            async with gate.model_slots:
                faces, (width, height) = await run_in_threadpool(
                    predict_photo, predictor, data, name, max_pixels=max_image_pixels
                )
        if not faces:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, NO_FACE)
        return {
            "faces": [face.as_json() for face in faces],
            "image": {"width": width, "height": height},
            "model": summary,
        }

    @app.post("/api/track", openapi_extra=TRACK_OPENAPI)
    async def track(request: Request) -> dict[str, Any]:
        session_id = checked_session_id(request.query_params.get("session"))
        check_upload_headers(request, max_upload_bytes)
        # The session's refusals (429) come first: they cost nothing and take no place in the queue.
        with sessions.frame(session_id) as admit:
            async with gate.admission():
                data, name = await read_upload(request, max_upload_bytes)
                async with gate.model_slots:
                    image = await run_in_threadpool(decode_photo, data, name, max_image_pixels)
                    session, seconds = admit()  # only a frame read as an image counts
                    faces = await run_in_threadpool(predictor.predict_image, image)
                    width, height = image.size
            tracked = session.tracker.update(faces, seconds)
            session.frames += 1
        return {
            "faces": [face.as_dict() for face in tracked],
            "image": {"width": width, "height": height},
            "session": {"id": session_id, "frames": session.frames, "seconds": round(seconds, 3)},
        }

    return app


def run_server(app: FastAPI, *, host: str, port: int) -> None:
    """Serve `app` on host:port until Ctrl+C, uvicorn logging each request."""
    uvicorn.run(app, host=host, port=port, log_level="info")
