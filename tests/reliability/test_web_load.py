"""`age-detect serve` under load: the real command in a subprocess, hundreds of concurrent uploads on
loopback, good photos mixed with every kind of bad one. The server must stay up, answer every good photo
with the same age as when it is idle, refuse every bad one with its 4xx, stay reachable, and not grow in
memory. Bounded to well under a minute with the tiny model."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import TEST_IMAGES, YUNET, require

REQUESTS = 480
CONCURRENCY = 24
# The server's limits: 2 photos predicted at once, 8 waiting, so 24 clients also meet its 503s.
MAX_CONCURRENT, MAX_QUEUE = 2, 8
UPLOAD_LIMIT_MB = 1
MAX_RSS_GROWTH_MB = 150  # over the warm-up's high-water mark: the allocator alone swings ~100 MB
MAX_HEALTH_SECONDS = 5.0  # the page must stay reachable while photos queue (generous: shared 2-core CPU)
MAX_RETRIES = 60
# Connections closed under the client are retried, but more than a few would be a server fault.
MAX_DROPPED_FRACTION = 0.05
MB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc"
)


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    expected: int  # the status the server must answer (besides 503 while it is busy)
    field: str = "file"
    chunked: bool = False  # streamed without Content-Length, so only counting the bytes can stop it


def uploads() -> tuple[list[Upload], list[Upload]]:
    """Good photos, and one upload of each way a file can be wrong."""
    photos = [require(TEST_IMAGES / name) for name in ("obama.jpg", "obama2.jpg", "biden.jpg")]
    good = [Upload(path.name, path.read_bytes(), 200) for path in photos]
    jpeg, noise = good[0].data, random.Random(0).randbytes(int(1.5 * UPLOAD_LIMIT_MB * MB))
    grey = io.BytesIO()
    Image.new("RGB", (300, 300), (128, 128, 128)).save(grey, format="PNG")
    bad = [
        Upload("notes.txt", b"these are not the pixels you are looking for\n" * 40, 415),
        Upload("cut.jpg", jpeg[: len(jpeg) // 2], 415),
        Upload("empty.jpg", b"", 415),
        Upload("huge.jpg", noise, 413),
        Upload("huge-streamed.jpg", noise, 413, chunked=True),
        Upload("grey.png", grey.getvalue(), 422),
        Upload("obama.jpg", jpeg, 422, field="photo"),
    ]
    return good, bad


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def streamed_multipart(upload: Upload, boundary: str):
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{upload.field}"; filename="{upload.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    for start in range(0, len(upload.data), 64 * 1024):
        yield upload.data[start : start + 64 * 1024]
    yield f"\r\n--{boundary}--\r\n".encode()


async def send(client: httpx.AsyncClient, upload: Upload, counts: Counter) -> httpx.Response:
    """POST the upload as a patient client does: wait out 503s as their Retry-After says, and send again
    when a kept-alive connection was closed under it (the server's 5 s keep-alive timer can fire while
    this starved client is still using the connection)."""
    for _ in range(MAX_RETRIES):
        try:
            if upload.chunked:
                response = await client.post(
                    "/api/predict",
                    content=streamed_multipart(upload, "loadtest"),
                    headers={"content-type": "multipart/form-data; boundary=loadtest"},
                )
            else:
                response = await client.post("/api/predict", files={upload.field: (upload.name, upload.data)})
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            counts["dropped"] += 1
            continue
        if response.status_code != 503:
            return response
        counts["busy"] += 1
        await asyncio.sleep(float(response.headers["retry-after"]))
    raise AssertionError(
        f"{upload.name} got no answer but 503 or a dropped connection in {MAX_RETRIES} tries"
    )


async def hammer(client: httpx.AsyncClient, schedule: list[Upload], counts: Counter) -> list[httpx.Response]:
    """All of `schedule`, CONCURRENCY requests at a time."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(upload: Upload) -> httpx.Response:
        async with limit:
            return await send(client, upload, counts)

    return await asyncio.gather(*(one(upload) for upload in schedule))


async def watch(client: httpx.AsyncClient, pid: int, stop: asyncio.Event, rss: list, health: list) -> None:
    """Sample the server's memory and how long its health check takes, until `stop`."""
    while not stop.is_set():
        rss.append(rss_mb(pid))
        start = time.monotonic()
        assert (await client.get("/api/health")).json() == {"status": "ok"}
        health.append(time.monotonic() - start)
        await asyncio.sleep(0.2)


@dataclass
class LoadResult:
    schedule: list[Upload]
    responses: list[httpx.Response]
    references: dict[str, dict]  # photo name -> the answer to it alone on an idle server
    seconds: float
    busy_retries: int
    dropped_connections: int
    rss_warm_up_peak: float  # MB: the high-water mark the run is compared with
    rss_samples: list[float]
    health_seconds: list[float]


async def run_load(base_url: str, pid: int, good: list[Upload], bad: list[Upload]) -> LoadResult:
    schedule = [good[i % len(good)] if i % 2 else bad[i % len(bad)] for i in range(REQUESTS)]
    random.Random(0).shuffle(schedule)
    limits = httpx.Limits(max_connections=CONCURRENCY + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        references = {}
        for upload in good:
            references[upload.name] = (
                await client.post("/api/predict", files={"file": (upload.name, upload.data)})
            ).json()
        rss, health, stop = [], [], asyncio.Event()
        watcher = asyncio.create_task(watch(client, pid, stop, rss, health))
        await hammer(client, (good + bad) * 10, Counter())  # warm-up: threads, allocator pools, caches
        rss_warm_up_peak = max([*rss, rss_mb(pid)])
        rss.clear()
        counts = Counter()
        start = time.monotonic()
        responses = await hammer(client, schedule, counts)
        seconds = time.monotonic() - start
        stop.set()
        await watcher
        rss.append(rss_mb(pid))
    return LoadResult(
        schedule,
        responses,
        references,
        seconds,
        counts["busy"],
        counts["dropped"],
        rss_warm_up_peak,
        rss,
        health,
    )


@pytest.fixture
def server(tiny_run: Path, tmp_path: Path, unused_port: int):
    """`age-detect serve` in a subprocess; yields (base URL, process, log file)."""
    log_path = tmp_path / "serve.log"
    options = {
        "--model": tiny_run,
        "--port": unused_port,
        "--device": "cpu",
        "--detector": "yunet",
        "--detector-model": require(YUNET),
        "--max-upload-mb": UPLOAD_LIMIT_MB,
        "--max-concurrent": MAX_CONCURRENT,
        "--max-queue": MAX_QUEUE,
    }
    command = [
        sys.executable,
        "-m",
        "age_detect_resnet.cli",
        "serve",
        *(str(v) for kv in options.items() for v in kv),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(base_url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base_url, process, log_path
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def box(face: dict) -> tuple[int, int, int, int]:
    return face["x1"], face["y1"], face["x2"], face["y2"]


def test_server_under_concurrent_load_stays_correct_responsive_and_bounded(server):
    base_url, process, log_path = server
    good, bad = uploads()
    result = asyncio.run(run_load(base_url, process.pid, good, bad))

    assert process.poll() is None, f"the server died under load:\n{log_path.read_text()[-3000:]}"
    assert httpx.get(base_url + "/api/health", timeout=10).json() == {"status": "ok"}
    wrong = Counter()
    for upload, response in zip(result.schedule, result.responses, strict=True):
        if response.status_code != upload.expected:
            wrong[f"{upload.name}: {upload.expected} expected, {response.status_code} answered"] += 1
        elif upload.expected == 200:
            [face], [reference] = response.json()["faces"], result.references[upload.name]["faces"]
            assert box(face) == box(reference) and face["age"] == pytest.approx(reference["age"], abs=0.05)
        else:
            assert response.json()["detail"], "an error without a message for the user"
    assert not wrong, dict(wrong)

    growth = max(result.rss_samples) - result.rss_warm_up_peak
    print(
        f"\n{REQUESTS} requests in {result.seconds:.1f} s ({REQUESTS / result.seconds:.0f}/s); retried: "
        f"{result.busy_retries} busy answers, {result.dropped_connections} dropped connections; server RSS "
        f"peak {result.rss_warm_up_peak:.0f} MB in warm-up, {growth:+.0f} MB under load; slowest health "
        f"check {max(result.health_seconds):.2f} s"
    )
    assert growth < MAX_RSS_GROWTH_MB, f"server memory grew by {growth:.0f} MB under load"
    assert max(result.health_seconds) < MAX_HEALTH_SECONDS, "the server stopped answering while busy"
    assert result.dropped_connections <= MAX_DROPPED_FRACTION * REQUESTS, (
        "the server dropped many connections"
    )
