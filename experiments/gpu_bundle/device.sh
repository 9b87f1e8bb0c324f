#!/usr/bin/env bash
# Runs on a lent GPU machine (the workplace's device tool), in the repository root, with the parts that
# pack.py wrote to .gpu/ carried one per call (a part carried earlier stays there while the machine is
# warm). Every call extracts the parts not extracted yet; then
#   device.sh extract          nothing more (a call that only brings a part)
#   device.sh smoke            one short epoch at 224 px on the images so far: the whole path, and its speed
#   device.sh train NAME ARGS  `age-detect train` with ARGS into runs/NAME, then the run's bundle-ready
#                              fp16 weights in 15 MB pieces and its report folder (no weights) under $OUT
#   device.sh fetch NAME       the pieces and report of an earlier `train` run with PACKAGE=later (when
#                              $OUT already holds another run's pieces: at most 64 MiB come back a call)
# The machine's own python3 has PyTorch and the project's other needs; the project runs from src/.
# This repository's tracked files alone are over the tool's 64 MiB (the bundled weights, results/), so
# call it from a throwaway branch that deletes results/, docs/, tests/, benchmarks/ and
# src/age_detect_resnet/assets/age_model.safetensors (training from ImageNet needs none of them), and
# switch back to main afterwards.
set -euo pipefail
mode=${1:?usage: device.sh extract|smoke|train NAME ARGS|fetch NAME}
shift
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
data=/tmp/gpu-data
mkdir -p "$data"
for part in .gpu/part-*.tar; do
    [ -e "$part" ] || continue
    mark="$data/$(basename "$part").extracted"
    if [ ! -e "$mark" ]; then
        tar -xf "$part" -C "$data" && touch "$mark" && rm -f "$part"
    fi
done
echo "images so far: $(ls "$data/utkface" 2>/dev/null | wc -l)"
common=(--config gpu --dataset utkface --data-root "$data/utkface" --backbone resnet50_v1
    --detector-model "$data/yunet.onnx" --num-workers 15 --cache-dir /tmp/cache --no-progress
    --no-tensorboard)

package() {  # the run's best model as the bundle's fp16 file, in pieces, and its reports, under $OUT
    local run=runs/$1
    python3 - "$run" <<'PY'
import sys
from pathlib import Path
from age_detect_resnet.modeling.bundled import write_bundled_model
write_bundled_model(Path(sys.argv[1]), Path(sys.argv[1]) / "bundle" / "age_model.safetensors")
PY
    (cd "$run/bundle" && sha256sum age_model.safetensors && split -b 15000000 -d age_model.safetensors \
        "$OUT/$1.safetensors.part-")
    cp "$run/bundle/age_model.json" "$OUT/$1.json"
    tar --exclude='*.safetensors' --exclude='*.pt' --exclude=bundle -czf "$OUT/$1-run.tar.gz" -C runs "$1"
}

case $mode in
    smoke)
        nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no nvidia-smi"
        python3 -c "import torch, torchvision, cv2; print(torch.__version__, torchvision.__version__, cv2.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
        rm -rf runs/smoke  # a check, not a run to keep: training refuses to replace an earlier one
        python3 -m age_detect_resnet.train "${common[@]}" --no-pretrained --limit "${SMOKE_LIMIT:-4000}" --epochs 1 \
            --grid-size 0 --norm-batches 2 --out runs/smoke
        grep -h "epoch\|MAE" runs/smoke/report.md | head -20
        ;;
    train)
        name=${1:?usage: device.sh train NAME ARGS}
        shift
        python3 -m age_detect_resnet.train "${common[@]}" --weights "$data/imagenet.safetensors" \
            --out "runs/$name" "$@"
        [ "${PACKAGE:-now}" = later ] || package "$name"
        ;;
    extract)  # the extraction above is all
        ;;
    fetch)
        package "${1:?usage: device.sh fetch NAME}"
        ;;
    *)
        echo "unknown mode $mode" >&2
        exit 2
        ;;
esac
