#!/usr/bin/env bash
# One-change ablations of the bundled model's first stage, measured where the issue asks: on the
# real-photo validation sets (never trained on), beside UTKFace's test split. Each run repeats the first
# stage's saved settings exactly (results/utkface-aligned-dldl/config.json: --config cpu, ResNet-50 v1,
# aligned faces, photo augmentation, distribution head + L1, 4 epochs, split seed 0) with ONE change,
# then evaluates it with experiments/real_photos.sh. ~30 min a run on 2 CPU cores (training took 29 and 28 min for
# light-augment and age-weighting; the evaluations 1-2 min).
#   ./experiments/real_photo_ablations.sh NAME ...      (names below; default: all, in this order)
# The table: python experiments/real_photos_table.py "first stage=results/stage1-bundle" \
#   "NAME=results/ablation-NAME" ...
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A CHANGE=(
    [light-augment]="--augment light"     # flip, reframing and colour only: no rotation/blur/JPEG/greyscale/low-res
    [box-framing]="--no-align"            # the detector's box + margin instead of the landmark aligner
    [regression]="--head regression"      # the seed's head (MSE on the age) instead of distribution + L1
    [age-weighting]="--age-weighting"     # the loss weighted by inverse age frequency (meant for rare ages)
    [label-spread]="--label-spread proportional"  # label std 2 y at 30, growing as 1 + age (babies: sharp)
    [sqrt-age-weighting]="--age-weighting --age-weighting-power 0.5"  # a milder tilt to rare ages
    [label-spread-capped]="--label-spread capped"  # proportional up to 30, fixed 2 y above
    [seed-1]="--seed 1"  # no change but the seed (split, initialisation, batches): how far a rerun moves
    [alignment-v2]="--alignment 2"  # eyes-and-mouth aligner: a turned head keeps its whole face in the crop
    [occlusion]="--occlusion 0.5"   # half the training faces with a random patch hidden (hands, cups, glasses)
    [mobilenet]="--backbone mobilenet_v2 --weights ../shared/weights/mobilenet_v2_imagenet_fp16.safetensors"  # the small backbone (its own ImageNet weights)
)
ORDER=(light-augment box-framing regression age-weighting label-spread sqrt-age-weighting label-spread-capped seed-1 alignment-v2 occlusion mobilenet)
for name in "${@:-${ORDER[@]}}"; do
    [ -n "${CHANGE[$name]+x}" ] || { echo "unknown ablation $name; known: ${ORDER[*]}" >&2; exit 2; }
    resume=(); [ -f "runs/ablation-$name/last.pt" ] && resume=(--resume)   # an interrupted run goes on
    # shellcheck disable=SC2086  # the change is several words on purpose
    .venv/bin/age-detect train --config results/utkface-aligned-dldl/config.json ${CHANGE[$name]} \
        --out "runs/ablation-$name" "${resume[@]}" --no-progress
    ./experiments/real_photos.sh "runs/ablation-$name" "results/ablation-$name"
    # the run's own record travels with its results: runs/ is not kept when the machine changes
    cp "runs/ablation-$name"/{config.json,metrics.csv,report.md} "results/ablation-$name/"
done
