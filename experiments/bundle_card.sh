#!/usr/bin/env bash
# Every accuracy and robustness figure of the README's model card for one model, in one go (about
# 25 min on 2 cores), so that a new bundle is measured on exactly what the one before was:
#   ./experiments/bundle_card.sh MODEL RUN OUT
# MODEL: what the photos go through, `default` (the bundled model) or a run folder.
# RUN:   the float32 run folder MODEL was bundled from (or MODEL itself; `default`: the bundle, whose run's
#        split ships with it): its split names UTKFace's test faces, which neither trained on; UTKFace's
#        figures are RUN's where MODEL has no split of its own (the bundle's are its own since 2026-12-07).
# OUT:   reports land here, laid out as results/bundled-tight-cut (the bundle of 2026-12-06) is.
# Speed is not measured here: it needs the machine to itself (`python benchmarks/bench_photos.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: bundle_card.sh MODEL RUN OUT}
run=${2:?usage: bundle_card.sh MODEL RUN OUT}
out=${3:?usage: bundle_card.sh MODEL RUN OUT}
cli=.venv/bin/age-detect
py=.venv/bin/python
utkface=../shared/data/utkface
photos=../shared/data/real_photos
yunet=../shared/models/face_detection_yunet.onnx
detector=(--detector yunet --detector-model "$yunet")
mkdir -p "$out/same-face"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

step "accuracy: UTKFace's test split (RUN), the portraits and FairFace (MODEL)"
./experiments/real_photos.sh "$model" "$out"
if [ ! -f "$model/split.csv" ] && [ "$model" != default ]; then
    "$cli" evaluate --model "$run" --split test --data-root "$utkface" --by gender,ethnicity "${detector[@]}" \
        --out "$out/utkface-test"
fi
"$py" experiments/ethnic_bias.py "UTKFace test=$out/utkface-test" > "$out/ethnic-bias-utkface-test.md"
"$py" experiments/ethnic_bias.py "portraits=$out/portraits" --values white black east_asian west_asian \
    > "$out/ethnic-bias-portraits.md"

step "robustness: the same face turned, smaller, cut closer, grey, re-compressed"
rotation() { "$py" experiments/rotation.py --model "$model" --detector-model "$yunet" "$@"; }
rotation > "$out/same-face/rotation.txt"
rotation --angles --scales 0.5 0.25 > "$out/same-face/resolution.txt"
rotation --photos "$photos/portraits" --angles 15 > "$out/same-face/rotation-portraits.txt"
rotation --photos "$photos/portraits" --angles --scales 0.5 0.25 > "$out/same-face/resolution-portraits.txt"
rotation --photos "$photos/fairface" --angles --scales 0.5 > "$out/same-face/resolution-fairface.txt"
rotation --photos "$utkface" --test-of "$run" --every 4 --angles --crops 0.7 0.55 \
    > "$out/same-face/crops-utkface-test.txt"
rotation --photos "$photos/portraits" --angles --grey --jpeg 20 > "$out/same-face/grey-jpeg-portraits.txt"
rotation --photos "$photos/fairface" --angles --grey --jpeg 20 > "$out/same-face/grey-jpeg-fairface.txt"

step "error by age on copies of UTKFace's test faces: cut closer, and in grey"
copies=$(mktemp -d)
trap 'rm -rf "$copies"' EXIT
for cut in 100:1 70:0.7 55:0.55; do
    name=cut-test-${cut%%:*} share=${cut#*:}
    "$py" experiments/cut_set.py --photos "$utkface" --test-of "$run" --every 4 --share "$share" --out "$copies/$name"
    "$cli" evaluate --model "$model" --dataset csv --data-root "$copies/$name/labels.csv" --split all --detect \
        "${detector[@]}" --out "$out/$name"
done
"$py" experiments/cut_set.py --photos "$utkface" --test-of "$run" --share 1 --out "$copies/colour"
"$py" experiments/cut_set.py --photos "$utkface" --test-of "$run" --share 1 --grey --out "$copies/grey"
for name in colour grey; do
    "$cli" evaluate --model "$model" --dataset csv --data-root "$copies/$name/labels.csv" --split all --detect \
        "${detector[@]}" --out "$out/utkface-test-$name"
done

if [ "$model" = default ]; then
    step "the README's analyze() example"
    AGE_DETECT_YUNET_MODEL="$yunet" "$py" -c "from age_detect_resnet import analyze; print(analyze('../shared/test_images/biden.jpg'))" \
        > "$out/analyze-biden.txt"
fi
step "done: $out"
