"""`age-detect evaluate` with more views of each face averaged at test time: the aligned crop turned and
zoomed (README, "More views of each face at test time"). Every other option is evaluate's own:

    python experiments/test_time_views.py --views 0:1,6:1,-6:1,0:1.06 -- \
        --model runs/wise-1.0 --split val --tta --detector yunet \
        --detector-model ../shared/models/face_detection_yunet.onnx --out /tmp/views

`--views` lists DEGREES:ZOOM pairs (0:1 is the crop as it is); the network's raw outputs are averaged
over them, each view flipped too where `--tta` asks. A view is warped from the model's input crop with
its edge repeated where it reaches past it. `--out` is required: the views and evaluate's options are
written beside the report (`views.json`), which alone cannot tell them. An experiment only: the
project's own path averages the mirror views alone (`modeling.model.raw_outputs`), which this wraps for
the one process."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import age_detect_resnet.inference.backends as backends
import age_detect_resnet.modeling.model as model_module
import age_detect_resnet.training.engine as engine
from age_detect_resnet.cli import main as cli_main

_one_view = model_module.raw_outputs


def parse_views(text: str) -> list[tuple[float, float]]:
    try:
        views = [(float(d), float(z)) for d, z in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give DEGREES:ZOOM pairs, e.g. 0:1,6:1") from None
    if not views or any(z <= 0 for _, z in views):
        raise argparse.ArgumentTypeError(f"{text!r}: every zoom must be above 0")
    return views


def warp(images: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """The (B, 3, H, W) crops turned by `degrees` and zoomed by `zoom` about their centre, in their dtype."""
    if degrees == 0 and zoom == 1:
        return images
    pixels = images.float()
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(pixels.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if images.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=parse_views, required=True, help="DEGREES:ZOOM,...")
    parser.add_argument("evaluate", nargs=argparse.REMAINDER, help="-- then evaluate's options")
    args = parser.parse_args()
    views = args.views
    options = args.evaluate[1:] if args.evaluate[:1] == ["--"] else args.evaluate
    out = out_folder(options)
    if out is None:
        parser.error("give evaluate's --out FOLDER (after --): the views are recorded beside its report")

    def raw_outputs(model, images, *, tta_flip=False):
        outputs = [_one_view(model, warp(images, d, z), tta_flip=tta_flip) for d, z in views]
        return torch.stack(outputs).mean(0)

    modules = (model_module, engine, backends)
    for module in modules:
        module.raw_outputs = raw_outputs
    try:
        status = cli_main(["evaluate", *options])
    finally:  # the project's own path again, for a caller in the same process (the tests)
        for module in modules:
            module.raw_outputs = _one_view
    if status == 0:
        record = {"views": [{"degrees": d, "zoom": z} for d, z in views], "evaluate": options}
        (out / "views.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return status


def out_folder(options: list[str]) -> Path | None:
    """The folder evaluate's `--out` names in its options (`--out X` or `--out=X`), or None."""
    for i, option in enumerate(options):
        if option == "--out" and i + 1 < len(options):
            return Path(options[i + 1])
        if option.startswith("--out="):
            return Path(option.removeprefix("--out="))
    return None


if __name__ == "__main__":
    sys.exit(main())
