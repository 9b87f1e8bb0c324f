"""Write a trained age model's pretrained start: the backbone's ImageNet weights under the model's own
head, beside the model's `config.json` and `split.csv`, as a run folder that `age-detect average` can mix
with the model (WiSE-FT's interpolation of a fine-tuned network back toward its pretrained weights;
README, "The backbone moved back toward ImageNet"):

    python experiments/pretrained_start.py runs/resnet-member \
        ../shared/weights/resnet50_imagenet_v1_fp16.safetensors runs/imagenet-start
    age-detect average runs/resnet-member runs/imagenet-start --weights 9,1 --out runs/wise-0.9

MODEL is a run folder holding one model (an ensemble's member: `experiments/ensemble_member.py`); WEIGHTS
the ImageNet state dict its backbone was trained from (`--weights` of its first stage). The head is the
model's, so the start is no age model by itself: only a mixture with the model is."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.ensemble import AgeEnsemble
from age_detect_resnet.modeling.model import WeightsError, create_backbone
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.training.combined_run import OWN_METADATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a run folder of one trained model")
    parser.add_argument("weights", type=Path, help="the ImageNet weights its backbone started from")
    parser.add_argument("out", type=Path, help="the run folder to write (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; name a new folder", file=sys.stderr)
        return 2
    run, start = RunFolder(args.model), RunFolder(args.out)
    missing = [p.name for p in (run.config, run.split) if not p.is_file()]
    if missing:
        print(f"error: {args.model} is not a run folder (no {', '.join(missing)})", file=sys.stderr)
        return 2
    try:
        model = checkpoint.load_model(args.model)
        if isinstance(model, AgeEnsemble):
            print(f"error: {args.model} is an ensemble; write out one member first", file=sys.stderr)
            return 2
        features, _ = create_backbone(model.backbone_name, weights=args.weights)
    except (checkpoint.ModelFileError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.backbone.load_state_dict(features.state_dict())
    metadata = {k: v for k, v in model.metadata.items() if k not in OWN_METADATA}
    metadata["pretrained_start_of"] = {"model": str(args.model), "weights": str(args.weights)}
    args.out.mkdir(parents=True)
    shutil.copy2(run.config, start.config)
    shutil.copy2(run.split, start.split)
    checkpoint.save_model(model, start.best, metadata, dtype=torch.float16)
    print(f"{model.backbone_name}'s ImageNet weights under the head of {args.model} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
