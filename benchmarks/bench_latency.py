"""Single-photo latency once the model is loaded: read the photo, detect the face, crop it with the
model's margins, resize, run the model. Median and 90th percentile over repeats on ../shared/test_images.

    python benchmarks/bench_latency.py                          # ResNet-50 at 224 px, 10 repeats per photo
    python benchmarks/bench_latency.py --model runs/NAME --repeats 30

Paths (same detector, same crop, same weights):
* seed: the crop through Resize, ToTensor, Normalize, then eager fp32 under `torch.no_grad()`;
* project: `AgePredictor` with its `TorchRunner` (uint8, channels_last, bf16 where the CPU has it,
  inference_mode);
* onnx: `AgePredictor` from `load_predictor(backend="onnx")` (ONNX Runtime, float32), exported on the fly;
* detection alone, to show how much of each figure is the model.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch
from common import (
    TEST_IMAGES,
    YUNET,
    add_model_arguments,
    benchmark_model,
    machine,
    median,
    percentile,
    print_table,
    seed_forward,
    seed_transform,
    time_calls,
)

from age_detect_resnet.export.exporter import export_model
from age_detect_resnet.faces.detection import create_detector, crop_face, margins_of
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.predictor import AgePredictor, load_predictor
from age_detect_resnet.runtime import resolve_precision

SEED = "seed: fp32 NCHW eager"


def age_difference(found: list[list[float]] | None, reference: list[list[float]]) -> str:
    """Largest age difference over the faces of all photos (a path that found other faces is flagged)."""
    if found is None:
        return ""
    if [len(faces) for faces in found] != [len(faces) for faces in reference]:
        return "different faces found"
    pairs = [
        (a, b)
        for faces, expected in zip(found, reference, strict=True)
        for a, b in zip(faces, expected, strict=True)
    ]
    return f"{max(abs(a - b) for a, b in pairs):.3f}" if pairs else "no face found"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10, help="timed predictions per photo and path")
    parser.add_argument("--photos", type=Path, default=TEST_IMAGES, help="folder of photos with faces")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    args = parser.parse_args()

    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise SystemExit(f"no photos in {args.photos}")
    model = benchmark_model(args)
    size = int(model.metadata["image_size"])
    detector = create_detector("yunet", YUNET) if YUNET.is_file() else create_detector("auto")
    margins, transform = margins_of(model.metadata), seed_transform(size)

    def seed_predict(photo: Path) -> list[float]:
        image = load_rgb(photo)
        crops = [crop_face(image, face, margins)[0] for face in detector.detect(image)]
        if not crops:
            return []
        with torch.no_grad():
            return seed_forward(model, torch.stack([transform(crop) for crop in crops])).tolist()

    project = AgePredictor(model, detector=detector)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        export_model(model, onnx_file)
        onnx = load_predictor(onnx_file, backend="onnx", detector=detector, threads=args.threads)
        project_name = (
            f"project: {resolve_precision('auto', torch.device('cpu'))} + channels_last + inference_mode"
        )
        predictors = {
            SEED: seed_predict,
            project_name: lambda photo: [f.age for f in project.predict(photo)],
            "ONNX Runtime fp32": lambda photo: [f.age for f in onnx.predict(photo)],
        }
        timed = {
            **predictors,
            "detection alone (read + detect)": lambda photo: detector.detect(load_rgb(photo)),
        }
        ms = {
            name: [
                1000 * s for photo in photos for s in time_calls(partial(call, photo), repeats=args.repeats)
            ]
            for name, call in timed.items()
        }
        ages = {name: [predict(photo) for photo in photos] for name, predict in predictors.items()}

    rows = [
        [
            name,
            median(values),
            percentile(values, 90),
            f"{median(ms[SEED]) / median(values):.2f}x",
            age_difference(ages.get(name), ages[SEED]),
        ]
        for name, values in ms.items()
    ]
    settings = (
        f"{model.backbone_name}, {size} px, {len(photos)} photos x {args.repeats} repeats, one face each"
    )
    print_table(
        "Single-photo latency (bench_latency.py)",
        ["path", "median (ms)", "p90 (ms)", "vs seed (median)", "max abs age diff vs seed (years)"],
        rows,
        machine=machine(torch.device("cpu")),
        settings=settings,
    )


if __name__ == "__main__":
    main()
