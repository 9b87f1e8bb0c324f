#!/usr/bin/env bash
# Real-photo validation of a model (never training data): the shared studio portraits (exact ages) and
# the in-the-wild FairFace sample (age groups), both uncropped, through the same detect -> align -> age
# path as `predict`; plus the model's own UTKFace test split where it has one (a run folder's split.csv,
# or the split that ships with the bundled model, which files exported from it share). The photo sets'
# errors are also broken down by head pose (frontal or turned sideways, from the detected landmarks), and
# UTKFace's and the portraits' by gender and ethnicity (the portraits' also by expression).
#   ./experiments/real_photos.sh MODEL OUT [extra evaluate options, e.g. --tta]
# MODEL: a run folder, a .safetensors file or `default` (the bundled model). Reports land in OUT/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: real_photos.sh MODEL OUT [options]}
out=${2:?usage: real_photos.sh MODEL OUT [options]}
shift 2
photos=../shared/data/real_photos
detector=(--detector yunet --detector-model ../shared/models/face_detection_yunet.onnx)
if [ -f "$model/split.csv" ]; then
    .venv/bin/age-detect evaluate --model "$model" --split test --by gender,ethnicity "${detector[@]}" \
        --out "$out/utkface-test" "$@"
elif .venv/bin/python -c 'import sys; from age_detect_resnet.run_folder import SavedSplit as S
sys.exit(S.of(sys.argv[1]) is None)' "$model"; then  # the bundled model or a file exported from it
    .venv/bin/age-detect evaluate --model "$model" --split test --data-root ../shared/data/utkface \
        --by gender,ethnicity "${detector[@]}" --out "$out/utkface-test" "$@"
fi
.venv/bin/age-detect evaluate --model "$model" --dataset csv --data-root "$photos/portraits/labels.csv" \
    --split all --detect --by head_pose,expression,gender,ethnicity "${detector[@]}" --out "$out/portraits" "$@"
.venv/bin/age-detect evaluate --model "$model" --dataset csv --data-root "$photos/fairface/labels.csv" \
    --split all --detect --by head_pose "${detector[@]}" --out "$out/fairface" "$@"
