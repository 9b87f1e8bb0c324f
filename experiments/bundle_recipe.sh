#!/usr/bin/env bash
# The bundled model's whole recipe from ImageNet weights, every stage on the same UTKFace split (seed 0),
# each stage's run in OUT/ (the steps' times in the README add up to about 3 hours on 2 CPU cores). Run
# it again after an interruption: finished stages are kept and an interrupted training run continues from
# its last epoch (--resume).
#   ./experiments/bundle_recipe.sh OUT [STAGE ...]
# STAGE: resnet, mobilenet, ensemble (default: all three, in that order). Then, to ship it:
#   ./experiments/bundle_card.sh OUT/ensemble OUT/ensemble results/NAME     # judge it first
#   .venv/bin/python scripts/bundle_model.py OUT/ensemble                    # then write the bundle
# The commands and why each stage is there: README, "How the bundled model was made".
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bundle_recipe.sh OUT [resnet|mobilenet|ensemble ...]}
shift
[ $# -gt 0 ] || set -- resnet mobilenet ensemble
cli=.venv/bin/age-detect
yunet=../shared/models/face_detection_yunet.onnx
data=(--dataset utkface --data-root ../shared/data/utkface --detector-model "$yunet")
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

# train RUN ARGS...: a training run into OUT/RUN, skipped when finished (its report is written last),
# continued where it stopped when it has a saved epoch.
train() {
    local run=$out/$1
    shift
    if [ -f "$run/report.md" ]; then
        step "$run: finished, kept"
    elif [ -f "$run/last.pt" ]; then
        step "$run: continuing from its last epoch"
        "$cli" train --out "$run" --resume
    else
        step "$run: training"
        "$cli" train "$@" --out "$run"
    fi
}

# kept RUN: true (and said) when OUT/RUN, made by `average` or `ensemble` in one go, is already there.
kept() {
    [ -f "$out/$1/best.json" ] && step "$out/$1: done, kept"
}

# average RUN A B WEIGHTS: A and B's weights averaged, batch-norm statistics recomputed, into OUT/RUN.
average() {
    kept "$1" && return
    step "$out/$1: averaging $2 and $3 as $4"
    "$cli" average "$out/$2" "$out/$3" --weights "$4" --detector-model "$yunet" --out "$out/$1"
}

# third_stage NAME: 2 epochs in which 30% of the training faces are cut close round the face, from
# OUT/NAME, averaged 1:1 with it into OUT/NAME-member.
third_stage() {
    train "$1-tight-cut" --config "$out/$1/config.json" --init "$out/$1" --epochs 2 --lr 5e-5 \
        --warmup-epochs 0.25 --tight-cut 0.3
    average "$1-member" "$1" "$1-tight-cut" 1,1
}

for stage in "$@"; do
    case $stage in
    resnet)
        train resnet-stage1 --config cpu "${data[@]}" --backbone resnet50_v1 \
            --weights ../shared/weights/resnet50_imagenet_v1_fp16.safetensors --split-seed 0 --seed 0
        train resnet-stage2 --config cpu "${data[@]}" --init "$out/resnet-stage1" --epochs 6 --lr 1.5e-4 \
            --warmup-epochs 0.25 --ema-decay 0.999 --split-seed 0 --seed 0
        average resnet resnet-stage1 resnet-stage2 1,3
        third_stage resnet
        ;;
    mobilenet)
        train mobilenet --config cpu "${data[@]}" --backbone mobilenet_v2 \
            --weights ../shared/weights/mobilenet_v2_imagenet_fp16.safetensors --epochs 8 --ema-decay 0.999 \
            --split-seed 0 --seed 0
        third_stage mobilenet
        ;;
    ensemble)
        kept ensemble && continue
        step "$out/ensemble: the two members 3:1 with mirror views"
        "$cli" ensemble "$out/resnet-member" "$out/mobilenet-member" --weights 3,1 --mirror \
            --detector yunet --detector-model "$yunet" --out "$out/ensemble"
        ;;
    *)
        echo "unknown stage '$stage': use resnet, mobilenet or ensemble" >&2
        exit 2
        ;;
    esac
done
step "done: $out"
