#!/usr/bin/env bash
# Weight averages of the bundled model's two stages (`age-detect average`), each measured on the
# real-photo validation sets and UTKFace's test split with experiments/real_photos.sh:
#   ./experiments/weight_averaging.sh [FIRST_STAGE_RUN] [SECOND_STAGE_RUN]
# defaults: runs/utkface-aligned-dldl (quick-start command 1) and runs/aligned-dldl-long (the second
# stage, from the model card). WEIGHTS (default "1,3 1,1 3,1") are the parts of first and second stage.
# Each average lands in runs/averaged-A-B; its reports in results/averaged-A-B. ~7 min each on 2 CPU cores (2.3 to average and calibrate, the rest real_photos.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
first=${1:-runs/utkface-aligned-dldl}
second=${2:-runs/aligned-dldl-long}
detector=(--detector yunet --detector-model ../shared/models/face_detection_yunet.onnx)
for weights in ${WEIGHTS:-1,3 1,1 3,1}; do
    name="averaged-${weights/,/-}"
    if [ ! -f "runs/$name/best.safetensors" ]; then
        .venv/bin/age-detect average "$first" "$second" --weights "$weights" --out "runs/$name" "${detector[@]}"
    fi
    ./experiments/real_photos.sh "runs/$name" "results/$name"
    cp "runs/$name/best.json" "results/$name/model.json"   # the average's metadata: sources, weights, val MAE
done
