"""Make the bundled default model from a finished run (maintainers, before a release):

    .venv/bin/python scripts/bundle_model.py runs/utkface-aligned-dldl

Writes src/age_detect_resnet/assets/age_model.safetensors (fp16 backbone weights) + .json and the run's
split beside it (age_model_split.csv.gz: the faces it never saw, for `evaluate --split test`), checks that
the bundle gives the run's ages on its own validation faces, and prints the SHA-256s to pin as
`AGE_MODEL_SHA256` and `AGE_MODEL_SPLIT_SHA256` in src/age_detect_resnet/modeling/bundled.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from age_detect_resnet.export.verify import run_split_images
from age_detect_resnet.images import load_rgb
from age_detect_resnet.inference.predictor import TorchRunner, face_crop_input
from age_detect_resnet.modeling import bundled, checkpoint


def main(run: str) -> int:
    metadata = bundled.write_bundled_model(Path(run), bundled.AGE_MODEL)
    original = checkpoint.load_model(Path(run), "cpu")
    bundle = checkpoint.load_model(bundled.AGE_MODEL, "cpu")
    files = list(run_split_images(Path(run), "val", limit=256))
    batch = torch.stack([face_crop_input(load_rgb(path), original.metadata) for path in files])
    ages = [TorchRunner(m, precision="fp32")(batch)["age"] for m in (original, bundle)]
    difference = np.abs(ages[0] - ages[1])
    size = bundled.AGE_MODEL.stat().st_size / 1e6
    print(f"{bundled.AGE_MODEL}: {size:.1f} MB, sha256 {metadata['sha256']}")
    print(f"{bundled.AGE_MODEL_SPLIT}: sha256 {metadata['split_sha256']}")
    print(
        f"fp16 bundle vs the run on {len(batch)} validation faces: "
        f"mean |age diff| {difference.mean():.3f} y, "
        f"max {difference.max():.3f} y"
    )
    return 0 if difference.mean() < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
