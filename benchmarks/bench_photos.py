"""End-to-end throughput on real photos: read, detect, align, age, for a whole folder in one run.

    python benchmarks/bench_photos.py                       # the bundled model on the 240 shared portraits
    python benchmarks/bench_photos.py --model runs/NAME --photos FOLDER

Paths (same model, same detector, same photos):
* naive: one photo at a time through `AgePredictor.predict` with fp32 (a batch of one face per call);
* project: `age-detect predict`'s `predict_photos` (faces of 16 photos share a model batch, bf16 where
  the CPU has it).
Photos/s is over the whole folder; the per-photo latency is the naive path's median.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import SHARED, YUNET, machine, median, print_table

from age_detect_resnet.cli.predict import expand_inputs, predict_photos
from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.backends import TorchRunner
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model

PORTRAITS = SHARED / "data" / "real_photos" / "portraits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="run folder, .safetensors or default (bundled)")
    parser.add_argument("--photos", type=Path, default=PORTRAITS)
    args = parser.parse_args()
    paths, _ = expand_inputs([str(args.photos)])
    if not paths:
        raise SystemExit(f"no photos in {args.photos}")
    model = load_trained_model(args.model, "cpu")
    detector = create_detector("yunet", YUNET) if YUNET.is_file() else create_detector("auto")
    naive = AgePredictor(
        runner=TorchRunner(model, precision="fp32"), metadata=model.metadata, detector=detector
    )
    project = AgePredictor(model, detector=detector)
    naive.predict(paths[0]), project.predict(paths[0])  # warm-up

    per_photo = []
    begin = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        naive.predict(path)
        per_photo.append(1000 * (time.perf_counter() - start))
    naive_s = time.perf_counter() - begin
    begin = time.perf_counter()
    results = list(predict_photos(project, paths, progress=False))
    project_s = time.perf_counter() - begin
    faces = sum(len(r.faces) for r in results)
    rows = [
        [
            "naive: one photo at a time, fp32",
            f"{len(paths) / naive_s:.1f}",
            f"{median(per_photo):.1f}",
            "1.00x",
        ],
        [
            "project: predict_photos (shared batches, bf16)",
            f"{len(paths) / project_s:.1f}",
            "",
            f"{naive_s / project_s:.2f}x",
        ],
    ]
    print_table(
        "End-to-end photos (bench_photos.py)",
        ["path", "photos/s", "median ms per photo", "speed-up"],
        rows,
        machine=machine(torch.device("cpu")),
        settings=f"{model.backbone_name}, {model.metadata['image_size']} px, {len(paths)} photos from "
        f"{args.photos.name}, {faces} faces found",
    )


if __name__ == "__main__":
    main()
