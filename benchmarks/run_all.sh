#!/usr/bin/env bash
# The README's speed figures of data loading, training, batch inference and one-photo latency, in one go
# (about 6 minutes on 2 CPU cores; run it on an idle machine; the end-to-end photo and video figures come
# from benchmarks/bench_photos.py and bench_video.py, run on their own):
#   ./benchmarks/run_all.sh [RUN_DIR] > speed.md
# RUN_DIR is a trained run for the accuracy columns of batch inference (its own image size).
set -uo pipefail   # no -e: one failing benchmark must not hide the others
cd "$(dirname "$0")/.."
py=.venv/bin/python
echo "### Data loading (224 px)"
$py benchmarks/bench_data.py --images 4096 --workers 2 --epochs 3
echo "### Training step (ResNet-50, 224 px, batch 32)"
$py benchmarks/bench_train.py --batch-size 32 --steps 6
echo "### Batch inference (ResNet-50, 224 px, batch 32)"
$py benchmarks/bench_inference.py --batches 4 --repeats 3 --int8
if [ $# -ge 1 ]; then
    echo "### Batch inference with the trained model $1 (its image size, labels of UTKFace)"
    $py benchmarks/bench_inference.py --model "$1" --batches 16 --repeats 3 --int8
    echo "### The same trained model run at 224 px (the seed's size; its MAE there is not its best)"
    $py benchmarks/bench_inference.py --model "$1" --image-size 224 --batches 8 --repeats 3 --int8
fi
echo "### One photo: detection + crop + model (224 px)"
$py benchmarks/bench_latency.py --repeats 10
