#!/usr/bin/env bash
# The accuracy experiments of the README, on UTKFace from ../shared, each within the 2-hour CPU budget:
# same split (seed 0), same recipe (--config seed-cpu: ages 10-75, box + margin framing), one change per
# run. Then the comparison table.
#   ./experiments/run_utkface_cpu.sh [NAME ...]      (default: all, in this order)
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A VARIANT=(
    [regression]=""
    [regression-v1]="experiments/backbone_resnet50_v1.toml"
    [distribution]="experiments/head_distribution.toml"
    [bins]="experiments/head_bins.toml"
    [seed-optimiser]="experiments/seed_optimiser.toml"
    [distribution-weighted]="experiments/head_distribution.toml experiments/age_weighting.toml"
    [mobilenet-distribution]="experiments/backbone_mobilenet_v2.toml experiments/head_distribution.toml"
    [distribution-v1]="experiments/backbone_resnet50_v1.toml experiments/head_distribution.toml"
    [dldl-v1]="experiments/backbone_resnet50_v1.toml experiments/head_dldl.toml"
    [mobilenet-bins]="experiments/backbone_mobilenet_v2.toml experiments/head_bins.toml"
)
ORDER=(regression regression-v1 distribution bins seed-optimiser distribution-weighted mobilenet-distribution
       distribution-v1 dldl-v1 mobilenet-bins)
for name in "${@:-${ORDER[@]}}"; do
    configs=(--config seed-cpu --config experiments/utkface.toml)
    for file in ${VARIANT[$name]}; do configs+=(--config "$file"); done
    .venv/bin/age-detect train "${configs[@]}" --out "runs/utkface-$name" --no-progress
done
.venv/bin/age-detect compare runs/utkface-*/
