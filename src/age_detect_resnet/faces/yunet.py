"""Where the YuNet face detector's network runs: ONNX Runtime (default where it is installed) or OpenCV's
`cv2.FaceDetectorYN`, behind one call (`YuNetEngine`).

    engine = yunet_engine("face_detection_yunet.onnx")     # "auto": ONNX Runtime, else OpenCV
    rows = engine(bgr)   # uint8 (H, W, 3) BGR -> float32 (N, 15): x, y, w, h, 5 landmarks (x, y), score

Both run the same ONNX file and decode its outputs the same way, so they find the same faces with the
same landmarks (within float rounding; tests/test_yunet.py compares them on real photos). With ONNX
Runtime, detection alone (a first look and the second looks) takes 28.6 ms per photo on one core against
49.5 with OpenCV's DNN module, and the bundle's end-to-end run gives 32.0 photos/s against 23.1 (the 240
shared portraits, 2 Xeon cores, benchmarks/bench_photos.py). A new runtime for YuNet is a class here and a
branch in `resolve_engine` and `yunet_engine`.

The decoding (the network's per-stride outputs to faces) follows OpenCV's FaceDetectorYN, which defines
YuNet's output format: the image, padded with zeros on the right and bottom to a multiple of 32, goes
in as float BGR 0-255 without normalisation; at each stride s of 8, 16 and 32 and each grid cell (row r,
column c) the score is sqrt(clamp(cls) * clamp(obj)), the box centre is ((c + dx) s, (r + dy) s), its size
(exp(dw) s, exp(dh) s), each landmark ((c + kx) s, (r + ky) s); faces at or above the score threshold are
then thinned by OpenCV's own non-maximum suppression on their integer boxes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from age_detect_resnet.runtime import onnx_session

ENGINES = ("auto", "onnxruntime", "opencv")
ENGINE_ENV = "AGE_DETECT_YUNET_ENGINE"
STRIDES = (8, 16, 32)
PAD_DIVISOR = 32
TOP_K = 100


class YuNetEngine(Protocol):
    name: str

    def __call__(self, bgr: np.ndarray) -> np.ndarray: ...

    def clone(self) -> YuNetEngine:
        """An engine with the same model and thresholds that may run at the same time in another thread."""
        ...


class OpenCVYuNet:
    """YuNet through `cv2.FaceDetectorYN` (OpenCV's DNN module). One OpenCV detector cannot run in two
    threads at once (it crashed the process), so each call holds the instance's lock: threads that share
    one instance take turns, and `clone` makes another that runs beside it."""

    name = "opencv"

    def __init__(self, model_path: Path, score_threshold: float, nms_threshold: float) -> None:
        self.model_path, self.score_threshold, self.nms_threshold = model_path, score_threshold, nms_threshold
        self._detector = cv2.FaceDetectorYN.create(
            str(model_path), "", (320, 320), score_threshold, nms_threshold, TOP_K
        )
        self._lock = threading.Lock()

    def clone(self) -> OpenCVYuNet:
        return OpenCVYuNet(self.model_path, self.score_threshold, self.nms_threshold)

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        with self._lock:
            self._detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._detector.detect(bgr)
        return np.zeros((0, 15), np.float32) if rows is None else rows


class OnnxRuntimeYuNet:
    """YuNet on ONNX Runtime, one intra-op thread per call: photos are searched several at a time in
    threads (AgePredictor.all_face_inputs), and one session is safe to call from all of them, so clones
    share it."""

    name = "onnxruntime"

    def __init__(
        self, model_path: Path, score_threshold: float, nms_threshold: float, *, session: Any = None
    ) -> None:
        self.model_path, self.score_threshold, self.nms_threshold = model_path, score_threshold, nms_threshold
        if session is None:
            session = onnx_session(
                model_path, threads=1, inter_op_threads=1, providers=["CPUExecutionProvider"]
            )
        self._session = session
        self._input = session.get_inputs()[0].name
        names = [f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in STRIDES]
        missing = set(names) - {output.name for output in session.get_outputs()}
        if missing:
            raise ValueError(f"{model_path} is not a YuNet model: it has no outputs {sorted(missing)}")
        self._outputs = names

    def clone(self) -> OnnxRuntimeYuNet:
        return OnnxRuntimeYuNet(
            self.model_path, self.score_threshold, self.nms_threshold, session=self._session
        )

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        height, width = bgr.shape[:2]
        pad_h, pad_w = (-(-height // PAD_DIVISOR) * PAD_DIVISOR, -(-width // PAD_DIVISOR) * PAD_DIVISOR)
        blob = np.zeros((1, 3, pad_h, pad_w), np.float32)
        blob[0, :, :height, :width] = bgr.transpose(2, 0, 1)
        outputs = dict(zip(self._outputs, self._session.run(self._outputs, {self._input: blob}), strict=True))
        return decode_yunet(outputs, pad_w, pad_h, self.score_threshold, self.nms_threshold)


def decode_yunet(
    outputs: dict[str, np.ndarray], pad_w: int, pad_h: int, score_threshold: float, nms_threshold: float
) -> np.ndarray:
    """YuNet's outputs for an input padded to `pad_w` x `pad_h` -> (N, 15) faces after non-maximum
    suppression, highest score first (see the module docstring)."""
    found = []
    for stride in STRIDES:
        cols = pad_w // stride
        cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        keep = np.flatnonzero(score >= score_threshold)
        if keep.size == 0:
            continue
        grid = np.stack([keep % cols, keep // cols], axis=1).astype(np.float32)  # (c, r) per kept cell
        bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)[keep]
        centre = (grid + bbox[:, :2]) * stride
        size = np.exp(bbox[:, 2:]) * stride
        points = (outputs[f"kps_{stride}"].reshape(-1, 5, 2)[keep] + grid[:, None, :]) * stride
        found.append(
            np.concatenate([centre - size / 2, size, points.reshape(-1, 10), score[keep, None]], axis=1)
        )
    if not found:
        return np.zeros((0, 15), np.float32)
    faces = np.concatenate(found).astype(np.float32)
    if len(faces) == 1:
        return faces
    boxes = np.trunc(faces[:, :4]).astype(np.int64).tolist()  # OpenCV suppresses on integer boxes
    kept = cv2.dnn.NMSBoxes(boxes, faces[:, 14].tolist(), score_threshold, nms_threshold, top_k=TOP_K)
    return faces[np.asarray(kept, dtype=np.int64).reshape(-1)]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str | None = None) -> str:
    """`onnxruntime` or `opencv`: `engine`, else $AGE_DETECT_YUNET_ENGINE, else `auto` (ONNX Runtime where
    it is installed, else OpenCV). ValueError for any other name, and for onnxruntime where it is not
    installed."""
    engine = engine or os.environ.get(ENGINE_ENV) or "auto"
    if engine not in ENGINES:
        raise ValueError(
            f"unknown YuNet engine {engine!r} (argument or ${ENGINE_ENV}); use one of {', '.join(ENGINES)}"
        )
    if engine == "auto":
        return "onnxruntime" if onnxruntime_available() else "opencv"
    if engine == "onnxruntime" and not onnxruntime_available():
        raise ValueError(
            "the YuNet engine onnxruntime needs ONNX Runtime: pip install onnxruntime, or use opencv"
        )
    return engine


def yunet_engine(
    model_path: Path | str,
    *,
    engine: str | None = None,
    score_threshold: float = 0.7,
    nms_threshold: float = 0.3,
) -> YuNetEngine:
    """The YuNet network in `model_path` on `engine` (see `resolve_engine`)."""
    kind = OnnxRuntimeYuNet if resolve_engine(engine) == "onnxruntime" else OpenCVYuNet
    return kind(Path(model_path), score_threshold, nms_threshold)
