"""Pack what a GPU training run of the bundled model needs into parts small enough for the device tool.

The workplace's device tool (a lent GPU machine; README: "The bundle's recipe at 224 px on a GPU")
takes at most 64 MiB of working tree per call and nothing from ../shared, so the UTKFace images, the
ImageNet weights and the YuNet file travel as uncompressed tar parts (JPEGs do not compress), one part
per call, each extracted on the machine by `device.sh`. `.gpu/` is in .gitignore: nothing of it is committed.

    python experiments/gpu_bundle/pack.py --utkface ../shared/data/utkface \
        --weights ../shared/weights/resnet50_imagenet_v1_fp16.safetensors \
        --yunet ../shared/models/face_detection_yunet.onnx --out .gpu
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

PART_BYTES = 58_000_000  # leaves room for the working tree itself under the 64 MiB (67.1 MB) limit


def plan_parts(files: list[tuple[Path, str]], first: list[tuple[Path, str]], last: list[tuple[Path, str]]):
    """Parts of at most PART_BYTES in file order: `first` opens part 1, `last` closes the final part."""
    header = 1024  # a tar header and padding, at most
    sizes = [p.stat().st_size + header for p, _ in files]
    reserve = sum(p.stat().st_size + header for p, _ in last)
    parts: list[list[tuple[Path, str]]] = [list(first)]
    size = sum(p.stat().st_size + header for p, _ in first)
    remaining = sum(sizes)
    for (path, name), grow in zip(files, sizes, strict=True):
        # The final part keeps room for `last` once everything left fits beside it.
        budget = PART_BYTES - reserve if size + remaining + reserve <= PART_BYTES else PART_BYTES
        if size + grow > budget:
            parts.append([])
            size = 0
        parts[-1].append((path, name))
        size += grow
        remaining -= grow
    if size + reserve > PART_BYTES:
        parts.append([])
    parts[-1].extend(last)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utkface", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--yunet", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    images = sorted(p for p in args.utkface.iterdir() if p.is_file())
    files = [(p, f"utkface/{p.name}") for p in images]
    parts = plan_parts(files, [(args.yunet, "yunet.onnx")], [(args.weights, "imagenet.safetensors")])
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("part-*.tar"):
        old.unlink()
    for number, members in enumerate(parts, 1):
        target = args.out / f"part-{number}.tar"
        with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
            for path, name in members:
                tar.add(path, arcname=name)
        print(f"{target}: {len(members)} files, {target.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
