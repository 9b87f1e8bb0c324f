#!/usr/bin/env bash
# Weight averages of the bundled model's two stages (`age-detect average`), each measured on the
# real-photo validation sets and UTKFace's test split with experiments/real_photos.sh:
#   ./experiments/weight_averaging.sh [FIRST_STAGE_RUN] [SECOND_STAGE_RUN]
# defaults: runs/utkface-aligned-dldl (quick-start command 1) and runs/aligned-dldl-long (the second
# stage, from the model card). WEIGHTS (default "1,3 1,1 3,1") are the parts of first and second stage.
# NORM_BATCHES (default 40, as `age-detect average`) training batches recompute each average's
# batch-norm statistics; with NORM_BATCHES=0 the averaged statistics are kept.
# Each average lands in runs/averaged-A-B (runs/averaged-A-B-bn with recomputed statistics); its reports
# in results/ under the same name. ~7 min each on 2 CPU cores (2.3 to average and calibrate, the rest
# real_photos.sh), about 1 more to recompute the statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
first=${1:-runs/utkface-aligned-dldl}
second=${2:-runs/aligned-dldl-long}
detector=(--detector yunet --detector-model ../shared/models/face_detection_yunet.onnx)
for weights in ${WEIGHTS:-1,3 1,1 3,1}; do
    norm_batches=${NORM_BATCHES:-40}
    name="averaged-${weights/,/-}"
    if [ "$norm_batches" != 0 ]; then name="$name-bn"; fi
    if [ ! -f "runs/$name/best.safetensors" ]; then
        .venv/bin/age-detect average "$first" "$second" --weights "$weights" --norm-batches "$norm_batches" \
            --out "runs/$name" "${detector[@]}"
    fi
    ./experiments/real_photos.sh "runs/$name" "results/$name"
    cp "runs/$name/best.json" "results/$name/model.json"   # the average's metadata: sources, weights, val MAE
done
