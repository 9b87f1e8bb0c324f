"""End-to-end throughput on real photos: read, detect, align, age, for a whole folder in one run.

    python benchmarks/bench_photos.py                       # the bundled model on the 240 shared portraits
    python benchmarks/bench_photos.py --model runs/NAME --photos FOLDER

Paths (same model, same YuNet detector, same photos):
* naive: one photo at a time through `AgePredictor.predict` with fp32 (a batch of one face per call),
  the model as trained (batch norms not folded);
* project (default): `age-detect predict`'s `predict_photos` (faces of 16 photos share a model batch,
  bf16 where the CPU has it, batch norms folded into the convolutions);
* project, batch norms not folded: the same with the model as trained (`TorchRunner(fold=False)`, the
  default before): what folding saves;
* project, YuNet on OpenCV: the same with YuNet's network run by OpenCV's DNN module (the engine before
  ONNX Runtime, faces/yunet.py; the same faces and landmarks): what ONNX Runtime saves;
* project, second look at small faces only: the same with YuNet's settings before every face got a
  second look at one size (faces.detection.SMALL_FACES_LOOK_SETTINGS): what that look costs;
* project, previous detector: the same with YuNet's older settings (faces searched for on a copy at
  most 1280 px long, regions for the second look at full resolution): what the smaller default copy and
  regions save.
`--precision fp32` runs the project paths in fp32, as `auto` does on CPUs without native bf16.
`--onnx MODEL` adds the project path with the age model on ONNX Runtime (`--backend onnx`; float32, or
int8 for an export made with `--quantize int8`), the same detector and batches; MODEL is what
`predict --backend onnx --model` takes: `default` (the bundle's export, made once into the user cache), a
run folder holding age_model.onnx, or an exported file.
All paths detect with YuNet at its default settings (faces.detection) on its default engine unless said
otherwise; crops are always cut from the full photo.
Photos/s is over the whole folder; the per-photo latency is each path's median over single photos
(`AgePredictor.predict`, one photo at a time). "mean |age diff|" compares each path's ages of the
largest face with the naive path's.
A second table times detection alone on each of YuNet's engines (faces/yunet.py), one thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED, YUNET, machine, median, print_table

from age_detect_resnet.cli.predict import expand_inputs, predict_photos
from age_detect_resnet.faces.detection import (
    PREVIOUS_YUNET_SETTINGS,
    SMALL_FACES_LOOK_SETTINGS,
    FaceDetector,
    YuNetDetector,
    create_detector,
    opencv_threads,
)
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.backends import TorchRunner, load_runner
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from age_detect_resnet.runtime import resolve_precision

PORTRAITS = SHARED / "data" / "real_photos" / "portraits"


def largest_age(faces) -> float | None:
    """The age of the largest face (a portrait's subject), or None where no face was found."""
    if not faces:
        return None
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).age


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="run folder, .safetensors or default (bundled)")
    parser.add_argument("--photos", type=Path, default=PORTRAITS)
    parser.add_argument(
        "--latency-photos", type=int, default=40, help="photos timed one at a time for the median latency"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the project paths' precision (auto: bf16 where the CPU has it natively, else fp32)",
    )
    parser.add_argument(
        "--onnx",
        help="the same model for --backend onnx (default: the bundle's export): adds that path",
    )
    args = parser.parse_args()
    photos, problems = expand_inputs([str(args.photos)])
    if not args.photos.exists() or problems or not photos:
        parser.error("; ".join(problems) or f"no photos in {args.photos}")
    model = load_trained_model(args.model, "cpu")
    kind, yunet = ("yunet", YUNET) if YUNET.is_file() else ("auto", None)
    detector = create_detector(kind, yunet)
    engine = f", YuNet on {detector.engine}" if hasattr(detector, "engine") else ""
    project_precision = resolve_precision(args.precision, torch.device("cpu"))  # auto: bf16 only where native

    def project(detector: FaceDetector, *, fold: bool = True) -> AgePredictor:
        runner = TorchRunner(model, precision=project_precision, fold=fold)
        return AgePredictor(runner=runner, metadata=model.metadata, detector=detector)

    naive = AgePredictor(
        runner=TorchRunner(model, precision="fp32", fold=False), metadata=model.metadata, detector=detector
    )
    variants = {
        "naive: one photo at a time, fp32": naive,
        f"project (default): predict_photos (shared batches, {project_precision})": project(detector),
        "project, batch norms not folded (before)": project(detector, fold=False),
    }
    if args.onnx is not None:
        runner, metadata = load_runner(args.onnx, backend="onnx")
        numbers = "int8" if metadata.get("quantize") == "int8" else "fp32"
        variants[f"project, age model on ONNX Runtime ({numbers}, --backend onnx)"] = AgePredictor(
            runner=runner, metadata=metadata, detector=detector
        )
    if yunet is not None:
        variants["project, YuNet on OpenCV's DNN module"] = project(YuNetDetector(yunet, engine="opencv"))
        variants["project, second look at small faces only (before)"] = project(
            YuNetDetector(yunet, **SMALL_FACES_LOOK_SETTINGS)
        )
        variants["project, previous detector (1280 px, full-resolution regions)"] = project(
            YuNetDetector(yunet, **PREVIOUS_YUNET_SETTINGS)
        )
    rows, seconds, ages = [], {}, {}
    for label, predictor in variants.items():
        predictor.predict(photos[0])  # warm-up (oneDNN kernels, detector)
        single = []
        for path in photos[: args.latency_photos]:
            start = time.perf_counter()
            predictor.predict(path)
            single.append(1000 * (time.perf_counter() - start))
        begin = time.perf_counter()
        if predictor is naive:
            results = [predictor.predict(path) for path in photos]
        else:
            results = [r.faces for r in predict_photos(predictor, photos, progress=False)]
        seconds[label] = time.perf_counter() - begin
        ages[label] = [largest_age(faces) for faces in results]
        rows.append([label, f"{len(photos) / seconds[label]:.1f}", f"{median(single):.1f}"])
    baseline = next(iter(variants))
    for row, label in zip(rows, variants, strict=True):
        pairs = zip(ages[label], ages[baseline], strict=True)
        diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
        row += [f"{seconds[baseline] / seconds[label]:.2f}x", f"{np.mean(diffs):.2f}" if diffs else "-"]
    faces = sum(age is not None for age in ages[baseline])
    print_table(
        "End-to-end photos (bench_photos.py)",
        ["path", "photos/s", "median ms per photo", "speed-up", "mean |age diff|"],
        rows,
        machine=machine(torch.device("cpu"), args.precision),
        settings=f"{model.backbone_name}, {model.metadata['image_size']} px, {len(photos)} photos from "
        f"{args.photos.name}, a face found in {faces}{engine}",
    )
    if yunet is not None:
        detection_table(yunet, photos, args.photos.name)


def detection_table(yunet: Path, photos: list[Path], folder: str) -> None:
    """Detection alone (YuNet's first look and its second looks, with the default settings), one photo at
    a time on one thread, per engine: what each costs of the photos/s above. Photos are decoded first."""
    images = [load_rgb(path) for path in photos]
    rows, seconds = [], {}
    for engine in ("opencv", "onnxruntime"):
        detector = YuNetDetector(yunet, engine=engine)
        with opencv_threads(1):
            detector.detect(images[0])  # warm-up
            begin = time.perf_counter()
            for image in images:
                detector.detect(image)
            seconds[engine] = time.perf_counter() - begin
        rows.append([engine, f"{1000 * seconds[engine] / len(images):.1f}"])
    for row in rows:
        row.append(f"{seconds['opencv'] / seconds[row[0]]:.2f}x")
    print_table(
        "Detection alone, one thread (bench_photos.py)",
        ["YuNet engine", "ms per photo", "speed-up"],
        rows,
        machine=machine(torch.device("cpu")),
        settings=f"YuNet, default settings, {len(images)} photos from {folder}, decoded beforehand",
    )


if __name__ == "__main__":
    main()
