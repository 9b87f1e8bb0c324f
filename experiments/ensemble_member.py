"""Write one member of an ensemble model (the bundle by default) as a model file of its own, e.g. to
fine-tune it with `age-detect train --init FILE`:

    python experiments/ensemble_member.py default 2 runs/mobilenet-member/best.safetensors

MEMBER counts from 1 in the ensemble's description (`members` in its .json). The member's weights are
written as stored in the ensemble (the bundle's backbones are fp16); its metadata is the ensemble's
(image size, alignment, data) with the member's own architecture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.ensemble import AgeEnsemble
from age_detect_resnet.training.combined_run import OWN_METADATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="an ensemble: a run folder, a .safetensors file or `default`")
    parser.add_argument("member", type=int, help="which member, from 1")
    parser.add_argument("out", type=Path, help="the .safetensors file to write (its .json beside it)")
    args = parser.parse_args(argv)
    try:
        model = checkpoint.load_model(args.model)
    except checkpoint.ModelFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not isinstance(model, AgeEnsemble):
        print(f"error: {args.model} is one model, not an ensemble", file=sys.stderr)
        return 2
    if not 1 <= args.member <= len(model.members):
        print(f"error: {args.model} has members 1-{len(model.members)}, not {args.member}", file=sys.stderr)
        return 2
    if args.out.suffix != ".safetensors":
        print(f"error: {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    member = model.members[args.member - 1]
    metadata = {k: v for k, v in model.metadata.items() if k not in OWN_METADATA}
    metadata["member_of"] = {
        "model": str(args.model),
        "sha256": model.metadata.get("sha256"),
        "member": args.member,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Weights as the ensemble stores them: fp16 backbones stay fp16 (float32 would add bytes, not digits).
    prefix = f"members.{args.member - 1}.backbone."
    with safe_open(str(checkpoint.resolve_model_path(args.model)), "pt") as stored:
        names = [k for k in stored.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
        fp16 = any(stored.get_slice(k).get_dtype() == "F16" for k in names)
    dtype = torch.float16 if fp16 else None
    checkpoint.save_model(member, args.out, metadata, dtype=dtype)
    print(f"member {args.member} ({member.backbone_name} + {member.head.kind}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
