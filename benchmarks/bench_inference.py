"""Batch inference speed of one model's weights on every path the project offers, against the seed's:

* seed: normalised float32 NCHW input, eager fp32 under `torch.no_grad()`;
* project: `TorchRunner` (uint8 input, channels_last, bf16 autocast where the CPU has it, inference_mode);
* onnx: the model exported on the fly (`export_onnx`, float32) run by `OnnxRunner` (ONNX Runtime);
* int8 (with --int8): that ONNX model statically quantised (`quantize_int8`), calibrated on other
  crops (a run's validation faces).

    python benchmarks/bench_inference.py                           # ResNet-50, 224 px, 4 batches of 32
    python benchmarks/bench_inference.py --model runs/NAME --int8 --batches 20
    python benchmarks/bench_inference.py --threads 2

Inputs are real UTKFace crops held in memory (data loading: bench_data.py): with a trained --model whose
run's data is here, its test faces (never trained on), else crops spread over ../shared/data/utkface.
The table also gives each path's largest and mean age difference from the seed path (years) and each
path's MAE (meaningful only with a trained --model): int8 passes if it adds at most 0.1 years of MAE.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import (
    add_model_arguments,
    age_of,
    benchmark_model,
    machine,
    median,
    print_table,
    project_batch,
    seed_batch,
    seed_forward,
    time_calls,
    utkface_files,
)

from age_detect_resnet.export.graph import export_onnx
from age_detect_resnet.export.quantize import quantize_int8
from age_detect_resnet.export.verify import INT8_TOLERANCE_YEARS, run_split_images
from age_detect_resnet.inference.backends import OnnxRunner, TorchRunner
from age_detect_resnet.runtime import resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="distinct timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches (median kept)")
    parser.add_argument("--int8", action="store_true", help="also time the int8 ONNX model")
    parser.add_argument(
        "--calibration-images", type=int, default=256, help="--int8: face crops to calibrate on"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    args = parser.parse_args()

    model = benchmark_model(args)
    size = int(model.metadata["image_size"])
    count = args.batch_size * args.batches
    test = run_split_images(args.model, "test", limit=count) if args.model else {}
    if len(test) == count:  # the trained run's held-out faces; calibration on its validation faces
        files, ages = list(test), np.array(list(test.values()))
        calibration_files = list(run_split_images(args.model, "val", limit=args.calibration_images))
        faces = f"{args.model}'s test faces"
    else:
        files = utkface_files(count + (args.calibration_images if args.int8 else 0))
        files, calibration_files = files[:count], files[count:]
        ages = np.array([age_of(f) for f in files])
        faces = "UTKFace crops"
    normalised = seed_batch(files, size).split(args.batch_size)  # the seed's float32 inputs
    raw = project_batch(files, size).split(args.batch_size)  # the project's uint8 inputs
    device = torch.device("cpu")

    def run_seed() -> np.ndarray:
        with torch.no_grad():
            return torch.cat([seed_forward(model, x) for x in normalised]).numpy()

    torch_runner = TorchRunner(model, device)  # channels_last + autocast + inference_mode
    paths = {
        "seed: fp32 NCHW eager": run_seed,
        f"project: {resolve_precision('auto', device)} + channels_last + inference_mode": lambda: (
            np.concatenate([torch_runner(x)["age"] for x in raw])
        ),
    }
    if resolve_precision("auto", device) != "bf16":  # what auto avoids: bf16 without bf16 instructions
        bf16_runner = TorchRunner(model, device, precision="bf16")
        paths["project, bf16 forced (no native bf16 here)"] = lambda: np.concatenate(
            [bf16_runner(x)["age"] for x in raw]
        )
    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        export_onnx(model.float(), onnx_file)
        onnx_runner = OnnxRunner(onnx_file, threads=args.threads)
        paths["ONNX Runtime fp32"] = lambda: np.concatenate([onnx_runner(x)["age"] for x in raw])
        if args.int8:
            int8_file = Path(scratch) / "model-int8.onnx"
            quantize_int8(onnx_file, int8_file, project_batch(calibration_files, size).numpy())
            int8_runner = OnnxRunner(int8_file, threads=args.threads)
            paths["ONNX Runtime int8"] = lambda: np.concatenate([int8_runner(x)["age"] for x in raw])

        results = {}
        for name, run in paths.items():
            predicted = run()
            seconds = median(time_calls(run, repeats=args.repeats, warmup=0))
            results[name] = (count / seconds, predicted)

    reference_speed, reference_ages = results["seed: fp32 NCHW eager"]
    rows = []
    for name, (speed, predicted) in results.items():
        difference = np.abs(predicted.astype(np.float64) - reference_ages)
        rows.append(
            [
                name,
                speed,
                f"{speed / reference_speed:.2f}x",
                f"{difference.max():.4f}",
                f"{difference.mean():.4f}",
                float(np.abs(predicted - ages).mean()),
            ]
        )
    settings = (
        f"{model.backbone_name}, {size} px, batch {args.batch_size} x {args.batches} {faces}, "
        f"median of {args.repeats}"
    )
    print_table(
        "Batch inference (bench_inference.py)",
        [
            "path",
            "img/s",
            "vs seed",
            "max abs age diff vs seed (years)",
            "mean abs age diff vs seed",
            "MAE (years)",
        ],
        rows,
        machine=machine(device),
        settings=settings,
    )
    if args.int8:
        added = rows[-1][5] - rows[0][5]
        verdict = "within" if added <= INT8_TOLERANCE_YEARS else "NOT within"
        print(
            f"\nint8 MAE {rows[-1][5]:.3f} vs seed {rows[0][5]:.3f} years ({added:+.3f}; ages change by "
            f"{rows[-1][4]} on average): {verdict} the {INT8_TOLERANCE_YEARS}-year budget"
            + ("" if args.model else " (random head: rerun with a trained --model to judge)")
        )


if __name__ == "__main__":
    main()
